#!/usr/bin/env bash
# A real full disk (needs root to mount a tmpfs): the tiny task's run on a 150 KB tmpfs, where the
# second epoch's checkpoint does not fit. Expected: one error line naming checkpoint.pt, exit 2, the
# first epoch's checkpoint intact; then, with the tmpfs grown to 400 KB, --resume completes.
# Usage: scripts/full_disk_tmpfs.sh   (PYTHON overrides the interpreter)
set -eu
python=${PYTHON:-python}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d -t full_disk.XXXXXX)
disk="$work/disk"
mkdir "$disk"
mount -t tmpfs -o size=150k tmpfs "$disk"
trap 'umount "$disk"; rm -rf "$work"' EXIT
cat >"$work/policy.yaml" <<'YAML'
version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.2
    method: SET
    update: {every: 10, unit: steps}
training: {epochs: 3, batch_size: 64, optimizer: sgd, lr: 0.01}
YAML
run=("$python" -m sparsify "$root/tests/models/tiny_task.py" "$work/policy.yaml" -o "$disk/run" --no-plots)
set +e
"${run[@]}" >"$work/full.log" 2>&1
code=$?
set -e
echo "on a full disk: exit $code; $(grep 'sparsify: error' "$work/full.log")"
ls -a "$disk/run"
"$python" -c "import sys; from pathlib import Path; from sparsify.checkpoint import read
print('checkpoint.pt verified, epoch', read(Path(sys.argv[1]))['epoch'])" "$disk/run/checkpoint.pt"
mount -o remount,size=400k "$disk"
"${run[@]}" --resume 2>&1 | tr '\r' '\n' | grep -E '^(resuming|done)'
[ "$code" -eq 2 ]
