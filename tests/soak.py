"""A soak of the topology evolution on small layers: every method on both backends, in lockstep,
with every invariant checked after every topology update.

After each update, on each backend: the layer's link count is the schedule's exactly; the books
balance (links before - pruned - removed - percolated + regrown = links after, and no more new
links than regrown ones); weights, gradients and optimizer moments of inactive links are zero, and
so are those of the links just regrown; a csr layer stores one value (and one moment) per link.
Across backends: the masks are identical after every update. The models are float64, and after
every step the csr model takes the masked one's weights and optimizer moments, so each update
starts from the same state on both: the two backends' products sum in different orders, and over
thousands of steps those roundings grow until two scores the evolution compares swap (SET on a
4x24 layer, after about 6,000 steps, without the copy). CHT's early stop is off (overlap 1), so
its layers keep updating to the end. One thread: layers this small only wait on each other with more.

    python tests/soak.py --updates 625      # per method and backend: 10,000 updates in all
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

import sparsify
from sparsify.evolution import MOMENTS
from sparsify.policy import METHODS
from sparsify.topology.initial import link_count

SIZES = (12, 24, 24, 4)  # three sparse layers, small enough for thousands of updates a minute
BACKENDS = ("masked", "csr")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(a, b) for a, b in zip(SIZES, SIZES[1:]))

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _dense(layer, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (of the layer's trainable parameter's shape) laid out as the ``[out, in]`` weight."""
    if tensor.shape == layer.mask.shape:
        return tensor
    assert tensor.numel() == int(layer.mask.sum()), "a csr layer stores one value per link"
    dense = tensor.new_zeros(layer.mask.shape)
    dense[layer.mask] = tensor  # csr values are in row-major order, as boolean indexing reads them
    return dense


@dataclass
class Invariants:
    """Checks every invariant of each update as the evolution records it (one per backend)."""

    handle: sparsify.SparseModel
    optimizer: torch.optim.Optimizer
    updates: int = 0

    def __post_init__(self):
        self.before = {n: s.module.mask.clone() for n, s in self.handle.sites.items()}
        self.handle.evolution.listeners.append(self)

    def __call__(self, record: dict) -> None:
        self.updates += 1
        evolution = self.handle.evolution
        for name, row in record["layers"].items():
            layer = self.handle.sites[name].module
            old, new = self.before[name], layer.mask
            fresh = new & ~old
            expected = link_count(layer.out_features, layer.in_features, evolution.scheduled_density(name, record["step"]))
            assert row["links"] == int(new.sum()) == expected, (name, record["step"], row["links"], expected)
            assert int(old.sum()) - row["pruned"] - row["removed"] - row["percolated_links"] + row["regrown"] \
                == row["links"], (name, record["step"], row)
            assert int(fresh.sum()) <= row["regrown"], (name, record["step"])
            weight = _dense(layer, layer.trainable.detach())
            assert not weight[~new].any() and not weight[fresh].any(), (name, record["step"], "weights")
            grad = layer.trainable.grad
            if grad is not None:
                assert not _dense(layer, grad)[~new].any(), (name, record["step"], "gradient")
            for key, value in self.optimizer.state.get(layer.trainable, {}).items():
                if key in MOMENTS:
                    moment = _dense(layer, value)
                    assert not moment[~new].any() and not moment[fresh].any(), (name, record["step"], key)
            self.before[name] = new.clone()


@torch.no_grad()
def _copy_state(masked, masked_optimizer, csr, csr_optimizer) -> None:
    """Give the csr model the masked model's weights, biases and optimizer state (same masks)."""
    for name, site in masked.sites.items():
        a, b = site.module, csr.sites[name].module
        b.values.copy_(a.weight[a.mask])
        pairs = [(a.weight, b.values, a.mask)] + ([(a.bias, b.bias, None)] if a.bias is not None else [])
        for pa, pb, mask in pairs:
            if mask is None:
                pb.copy_(pa)
            for key, value in masked_optimizer.state.get(pa, {}).items():
                state = csr_optimizer.state[pb]
                if key in MOMENTS and mask is not None:
                    state[key] = value[mask].clone()
                elif torch.is_tensor(value):
                    state[key] = value.clone()


def _policy(method: str, backend: str, seed: int) -> dict:
    defaults = {"density": 0.2, "method": method, "backend": backend, "update": {"every": 1, "unit": "steps"}}
    if METHODS[method]["early_stop"] is not None:  # freezes only above an overlap of 1: never
        defaults["early_stop"] = {"overlap": 1.0}
    return {"version": 1, "unmatched": "sparsify", "seed": seed, "defaults": defaults}


def _steps_for(method: str, updates: int) -> int:
    """Training steps whose schedule gives about ``updates`` updates (some methods stop at t_end)."""
    return int(updates / METHODS[method]["t_end"]) + 2


def soak(method: str, updates: int, seed: int = 0) -> dict:
    """Train ``method`` on both backends in lockstep until each made ``updates`` updates (or its
    schedule ended), checking every invariant; returns the counts and the seconds taken."""
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _soak(method, updates, seed, started)
    finally:
        torch.set_num_threads(threads)


def _soak(method: str, updates: int, seed: int, started: float) -> dict:
    steps = _steps_for(method, updates)
    runs = []
    for backend in BACKENDS:
        torch.manual_seed(seed)
        model = Net().double()
        model, handle = sparsify.sparsify(model, _policy(method, backend, seed), torch.randn(2, SIZES[0]).double())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2) if method in ("RigL", "CHTss") else \
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        handle.attach(optimizer, total_steps=steps)
        runs.append((model, handle, optimizer, Invariants(handle, optimizer)))
    g = torch.Generator().manual_seed(seed)
    compared = 0
    for step in range(steps):
        x = torch.randn(16, SIZES[0], generator=g, dtype=torch.float64)
        y = (x[:, :4] + 0.5 * x[:, 4:8]).argmax(1)
        for model, _handle, optimizer, _check in runs:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        (_, a, oa, ca), (_, b, ob, cb) = runs
        assert ca.updates == cb.updates, (method, step)
        if ca.updates > compared:
            compared = ca.updates
            for name in a.sites:
                assert torch.equal(a.sites[name].module.mask, b.sites[name].module.mask), \
                    (method, "masks differ between backends", name, step)
        _copy_state(a, oa, b, ob)
        if compared >= updates:
            break
    return {"method": method, "updates": compared, "steps": step + 1, "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=625, help="topology updates per method and backend")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = 0
    for method in (m for m in METHODS if m != "static"):
        result = soak(method, args.updates, args.seed)
        total += 2 * result["updates"]
        print(f"{method}: {result['updates']} updates on each backend in {result['steps']} steps, every invariant "
              f"held and the masks matched after each ({result['seconds']:.0f}s)", flush=True)
    print(f"{total} topology updates checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
