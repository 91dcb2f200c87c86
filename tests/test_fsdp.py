"""Sparse layers under FSDP2's fully_shard (gloo on CPU, 2 processes): identical masks on every rank
after every update, the optimizer's moments of changed links zero on every shard, the same masks and
losses as the same run under DDP, and a resume through torch.distributed.checkpoint. One group of 2
processes trains every run of fsdp_worker.SCENARIOS (starting processes costs more than the runs)."""
import json

import pytest
import torch.multiprocessing as mp

import fsdp_worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.start_processes(fsdp_worker.run, args=(2, str(out / "store"), str(out)), nprocs=2, start_method="spawn",
                       join=True)
    return {name: [json.loads((out / f"{name}-rank{r}.json").read_text()) for r in range(2)]
            for name in fsdp_worker.SCENARIOS}


@pytest.mark.parametrize("method", ["CHTs", "RigL"])
def test_sharded_layers_evolve_as_under_ddp_with_identical_masks_on_every_rank(runs, method):
    fsdp, ddp = runs[f"fsdp-{method}"], runs[f"ddp-{method}"]
    assert fsdp[0]["weights"] == ["DTensor", "DTensor"] and ddp[0]["weights"] == ["Parameter", "Parameter"]
    for rank in fsdp:
        assert rank["steps"] == fsdp_worker.STEPS and rank["updates"] == [5, 10, 15, 20, 25, 30, 35, 40]
        assert rank["moments"] == [True] * 8  # AdamW's moments of changed links were zeroed on every shard
    for update in fsdp[0]["sums"]:  # the checksums every rank gathered after each update
        assert update[0] == update[1]
    assert fsdp[0]["sums"] == fsdp[1]["sums"] and fsdp[0]["final"] == fsdp[1]["final"]
    assert fsdp[0]["sums"][0] != fsdp[0]["sums"][-1]  # the topology did change
    assert [s[0] for s in fsdp[0]["sums"]] == [s[0] for s in ddp[0]["sums"]]  # the same masks after every update
    for r in range(2):  # the same losses, to float rounding (the gradients are averaged in another order)
        assert fsdp[r]["losses"] == pytest.approx(ddp[r]["losses"], rel=1e-5, abs=1e-6)


def test_a_run_resumed_from_a_distributed_checkpoint_ends_as_the_uninterrupted_one(runs):
    whole, cut, resumed = runs["fsdp-CHTs"], runs["cut"], runs["resumed"]
    for r in range(2):
        assert cut[r]["steps"] == fsdp_worker.CUT and cut[r]["updates"] == [5, 10, 15, 20]
        assert resumed[r]["steps"] == fsdp_worker.STEPS
        assert resumed[r]["updates"] == whole[r]["updates"]  # the history came back from the checkpoint
        assert resumed[r]["final"] == whole[r]["final"]
        assert resumed[r]["sums"] == whole[r]["sums"][4:]  # after every update past the cut: 25, ..., 40
        assert cut[r]["losses"] + resumed[r]["losses"] == whole[r]["losses"]  # bitwise: the same steps


def test_the_csr_backend_under_fully_shard_is_refused_with_what_to_do(runs):
    errors = [rank["error"] for rank in runs["csr"]]
    assert errors[0] == errors[1]
    assert "layer fc1 uses backend csr" in errors[0] and "backend: masked" in errors[0]
