"""Training step time of plain nn.Linear, the masked backend and the csr backend, side by side.

The papers' MLP (784-1568-1568-1568-10 as an ``nn.Sequential`` through ``sparsify.sparsify``; the
three hidden layers sparse, the output layer dense) at batch 32 and 256, and a LLaMA-style decoder
block (hidden 512, MLP 1376, 8 heads; every projection sparse) at batch 8 x 64 tokens, at densities
1%, 5%, 10%, 30%. A step is forward, backward and an SGD-with-momentum step, with the topology
evolution (CHTs at the given density) attached; no update falls in the timed steps. The csr
backend runs twice: on its compiled kernels (csr) and on torch's sparse kernels (csr-torch, the
path taken without a compiler). Contenders alternate ``--repeat`` times; each keeps its median
mean over ``--steps`` steps. ``--clock cpu`` times the process's CPU time instead of the wall
clock: on a machine shared with other work it counts only the time this process ran (use it
with ``--threads 1``).

Beside each row: the floor, the work of the step's three products (forward, input gradient,
weight gradient) in csr form against the dense form (active links plus dense layers' weights,
over all weights of the linear layers; attention's own products are not counted), and how many
times the floor the csr step is. ``--profile`` adds, per density, where the csr step's time
goes (torch.profiler, self CPU time): the products' kernels, layout copies, index and structure
work, the other operators (elementwise, loss, optimizer), and the rest (Python and dispatch).
For the MLP, one CHTs update of the masked and of the csr model is then timed too (fastest of
``--repeat``), and the last column adds it to every step as the papers' one update per
Fashion-MNIST epoch would (60,000 / batch steps). Run from the repository root:

    python benchmarks/training_step.py
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "models"))
import llama  # noqa: E402

import sparsify  # noqa: E402
from sparsify import csr_kernels  # noqa: E402
from sparsify.csr_linear import CsrLinear  # noqa: E402
from sparsify.sparse_linear import SparseLinear  # noqa: E402

DENSITIES = (0.01, 0.05, 0.10, 0.30)


def mlp_case(batch: int):
    def build():
        torch.manual_seed(0)
        sizes = (784, 1568, 1568, 1568, 10)
        layers = [nn.Flatten()]
        for i in range(4):
            layers += [nn.Linear(sizes[i], sizes[i + 1])] + ([nn.ReLU()] if i < 3 else [])
        return nn.Sequential(*layers)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    return build, (x,), lambda out: nn.functional.cross_entropy(out, y), "regex", "[135]", 60000 // batch


def block_case():
    def build():
        torch.manual_seed(0)
        return llama.Llama(vocab=256, dim=512, n_layers=1, n_heads=8, n_kv_heads=8, hidden=1376)
    tokens = torch.randint(0, 256, (8, 65))
    target = tokens[:, 1:].flatten()
    return build, (tokens[:, :-1],), lambda out: nn.functional.cross_entropy(out.flatten(0, 1), target), \
        "regex", r"layers\.0\..*", None


CLOCK = time.perf_counter
CONTENDERS = ("plain", "masked", "csr-torch", "csr")


@contextlib.contextmanager
def kernels(contender: str):
    """csr-torch: the csr backend on torch's sparse kernels (as without a compiler)."""
    if contender != "csr-torch":
        yield
        return
    os.environ[csr_kernels.ENV] = "torch"
    try:
        yield
    finally:
        del os.environ[csr_kernels.ENV]


def prepare(build, inputs, backend, density, kind, pattern):
    model = build()
    backend = "csr" if backend == "csr-torch" else backend
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
    start = CLOCK()
    evolution.update(evolution.evolving)
    return CLOCK() - start


def step_time(model, optimizer, inputs, loss_of, steps: int) -> float:
    start = CLOCK()
    for _ in range(steps):
        loss = loss_of(model(*inputs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (CLOCK() - start) / steps


def floor(model) -> float:
    """The products' work in csr form over the dense form: (active links + dense layers' weights) / all weights."""
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear, CsrLinear))]
    total = sum(m.in_features * m.out_features for m in linears)
    work = sum(m.active_links if isinstance(m, (SparseLinear, CsrLinear)) else m.in_features * m.out_features
               for m in linears)
    return work / total


KINDS = {"kernels": ("sparsify_csr::spmm", "sparsify_csr::sampled", "aten::addmm", "aten::mm",
                     "aten::sparse_sampled_addmm", "aten::_sparse_"),
         "layout copies": ("aten::copy_", "aten::clone", "aten::contiguous", "sparsify_csr::transposed"),
         "index work": ("aten::index", "aten::_sparse_compressed", "aten::sparse_compressed", "aten::searchsorted")}


def profile(model, optimizer, inputs, loss_of, steps: int) -> dict[str, float]:
    """Shares of the csr step's profiled time: kernels, layout copies, index work, other ops, Python/dispatch."""
    from torch.profiler import profile as torch_profile  # noqa: PLC0415  (only with --profile)
    step_time(model, optimizer, inputs, loss_of, 2)
    start = time.perf_counter()
    with torch_profile() as prof:
        step_time(model, optimizer, inputs, loss_of, steps)
    elapsed = (time.perf_counter() - start) * 1e6
    shares = dict.fromkeys([*KINDS, "other ops"], 0.0)
    for event in prof.key_averages():
        if event.key.startswith(("aten::", "sparsify_csr::")):
            kind = next((k for k, prefixes in KINDS.items() if event.key.startswith(prefixes)), "other ops")
            shares[kind] += event.self_cpu_time_total
    shares["the rest (Python, dispatch)"] = max(0.0, elapsed - sum(shares.values()))
    return {k: v / elapsed for k, v in shares.items()}


def table(name, case, repeat, steps, with_profile):
    build, inputs, loss_of, kind, pattern, epoch = case
    head = ("| density | plain ms | masked ms | csr-torch ms | csr ms | masked / plain | csr-torch / masked | csr / masked "
            "| floor | csr / masked over floor |")
    rule = "|---|---|---|---|---|---|---|---|---|---|"
    if epoch:
        head += f" update s, masked / csr | csr / masked, an update per {epoch} steps |"
        rule += "---|---|"
    print(f"\n## {name}\n\n{head}\n{rule}")
    profiles = {}
    for density in DENSITIES:
        models = {b: prepare(build, inputs, b, density, kind, pattern) for b in CONTENDERS}
        times = {b: [] for b in models}
        for b, (model, opt, _) in models.items():
            with kernels(b):
                step_time(model, opt, inputs, loss_of, 2)  # warm up
        for _ in range(repeat):
            for b, (model, opt, _) in models.items():
                with kernels(b):
                    times[b].append(step_time(model, opt, inputs, loss_of, steps))
        best = {b: statistics.median(t) for b, t in times.items()}
        low = floor(models["csr"][0])
        ratio = best["csr"] / best["masked"]
        row = (f"| {density:.0%} | {best['plain'] * 1e3:.2f} | {best['masked'] * 1e3:.2f} | {best['csr-torch'] * 1e3:.2f} | "
               f"{best['csr'] * 1e3:.2f} | {best['masked'] / best['plain']:.2f} | {best['csr-torch'] / best['masked']:.3f} | "
               f"{ratio:.3f} | {low:.3f} | {ratio / low:.1f}x |")
        if epoch:
            update = {b: float("inf") for b in ("masked", "csr")}
            for _ in range(repeat):
                for b in update:
                    update[b] = min(update[b], update_time(models[b][2]))
            amortized = {b: best[b] + update[b] / epoch for b in update}
            row += f" {update['masked']:.2f} / {update['csr']:.2f} | {amortized['csr'] / amortized['masked']:.3f} |"
        print(row, flush=True)
        if with_profile:
            profiles[density] = profile(*models["csr"][:2], inputs, loss_of, steps)
    if profiles:
        kinds = list(next(iter(profiles.values())))
        print("\nWhere the csr step's time goes (share of the profiled step):\n")
        print("| density | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
        for density, shares in profiles.items():
            print(f"| {density:.0%} | " + " | ".join(f"{shares[k]:.0%}" for k in kinds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for every contender (default: torch's)")
    parser.add_argument("--cases", default="mlp32,mlp256,block", help="comma-separated: mlp32, mlp256, block")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (a shared machine; with --threads 1)")
    parser.add_argument("--profile", action="store_true", help="add where the csr step's time goes")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = csr_kernels.ops() is not None
    cases = {"mlp32": ("MLP 784-1568-1568-1568-10, batch 32", lambda: mlp_case(32)),
             "mlp256": ("MLP 784-1568-1568-1568-10, batch 256", lambda: mlp_case(256)),
             "block": ("LLaMA-style block (dim 512, MLP 1376), 8 x 64 tokens", block_case)}
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · {args.clock} clock · compiled csr kernels: {compiled}")
    for key in args.cases.split(","):
        name, case = cases[key]
        table(name, case(), args.repeat, args.steps, args.profile)


if __name__ == "__main__":
    main()
