#!/usr/bin/env bash
# Shared set-up of quickstart.sh and test.sh: PyTorch (CPU build first, so no CUDA wheels are
# pulled in), then sparsify itself, then the Fashion-MNIST data when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0" || "$PYTHON" -m pip install "torch>=2.4,<3" --index-url https://download.pytorch.org/whl/cpu
fi
"$PYTHON" -m pip install ${SPARSIFY_PIP_ARGS:-.}

if [ -z "${SPARSIFY_FASHION_MNIST:-}" ] && [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist; set SPARSIFY_FASHION_MNIST to a folder of the IDX files" >&2
fi
