"""Training step time of plain nn.Linear, the masked backend and the csr backend, side by side.

The papers' MLP (784-1568-1568-1568-10, fc1-fc3 sparse, fc4 dense) at batch 32 and 256, and a
LLaMA-style decoder block (hidden 512, MLP 1376, 8 heads; every projection sparse) at batch 8 x 64
tokens, at densities 1%, 5%, 10%, 30%. A step is forward, backward and an SGD-with-momentum
step, with the topology evolution (CHTs at the given density) attached; no update falls in the
timed steps. For the MLP, one CHTs update of the masked and of the csr model is then timed too
(fastest of ``--repeat``), and the last column adds it to every step as the papers' one update
per Fashion-MNIST epoch would (60,000 / batch steps). Contenders alternate ``--repeat`` times and
each keeps its fastest mean over ``--steps`` steps. Run from the repository root:

    python benchmarks/training_step.py
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
import llama  # noqa: E402
from mlp import MLP  # noqa: E402

import sparsify  # noqa: E402

DENSITIES = (0.01, 0.05, 0.10, 0.30)


def mlp_case(batch: int):
    def build():
        torch.manual_seed(0)
        return MLP()
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    return build, (x,), lambda out: nn.functional.cross_entropy(out, y), "regex", "fc[1-3]", 60000 // batch


def block_case():
    def build():
        torch.manual_seed(0)
        return llama.Llama(vocab=256, dim=512, n_layers=1, n_heads=8, n_kv_heads=8, hidden=1376)
    tokens = torch.randint(0, 256, (8, 65))
    target = tokens[:, 1:].flatten()
    return build, (tokens[:, :-1],), lambda out: nn.functional.cross_entropy(out.flatten(0, 1), target), \
        "regex", r"layers\.0\..*", None


def prepare(build, inputs, backend, density, kind, pattern):
    model = build()
    if backend != "plain":
        policy = {"version": 1, "seed": 0, "rules": [{"match": {kind: pattern}, "density": density,
                                                      "backend": backend, "method": "CHTs",
                                                      "update": {"every": 10**8, "unit": "steps"}}]}
        model, handle = sparsify.sparsify(model, policy, inputs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if backend != "plain":
        handle.attach(optimizer, total_steps=10**9)
        return model, optimizer, handle.evolution
    return model, optimizer, None


def update_time(evolution) -> float:
    """Seconds of one topology update of every evolving layer (the model's topology changes)."""
    start = time.perf_counter()
    evolution.update(evolution.evolving)
    return time.perf_counter() - start


def step_time(model, optimizer, inputs, loss_of, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_of(model(*inputs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def table(name, case, repeat, steps):
    build, inputs, loss_of, kind, pattern, epoch = case
    head = "| density | plain ms | masked ms | csr ms | masked / plain | csr / masked |"
    rule = "|---|---|---|---|---|---|"
    if epoch:
        head += f" update s, masked / csr | csr / masked, an update per {epoch} steps |"
        rule += "---|---|"
    print(f"\n## {name}\n\n{head}\n{rule}")
    for density in DENSITIES:
        models = {b: prepare(build, inputs, b, density, kind, pattern) for b in ("plain", "masked", "csr")}
        best = {b: float("inf") for b in models}
        for model, opt, _ in models.values():
            step_time(model, opt, inputs, loss_of, 2)  # warm up
        for _ in range(repeat):
            for b, (model, opt, _) in models.items():
                best[b] = min(best[b], step_time(model, opt, inputs, loss_of, steps))
        row = (f"| {density:.0%} | {best['plain'] * 1e3:.2f} | {best['masked'] * 1e3:.2f} | {best['csr'] * 1e3:.2f} | "
               f"{best['masked'] / best['plain']:.2f} | {best['csr'] / best['masked']:.3f} |")
        if epoch:
            update = {b: float("inf") for b in ("masked", "csr")}
            for _ in range(repeat):
                for b in update:
                    update[b] = min(update[b], update_time(models[b][2]))
            amortized = {b: best[b] + update[b] / epoch for b in update}
            row += f" {update['masked']:.2f} / {update['csr']:.2f} | {amortized['csr'] / amortized['masked']:.3f} |"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every contender (default: torch's)")
    parser.add_argument("--cases", default="mlp32,mlp256,block", help="comma-separated: mlp32, mlp256, block")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = {"mlp32": ("MLP 784-1568-1568-1568-10, batch 32", lambda: mlp_case(32)),
             "mlp256": ("MLP 784-1568-1568-1568-10, batch 256", lambda: mlp_case(256)),
             "block": ("LLaMA-style block (dim 512, MLP 1376), 8 x 64 tokens", block_case)}
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads")
    for key in args.cases.split(","):
        name, case = cases[key]
        table(name, case(), args.repeat, args.steps)


if __name__ == "__main__":
    main()
