#!/usr/bin/env bash
# Make .venv/ with gradscope installed (editable) and its test tools, on a machine with only python3.
# torch==2.13.0 is installed first when missing, so pip takes the local CPU build instead of pulling
# a multi-GB CUDA build to satisfy pyproject's open-ended "torch>=2.2".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e '.[test]'
