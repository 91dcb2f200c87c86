"""Distributed data parallel (gloo on CPU, 2 processes): identical masks on every rank after every update."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import ddp_worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method,wrap_first,density", [("CHTs", False, 0.15), ("RigL", False, 0.15),
                                                      ("SET", True, 0.15), ("CHTs", False, 0.05)])
def test_masks_are_identical_on_every_rank_after_every_update(tmp_path, method, wrap_first, density):
    mp.start_processes(ddp_worker.train, args=(2, str(tmp_path / "store"), method, wrap_first, str(tmp_path), density),
                       nprocs=2, start_method="spawn", join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["backends"] == (["CsrLinear"] if density <= 0.05 else ["SparseLinear"])
    assert ranks[0]["sites"] == ranks[1]["sites"] == ["fc1", "fc2"]  # names without DDP's module. prefix
    expected = 15 if method == "SET" else 11  # steps 5..75 (SET: T_end = the whole run) or 5..55 (T_end = 60)
    assert ranks[0]["updates"] == ranks[1]["updates"] == expected
    for update in ranks[0]["sums"]:  # the checksums every rank gathered after each update
        assert update[0] == update[1]
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["sums"][0] != ranks[0]["sums"][-1]  # the topology did change


def _tiny_policy(tmp_path):
    """CHTs at 20% on tests/models/tiny_task.py: 3 epochs, an update every 5 steps."""
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {regex: 'fc[12]'}\n    density: 0.2\n    method: CHTs\n"
                      "    update: {every: 5, unit: steps}\ntraining: {epochs: 3, batch_size: 32, optimizer: adamw, lr: 0.01}\n")
    return policy


def test_cli_trains_in_two_processes(tmp_path):
    policy = _tiny_policy(tmp_path)
    out = tmp_path / "run"
    # this interpreter's sparsify (the one under test), not whichever one PATH finds first
    proc = subprocess.run([sys.executable, "-m", "sparsify", str(ROOT / "tests/models/tiny_task.py"), str(policy),
                           "-o", str(out), "--nproc", "2", "--no-plots"],
                          capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 3 * 15  # 30 batches per epoch shared by 2 ranks
    assert report["topology_updates"] == 6  # steps 5, 10, ..., 30 (T_end = 33.75)
    assert report["final"]["eval_accuracy"] > 0.4


def test_torchrun_trains_and_every_rank_leaves_the_group(tmp_path):
    """The same run launched by torchrun: the ranks meet through torchrun's store, and sparsify
    tears the group down before the interpreter exits."""
    policy = _tiny_policy(tmp_path)
    out = tmp_path / "run"
    proc = ddp_worker.torchrun(tmp_path, "-m", "sparsify", ROOT / "tests/models/tiny_task.py", policy, "-o", out,
                               "--no-plots")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 3 * 15 and report["topology_updates"] == 6


def test_cli_trains_sharded_by_fsdp_and_an_interrupted_run_resumes_to_the_same_model(tmp_path):
    """training.distributed: fsdp in 2 processes: the checkpoint holds the parameters gathered whole, a
    run killed after epoch 2 resumes from it to the uninterrupted run's masks and weights, and the
    export runs on a whole copy of the model."""
    policy = _tiny_policy(tmp_path)
    policy.write_text(policy.read_text().replace("lr: 0.01}", "lr: 0.01, distributed: fsdp}")
                      + "export: {onnx: true}\n")
    command = [sys.executable, "-m", "sparsify", str(ROOT / "tests/models/tiny_task.py"), str(policy), "--nproc", "2",
               "--no-plots"]
    whole = subprocess.run(command + ["-o", str(tmp_path / "whole")], capture_output=True, text=True, env={**os.environ})
    assert whole.returncode == 0, whole.stderr[-3000:]
    report = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 3 * 15 and report["topology_updates"] == 6
    assert report["final"]["eval_accuracy"] > 0.4
    assert report["export"]["onnxruntime_max_abs_diff"] <= 1e-4  # the whole copy exported and checked

    cut = subprocess.run(command + ["-o", str(tmp_path / "cut")], capture_output=True, text=True,
                         env={**os.environ, "SPARSIFY_TEST_DIE_AT_EPOCH": "3"})
    assert cut.returncode != 0 and not (tmp_path / "cut" / "report.json").exists()
    resumed = subprocess.run(command + ["-o", str(tmp_path / "cut"), "--resume"], capture_output=True, text=True,
                             env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr + resumed.stdout
    again = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert again["steps"] == report["steps"] and again["topology_updates"] == report["topology_updates"]
    assert again["final"]["eval_loss"] == pytest.approx(report["final"]["eval_loss"], abs=1e-6)
    models = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("whole", "cut")]
    assert models[0].keys() == models[1].keys() and any(k.endswith("mask") for k in models[0])
    for key, value in models[0].items():
        assert torch.allclose(value, models[1][key], atol=1e-6) if value.is_floating_point() \
            else torch.equal(value, models[1][key]), key


def test_a_numbered_gpu_for_every_process_is_refused_before_the_group_forms(monkeypatch):
    """With several processes, device cuda means each process's own GPU (its LOCAL_RANK); a numbered
    one would put every rank on the same GPU, which NCCL refuses deep inside its first collective."""
    from sparsify import train
    from sparsify.errors import SparsifyError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SparsifyError, match=r"'cuda:0' puts all 2 processes on one GPU; write device: cuda"):
        train._init_distributed("cuda:0")
