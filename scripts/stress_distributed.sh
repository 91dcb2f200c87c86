#!/usr/bin/env bash
# Run the distributed tests N times in a row (default 50) and count the runs that pass.
# Usage: scripts/stress_distributed.sh [N] [pytest args...]   (PYTHON overrides the interpreter)
# The output of every failing run is kept in $LOGDIR (default: a fresh temp folder).
set -u
n=${1:-50}
shift || true
python=${PYTHON:-python}
case "$python" in */*) PATH="$(cd "$(dirname "$python")" && pwd):$PATH"; export PATH ;; esac  # its sparsify first
logdir=${LOGDIR:-$(mktemp -d -t stress_distributed.XXXXXX)}
cd "$(dirname "$0")/.."
passed=0
failed=0
for i in $(seq 1 "$n"); do
    if "$python" -m pytest -q -p no:cacheprovider tests/test_distributed.py "$@" >"$logdir/run$i.log" 2>&1; then
        passed=$((passed + 1))
        rm -f "$logdir/run$i.log"
    else
        failed=$((failed + 1))
        echo "run $i failed: $logdir/run$i.log" >&2
    fi
    echo "run $i/$n: $passed passed, $failed failed" >&2
done
echo "$n runs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
