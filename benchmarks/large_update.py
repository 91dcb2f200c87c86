"""One CHTs topology update of a 4096 x 11008 layer (LLaMA-7B's MLP shape) at 1% density: time and peak memory.

The layer is made sparse through ``sparsify.sparsify`` (method CHTs, backend csr), trained one
SGD step on a random batch of 32, and then one update of its topology runs
(``evolution.update``). Its peak memory is the resident set's high-water mark during the update
above the resident set before it (Linux: ``/proc/self/clear_refs`` resets the mark). Each
``--repeat`` runs in a fresh process; the fastest time (wall clock, and the process's CPU time,
which on a shared machine counts only the time it ran) and the largest peak are kept. Run from
the repository root:

    python benchmarks/large_update.py
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sparsify


def status(field: str) -> int:
    """A /proc/self/status field in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def once(out_features: int, in_features: int, density: float) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, out_features))
    policy = {"version": 1, "seed": 0, "rules": [{"match": {"regex": "0"}, "density": density, "method": "CHTs",
                                                  "backend": "csr", "update": {"every": 10**8, "unit": "steps"}}]}
    x = torch.randn(32, in_features)
    model, handle = sparsify.sparsify(model, policy, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    handle.attach(optimizer, total_steps=10**9)
    model(x).square().mean().backward()
    optimizer.step()
    evolution = handle.evolution
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    before = status("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    evolution.update(evolution.evolving)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_extra_mb": (status("VmHWM") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.once:
        print(json.dumps(once(4096, 11008, 0.01)))
        return
    command = [sys.executable, __file__, "--once"] + (["--threads", str(args.threads)] if args.threads else [])
    runs = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(args.repeat)]
    print(f"# torch {torch.__version__} · {platform.machine()} · {torch.get_num_threads()} threads\n")
    print("| layer | density | method | update s (fastest) | update CPU s (fastest) | peak extra MB (largest) | runs |\n"
          "|---|---|---|---|---|---|---|")
    print(f"| 4096x11008 | 1% | CHTs | {min(r['seconds'] for r in runs):.2f} | {min(r['cpu_seconds'] for r in runs):.2f} | "
          f"{max(r['peak_extra_mb'] for r in runs):.0f} | {len(runs)} |")


if __name__ == "__main__":
    main()
