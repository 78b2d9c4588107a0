#!/usr/bin/env bash
# Set up a virtual environment with what the tests need, fetch SmolLM2, run the test suite.
# Usage: bash tools/test.sh [pytest args...]     (from the repository root or anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# The CPU build of torch first, so that no requirement pulls a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -r requirements.txt
python tools/fetch_smollm2.py >/dev/null || echo "warning: SmolLM2 could not be fetched; its tests will skip"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs tests "$@"
