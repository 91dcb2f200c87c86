"""Fault injection for training runs: the CLI's run killed with SIGKILL at chosen points, resumed
until it completes, and compared with a run that was never interrupted.

A trial is a plan drawn from a seed: one to three kills, each either at byte N of the k-th write
of one of the run's files (checkpoint.pt, model.pt, metrics.jsonl, report.json), right after the
k-th rename of one of them into place, or at a time after the process started. After each kill
the run goes on as a user would go on: ``--resume`` when the folder holds a checkpoint.pt,
``--force`` when it does not. The finished run must equal the uninterrupted one: model.pt's
weights and masks bitwise, checkpoint.pt's model and optimizer state bitwise, every metrics row
(but the seconds) equal, and no temporary file left.

Each process of a trial is forked from this one after ``sparsify.cli`` is imported (torch has run
no parallel work here yet), so a trial costs the training, not the start-up.

    python tests/faults.py --trials 100 --seed 0     # prints one line per trial and a count
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import sparsify.files
from sparsify.cli import main as sparsify_main
from sparsify.files import LEFTOVER

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests/models/tiny_task.py"
POLICY = """version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.2
    method: CHTs
    update: {every: 5, unit: steps}
training: {epochs: 3, batch_size: 64, optimizer: adamw, lr: 0.01}
"""
WRITTEN = ("checkpoint.pt", "model.pt", "metrics.jsonl", "report.json")
KILLED = -signal.SIGKILL


@dataclass(frozen=True)
class Fault:
    """Where one process of a trial is killed: at byte ``at`` of write ``nth`` of ``file``
    (``kind`` write), right after its rename ``nth`` (``kind`` rename), or ``at`` seconds after it
    started (``kind`` time)."""

    kind: str
    file: str = ""
    nth: int = 1
    at: float = 0

    def __str__(self) -> str:
        if self.kind == "time":
            return f"kill at {self.at:.2f}s"
        if self.kind == "rename":
            return f"kill after rename {self.nth} of {self.file}"
        return f"kill at byte {int(self.at)} of write {self.nth} of {self.file}"


class _KillingFile:
    """A file that kills its process once ``limit`` bytes (or characters) went through it."""

    def __init__(self, f, limit: int):
        self._f, self._left = f, limit

    def write(self, data):
        if len(data) >= self._left:
            self._f.write(data[:self._left])
            self._f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._left -= len(data)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def close(self):  # a file shorter than the byte chosen dies complete, before its rename
        self._f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install(fault: Fault | None) -> None:
    """Arm ``fault`` in this (forked) process through sparsify.files' own names."""
    if fault is None or fault.kind == "time":
        return
    counts: dict[str, int] = {}
    real_open, real_replace = open, sparsify.files.replace

    def target(tmp) -> str:
        name = Path(tmp).name
        return next((f for f in WRITTEN if name.startswith(f".{f}.")), "")

    def fault_open(tmp, mode="r", *args, **kwargs):
        f = real_open(tmp, mode, *args, **kwargs)
        name = target(tmp)
        counts[name] = counts.get(name, 0) + 1
        if fault.kind == "write" and name == fault.file and counts[name] == fault.nth:
            return _KillingFile(f, int(fault.at))
        return f

    def fault_replace(tmp, path):
        real_replace(tmp, path)
        if fault.kind == "rename" and target(tmp) == fault.file and counts.get(fault.file) == fault.nth:
            os.kill(os.getpid(), signal.SIGKILL)

    sparsify.files.open = fault_open
    sparsify.files.replace = fault_replace


def run_cli(argv: list[str], fault: Fault | None = None, log: Path | None = None) -> int:
    """``sparsify argv`` in a forked process with ``fault`` armed; its exit code (-9 when killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if log is not None:
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
            _install(fault)
            code = sparsify_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if fault is not None and fault.kind == "time":
        deadline = time.monotonic() + fault.at
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def plan(seed: int, seconds: float, metrics_writes: int, sizes: dict[str, int], epochs: int = 3) -> list[Fault]:
    """One to three faults drawn from ``seed``: kills during or after a write of a run file (at a
    byte up to its size in ``sizes``, bytes of the uninterrupted run's files), or at a time within
    the ``seconds`` an uninterrupted run takes."""
    rng = random.Random(seed)
    faults = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("write", "write", "rename", "time"))
        if kind == "time":
            faults.append(Fault("time", at=round(rng.uniform(0.05, seconds), 2)))
            continue
        file = rng.choice(WRITTEN)
        nth = rng.randint(1, {"checkpoint.pt": epochs, "metrics.jsonl": metrics_writes}.get(file, 1))
        size = sizes[file] * nth // metrics_writes if file == "metrics.jsonl" else sizes[file]  # it grows a row a write
        faults.append(Fault(kind, file, nth, rng.randint(0, size) if kind == "write" else 0))
    return faults


def comparable(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def differences(whole: Path, folder: Path) -> list[str]:
    """What differs between the finished runs in ``whole`` and ``folder`` (empty when nothing)."""
    problems = []
    for name in ("checkpoint.pt", "model.pt", "report.json", "metrics.jsonl", "coupling.txt"):
        if not (folder / name).exists():
            problems.append(f"no {name}")
    if problems:
        return problems
    leftovers = [p.name for p in folder.iterdir() if LEFTOVER.match(p.name)]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    a, b = torch.load(whole / "model.pt")["state_dict"], torch.load(folder / "model.pt")["state_dict"]
    if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
        problems.append("model.pt's weights or masks differ")
    ca, cb = torch.load(whole / "checkpoint.pt"), torch.load(folder / "checkpoint.pt")
    if not all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"]):
        problems.append("checkpoint.pt's model differs")
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    if sa.keys() != sb.keys() or not all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]):
        problems.append("checkpoint.pt's optimizer state differs")
    if comparable(whole) != comparable(folder):
        problems.append("metrics.jsonl differs")
    return problems


@dataclass(frozen=True)
class Reference:
    """The uninterrupted run: its folder, seconds, number of metrics writes and file sizes."""

    folder: Path
    seconds: float
    writes: int
    sizes: dict


def reference(root: Path) -> Reference:
    """The uninterrupted run, in ``root``/whole."""
    policy = root / "policy.yaml"
    policy.write_text(POLICY)
    whole = root / "whole"
    started = time.monotonic()
    code = run_cli([str(TINY), str(policy), "--no-plots", "-o", str(whole)], log=root / "whole.log")
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed with exit code {code}: {(root / 'whole.log').read_text()}")
    writes = len(comparable(whole))  # one write per update and per epoch
    return Reference(whole, time.monotonic() - started, writes, {f: (whole / f).stat().st_size for f in WRITTEN})


def trial(root: Path, seed: int, ref: Reference) -> dict:
    """Run trial ``seed`` in ``root``/trial<seed>: the plan's kills, then resumes until done."""
    folder, log = root / f"trial{seed}", root / f"trial{seed}.log"
    faults = plan(seed, ref.seconds, ref.writes, ref.sizes)
    base = [str(TINY), str(root / "policy.yaml"), "--no-plots", "-o", str(folder)]
    steps = []
    for fault in [*faults, None]:
        again = ["--resume"] if (folder / "checkpoint.pt").exists() else ["--force"] if folder.exists() else []
        code = run_cli(base + again, fault, log)
        steps.append({"fault": str(fault) if fault else "none", "args": again, "exit": code})
        if code not in (0, KILLED) or (fault is None and code != 0):
            return {"seed": seed, "steps": steps, "problems": [f"exit code {code}, see {log}"]}
    return {"seed": seed, "steps": steps, "problems": differences(ref.folder, folder)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="the first trial's seed")
    parser.add_argument("--dir", help="where the runs go (default: a new temporary folder)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="sparsify-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    ref = reference(root)
    print(f"uninterrupted run: {ref.seconds:.1f}s, {ref.writes} metrics rows; runs in {root}", flush=True)
    failed = kills = 0
    for seed in range(args.seed, args.seed + args.trials):
        result = trial(root, seed, ref)
        kills += sum(s["exit"] == KILLED for s in result["steps"])
        failed += bool(result["problems"])
        print(f"trial {seed}: {'; '.join(s['fault'] + ' -> ' + str(s['exit']) for s in result['steps'])}: "
              f"{'; '.join(result['problems']) or 'same as uninterrupted'}", flush=True)
    print(f"{args.trials} trials, {kills} processes killed: {args.trials - failed} resumed to the uninterrupted "
          f"run's weights, masks, optimizer state and metrics, {failed} did not")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
