"""Worker of the distributed tests: one process of a 2-process gloo run (spawned by test_distributed),
and the torchrun launch the distributed tests share."""
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import sparsify
from sparsify.train import leave_together


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 48)
        self.fc2 = nn.Linear(48, 48)
        self.fc3 = nn.Linear(48, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def torchrun(tmp_path: Path, *args, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """``args`` launched by torchrun on two ranks (standalone rendezvous), output captured; its logs go
    under ``tmp_path``, not into a torchelastic_* folder in /tmp. ``env`` is added to the environment."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--log-dir", str(tmp_path / "torchrun"), *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def checksum(masks: dict) -> list[int]:
    """Per layer: the number of links and a position-weighted sum, as integers."""
    out = []
    for mask in masks.values():
        flat = mask.flatten().long()
        out += [int(flat.sum()), int((flat * torch.arange(1, flat.numel() + 1)).sum())]
    return out


def every_ranks_checksums(handle) -> list[list[int]]:
    """This rank's mask checksums gathered from every rank (rank order); a collective: all ranks call it."""
    mine = torch.tensor(checksum(handle.masks()))
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def train(rank: int, world: int, store_path: str, method: str, wrap_first: bool, out: str,
          density: float = 0.15) -> None:
    torch.set_num_threads(1)
    # a file store in the test's own folder: no TCP port to pick (free_port() raced other processes for it)
    # and no store server living in rank 0, which could exit while rank 1 still tears down
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        _train(rank, world, method, wrap_first, out, density)
        # DDP's reducer holds the process group and gloo work: it is gone (and collected) before teardown
        gc.collect()
        dist.barrier()  # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()
    leave_together(store, world)


def _train(rank: int, world: int, method: str, wrap_first: bool, out: str, density: float) -> None:
    torch.manual_seed(0)
    model = Net()
    policy = {"version": 1, "seed": 1, "rules": [{"match": {"regex": "fc[12]"}, "density": density, "method": method,
                                                  "update": {"every": 5, "unit": "steps"}}]}
    if wrap_first:  # sparsify a model already inside DDP: rules see fc1, not module.fc1
        net = nn.parallel.DistributedDataParallel(model)
        _, handle = sparsify.sparsify(net, policy, torch.randn(2, 16))
    else:
        _, handle = sparsify.sparsify(model, policy, torch.randn(2, 16))
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    handle.attach(optimizer, total_steps=80)
    sums = []

    def compare(record):
        sums.append(every_ranks_checksums(handle))

    handle.evolution.listeners.append(compare)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data: gradients differ
    for _ in range(80):
        x = torch.randn(32, 16, generator=g)
        loss = nn.functional.cross_entropy(net(x), x[:, :4].argmax(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"sites": sorted(handle.sites), "sums": sums, "updates": len(handle.history),
                   "backends": sorted({type(s.module).__name__ for s in handle.sites.values()}),
                   "final": checksum(handle.masks())}, f)
