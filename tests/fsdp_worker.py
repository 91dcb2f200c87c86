"""Worker of the FSDP2 tests: one process of a 2-process gloo group (spawned once by test_fsdp) that
trains the runs of SCENARIOS one after another, each model sharded by ``fully_shard`` or wrapped in
DDP, each rank on its own batches. After every topology update a run records every rank's mask
checksums and whether the optimizer's moments of changed links are zero on every shard. A run can
stop after a step with a torch.distributed.checkpoint, and another resume from it."""
import gc
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import sparsify
from sparsify.sparse_linear import full_tensor
from sparsify.train import leave_together
from ddp_worker import Net, checksum, every_ranks_checksums

STEPS = 60  # an update every 5 steps until T_end = 45: steps 5, 10, ..., 40
CUT = 22  # the interrupted run stops after this step (updates at 5, ..., 20 done)
# name: (mode, method, stop after step, resume from the checkpoint of, backend)
SCENARIOS = {
    "fsdp-CHTs": ("fsdp", "CHTs", None, None, "masked"),
    "ddp-CHTs": ("ddp", "CHTs", None, None, "masked"),
    "fsdp-RigL": ("fsdp", "RigL", None, None, "masked"),
    "ddp-RigL": ("ddp", "RigL", None, None, "masked"),
    "cut": ("fsdp", "CHTs", CUT, None, "masked"),
    "resumed": ("fsdp", "CHTs", None, "cut", "masked"),
    "csr": ("fsdp", "CHTs", None, None, "csr"),
}


def run(rank: int, world: int, store_path: str, out: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        for name, (mode, method, stop, resume, backend) in SCENARIOS.items():
            result = _run(rank, world, out, mode, method, stop, resume and os.path.join(out, resume), backend)
            with open(os.path.join(out, f"{name}-rank{rank}.json"), "w") as f:
                json.dump(result, f)
            gc.collect()  # DDP's reducer holds gloo work: gone before the next run and the teardown
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_together(store, world)


def _run(rank, world, out, mode, method, stop, resume, backend) -> dict:
    torch.manual_seed(1 if resume else 0)  # a resumed run starts from other weights and masks: the checkpoint's win
    model = Net()
    policy = {"version": 1, "seed": 1, "rules": [{"match": {"regex": "fc[12]"}, "density": 0.15, "method": method,
                                                  "backend": backend, "update": {"every": 5, "unit": "steps"}}]}
    _, handle = sparsify.sparsify(model, policy, torch.randn(2, 16))
    if mode == "fsdp":
        for site in handle.sites.values():
            fully_shard(site.module)
        fully_shard(model)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01)
    first = 0
    if resume:  # restore before attach: loading an optimizer's state runs one step, which must not count
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                 "history": ""}
        dcp.load(state, checkpoint_id=resume)
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
        set_model_state_dict(model, state["model"])
        handle.evolution.history[:] = json.loads(state["history"])
        first = handle.evolution.step_index
    try:
        handle.attach(optimizer, total_steps=STEPS)
    except sparsify.SparsifyError as exc:
        return {"error": str(exc)}
    sums, moments, losses = [], [], []

    def check(record):
        sums.append(every_ranks_checksums(handle))
        zero = True  # every moment is 0 wherever the mask is, and at no more than the kept links it is not
        for name, site in handle.sites.items():
            state = optimizer.state[site.module.weight]
            for key in ("exp_avg", "exp_avg_sq"):
                value = full_tensor(state[key])
                kept = record["layers"][name]["links"] - record["layers"][name]["regrown"]
                zero &= bool((value[~site.module.mask] == 0).all()) and int((value != 0).sum()) <= kept
        moments.append(zero)

    handle.evolution.listeners.append(check)
    for step in range(first, stop or STEPS):
        g = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data, the same in every run
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.cross_entropy(net(x), x[:, :4].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if stop:
        dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                  "history": json.dumps(handle.history)}, checkpoint_id=os.path.join(out, "cut"))
    sharded = [type(site.module.weight).__name__ for site in handle.sites.values()]
    return {"sums": sums, "moments": moments, "losses": losses, "steps": handle.evolution.step_index,
            "updates": [r["step"] for r in handle.history], "final": checksum(handle.masks()), "weights": sharded}
