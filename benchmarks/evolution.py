"""Topology evolution while training: what it adds to a training step, and what one update costs.

On the papers' MLP (784-1568-1568-1568-10, hidden layers at 99% sparsity, batch 32, SGD with
momentum), side by side in one process:

- a training step with the evolution attached (its forward pre-hook and step counter) vs the
  same step with the evolution detached: goal ratio ≤ 1.05 on steps without an update;
- one topology update of the three layers, per method (SET, RigL, CHTs with CH2-L3n, CHT with
  CH3-L3p), against the time of one training epoch of Fashion-MNIST's 1875 steps.

Contenders alternate ``--repeat`` times and each keeps its fastest run (the machine is noisy).
Run from the repository root:

    python benchmarks/evolution.py
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
from mlp import MLP  # noqa: E402

import sparsify  # noqa: E402

STEPS_PER_EPOCH = 1875  # Fashion-MNIST at batch 32


def build(method: str, every: int):
    torch.manual_seed(0)
    policy = {"version": 1, "seed": 0, "rules": [{"match": {"regex": "fc[1-3]"}, "sparsity": 0.99, "method": method,
                                                  "update": {"every": every, "unit": "steps"}}]}
    model, handle = sparsify.sparsify(MLP(), policy, torch.randn(2, 784))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return model, handle, optimizer


def steps(model, optimizer, n, x, y) -> float:
    start = time.perf_counter()
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / n


def step_overhead(repeat: int, n: int) -> tuple[float, float]:
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    attached = build("CHTs", 10**9)
    detached = build("CHTs", 10**9)
    attached[1].attach(attached[2], total_steps=10**9)  # no update falls in the measured steps
    detached[0]._forward_pre_hooks.clear()  # the plain masked model: no evolution call at all
    best = {"attached": float("inf"), "detached": float("inf")}
    for _ in range(repeat):
        best["attached"] = min(best["attached"], steps(attached[0], attached[2], n, x, y))
        best["detached"] = min(best["detached"], steps(detached[0], detached[2], n, x, y))
    return best["attached"], best["detached"]


def update_time(method: str, repeat: int) -> float:
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    best = float("inf")
    for _ in range(repeat):
        model, handle, optimizer = build(method, 2)
        handle.attach(optimizer, total_steps=100, hook=False)
        for _ in range(2):  # step 2 is an update (RigL keeps its dense gradient from step 2's backward)
            steps(model, optimizer, 1, x, y)
            if handle.evolution.step_index == 0:
                handle.evolution.step()
        start = time.perf_counter()
        handle.evolution.step()
        best = min(best, time.perf_counter() - start)
        assert len(handle.history) == 1
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads\n")
    attached, detached = step_overhead(args.repeat, args.steps)
    print("| training step (batch 32) | ms |\n|---|---|")
    print(f"| evolution attached, no update due | {attached * 1e3:.1f} |")
    print(f"| evolution detached | {detached * 1e3:.1f} |")
    print(f"| ratio | {attached / detached:.3f} |\n")
    epoch = detached * STEPS_PER_EPOCH
    print(f"| one update of fc1-fc3 | s | share of one epoch ({epoch:.0f} s) |\n|---|---|---|")
    for method in ("SET", "RigL", "CHTs", "CHT"):
        t = update_time(method, max(2, args.repeat // 2))
        print(f"| {method} | {t:.2f} | {t / epoch:.1%} |")


if __name__ == "__main__":
    main()
