#!/usr/bin/env bash
# Install sparsify and run its main job on the bundled example: the papers' MLP on real
# Fashion-MNIST, hidden layers at 99% sparsity trained with CHTs (two epochs, a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
SPARSIFY_PIP_ARGS="." ./scripts/setup.sh
sparsify inspect examples/fmnist/model.py examples/fmnist/policy.yaml
sparsify examples/fmnist/model.py examples/fmnist/policy.yaml -o "runs/fmnist-$(date +%Y%m%d-%H%M%S)" "$@"
