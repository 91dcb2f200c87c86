#!/usr/bin/env bash
# Install sparsify with its test dependencies (editable, so tests see this checkout) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
SPARSIFY_PIP_ARGS="-e .[test]" ./scripts/setup.sh
ruff check .  # the linter first: a lint error fails the script before the tests run
exec pytest --durations=15 "$@"  # the 15 slowest tests listed at the end, to keep the suite quick
