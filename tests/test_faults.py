"""Faults that lose nothing: a training run killed anywhere resumes to the run that was never
interrupted; a full disk keeps the previous checkpoint and says so in one line; a corrupted
checkpoint is refused by its checksum; an export that cannot be written leaves no file."""
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsify.files
from sparsify import checkpoint
from sparsify.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "models" / "tiny_task.py"
POLICY = """version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.2
    method: SET
    update: {every: 10, unit: steps}
training: {epochs: 2, batch_size: 64, optimizer: sgd, lr: 0.01}
"""


def test_killed_runs_resume_to_the_uninterrupted_run(tmp_path):
    """Six trials of tests/faults.py (seeds 0-5: kills at random times, during the writes of
    metrics.jsonl, checkpoint.pt, model.pt and report.json, and right after a checkpoint's rename)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), "--trials", "6", "--seed", "0",
                           "--dir", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("6 trials, ") and lines[-1].endswith("6 resumed to the uninterrupted run's weights, "
                                                                     "masks, optimizer state and metrics, 0 did not")
    killed = int(lines[-1].split(", ")[1].split()[0])
    assert killed >= 6  # every trial's first process was killed
    for kind in ("kill at byte", "of checkpoint.pt", "kill after rename", "s -> -9"):
        assert any(kind in line for line in lines), kind


class _Full:
    """A file on a disk that fills up after ``room`` bytes."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def full_disk(monkeypatch, name: str, room: int = 1000) -> None:
    """Writes of ``name`` through sparsify.files find the disk full after ``room`` bytes."""
    def fake_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        return _Full(f, room) if Path(path).name.startswith(f".{name}.") else f
    monkeypatch.setattr(sparsify.files, "open", fake_open, raising=False)


def last_line(capsys) -> str:
    """The last line on stderr (progress bars come before it), with no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = tmp_path / "run"
    assert main([str(TINY), str(policy), "-o", str(run), "--no-plots", "--epochs", "1"]) == 0
    before = (run / "checkpoint.pt").read_bytes()
    full_disk(monkeypatch, "checkpoint.pt")
    capsys.readouterr()
    assert main([str(TINY), str(policy), "-o", str(run), "--no-plots", "--epochs", "1", "--force"]) == 2
    err = last_line(capsys)
    assert err == (f"sparsify: error: {run / 'checkpoint.pt'}: cannot write it (No space left on device); the previous "
                   "checkpoint.pt is kept unchanged. Free space on that disk or write elsewhere, then run again (a "
                   "training run continues from its last checkpoint with --resume)")
    assert (run / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "coupling.txt", "metrics.jsonl", "model.pt",
                                                     "report.json"]  # no temporary file left
    assert checkpoint.read(run / "checkpoint.pt")["epoch"] == 1


def flip(path: Path, tensor: torch.Tensor) -> None:
    """Change one bit in the stored bytes of ``tensor`` inside the file at ``path``."""
    data = bytearray(path.read_bytes())
    at = bytes(data).find(tensor.contiguous().numpy().tobytes()[:64])
    assert at > 0
    data[at + 10] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped bit", "cut short"])
def test_a_corrupted_checkpoint_is_refused_never_used(tmp_path, capsys, damage):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = tmp_path / "run"
    assert main([str(TINY), str(policy), "-o", str(run), "--no-plots", "--epochs", "1"]) == 0
    weight = torch.load(run / "model.pt", weights_only=True)["state_dict"]["fc1.weight"]
    for name in ("checkpoint.pt", "model.pt"):
        if damage == "flipped bit":
            flip(run / name, weight)
            damaged = torch.load(run / name, weights_only=True)  # torch.load itself notices nothing
            assert not torch.equal(damaged.get("model", damaged.get("state_dict"))["fc1.weight"], weight)
        else:
            (run / name).write_bytes((run / name).read_bytes()[:5000])
    capsys.readouterr()
    assert main([str(TINY), str(policy), "-o", str(run), "--no-plots", "--epochs", "2", "--resume"]) == 2
    err = last_line(capsys)
    assert err.startswith(f"sparsify: error: {run / 'checkpoint.pt'}: ")
    assert "the file is corrupt" in err and "restore it from a copy, or start the run again (--force)" in err
    if damage == "flipped bit":
        assert "its contents do not match the SHA-256 stored in it" in err
    assert main(["export", str(run)]) == 2
    err = last_line(capsys)
    assert err.startswith(f"sparsify: error: {run / 'model.pt'}: ") and "the file is corrupt" in err
    assert not (run / "model.onnx").exists()


def test_a_full_disk_during_an_export_leaves_no_file(tmp_path, capsys, monkeypatch):
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    run = tmp_path / "run"
    assert main([str(TINY), str(policy), "-o", str(run), "--no-plots", "--epochs", "1"]) == 0
    real = open

    def fake_open(path, mode="r", *args, **kwargs):  # the report, the last file the export writes
        f = real(path, mode, *args, **kwargs)
        return _Full(f, 100) if Path(path).name.startswith(".m.json.") else f
    monkeypatch.setattr("sparsify.export.pipeline.open", fake_open, raising=False)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["export", str(run), "-o", str(out / "m.onnx")]) == 2
    err = last_line(capsys)
    assert err == (f"sparsify: error: {out}: cannot write the export there (No space left on device); no file was "
                   "written. Free space on that disk, or export elsewhere (-o)")
    assert list(out.iterdir()) == []


def test_atomic_write_keeps_the_old_file_and_the_folder_clean(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    sparsify.files.atomic_write(target, lambda f: f.write("old"))
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    full_disk(monkeypatch, "a.json", room=2)
    with pytest.raises(sparsify.SparsifyError, match=r"a.json: cannot write it \(No space left on device\); the "
                                                     r"previous a.json is kept unchanged"):
        sparsify.files.atomic_write(target, lambda f: f.write("new"))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    left = sparsify.files.temporary(target)  # as a killed process leaves it
    Path(str(left) + ".data").write_text("x")
    assert sparsify.files.remove_leftovers(tmp_path) == sorted([left.name, left.name + ".data"])
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
