#!/usr/bin/env bash
# Create the virtual environment .venv (or reuse it) and install easgd-local into it.
#   bash scripts/setup.sh          # the package and its dependencies
#   bash scripts/setup.sh --test   # ... plus pytest and pytest-timeout
#   bash scripts/setup.sh --cpu    # PyTorch's CPU-only wheels (no CUDA libraries: ~1 GB, not ~6)
# A .venv that already holds satisfying versions is reused: pip then downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=""
index=()
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    # torch and torchvision from PyTorch's CPU wheel index, everything else from PyPI.
    --cpu) index=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple) ;;
    *) echo "usage: bash scripts/setup.sh [--test] [--cpu]" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q --disable-pip-version-check ${index[@]+"${index[@]}"} -e ".${extras}"
.venv/bin/python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA devices: {torch.cuda.device_count()}')"
