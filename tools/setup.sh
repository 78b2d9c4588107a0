#!/usr/bin/env bash
# Create .venv (once) with this project's requirements; CPU torch unless torch is already there.
# Source it: `. tools/setup.sh` leaves the venv active.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  "$PY" -m venv "$ROOT/.venv"
fi
. "$ROOT/.venv/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  # The CPU build first, so that no requirement pulls a multi-GB CUDA build. On a GPU machine,
  # install the CUDA build of torch into .venv yourself before running this.
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -r "$ROOT/requirements.txt"
