#!/usr/bin/env bash
# Create the virtual environment .venv (or reuse it) and install easgd-local into it.
#   bash scripts/setup.sh          # the package and its dependencies
#   bash scripts/setup.sh --test   # ... plus pytest and pytest-timeout
# A .venv that already holds satisfying versions is reused: pip then downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
.venv/bin/python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA devices: {torch.cuda.device_count()}')"
