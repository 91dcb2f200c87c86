"""The sparse-training papers' Fashion-MNIST table, reproduced with sparsify's policies.

The MLP 784-1568-1568-1568-10 (examples/models/mlp.py) trains on real Fashion-MNIST (the
example's loader, examples/fmnist/model.py) with each policy's own training section, the official
recipe: batch 32, SGD with momentum 0.9 and weight decay 5e-4, lr 0.025 decayed linearly to 1% over
90% of the epochs (stepped per epoch) and held, cross-entropy (the rate and the optimizer come from
sparsify.train, as in the CLI); the three hidden layers at 99% sparsity and the output layer dense.
Each method is one policy file in examples/policies (FC is the dense model, trained with the CHTs
policy's training section); the policy's seed is replaced by the run's seed, which also seeds the
weights and the data order.

Every finished run is appended to a JSON-lines file (default benchmarks/results/fmnist_mlp.jsonl)
with its accuracy after every epoch, the final and the best accuracy (best among the epochs that end
at the target density, as the official runs track it), ANP, link count, wall time and topology
updates; a run already in the file (same method, seed and epochs) is skipped, so an interrupted
sweep picks up where it stopped. At the end a table (mean ± std over seeds) is printed beside the
papers' numbers, and the accuracy curves are plotted. Run from the repository root:

    python benchmarks/fmnist_mlp.py --epochs 3 --seeds 0 1 2
    python benchmarks/fmnist_mlp.py --epochs 100 --seeds 0 --methods FC CHTs
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch import nn

import sparsify
from sparsify.policy import TrainingConfig
from sparsify.train import lr_factor, make_optimizer
from fmnist_run import example  # the Fashion-MNIST example's model.py, loaded from this folder's script

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "examples" / "policies"

# method -> policy file (None: the dense model). Order of the table.
METHODS = {
    "FC": None,
    "SET": "set.yaml",
    "RigL": "rigl.yaml",
    "MEST": "mest.yaml",
    "GMP": "gmp.yaml",
    "GraNet": "granet.yaml",
    "CHT": "cht.yaml",
    "CHTs (CH2-L3n)": "chts.yaml",
    "CHTs (CH3-L3p)": "chts_l3p.yaml",
    "CHTss": "chtss.yaml",
}
# One recipe point changed at a time (benchmarks/ablations/), run with --methods like the table's rows.
ABLATIONS = {
    "CHTs (CH2-L3n) WM-soft": "chts_wm_soft.yaml",
    "CHTs (CH2-L3n) BRF": "chts_brf.yaml",
    "CHTs (CH2-L3n) rescaled weights": "chts_rescale.yaml",
    "CHT no early stop": "cht_no_early_stop.yaml",
    "RigL kaiming init": "rigl_kaiming.yaml",
    "RigL constant zeta": "rigl_constant_zeta.yaml",
    "RigL run.py defaults": "rigl_run_py_defaults.yaml",
}
# Fashion-MNIST test accuracy (%) after 100 epochs in the CHTs paper's Table 4 (ALGORITHMS.md);
# None where the table gives no number for this MLP.
PAPER = {"FC": 90.88, "SET": 89.00, "RigL": 89.91, "MEST": None, "GMP": None, "GraNet": None,
         "CHT": 88.70, "CHTs (CH2-L3n)": 90.67, "CHTs (CH3-L3p)": 90.93, "CHTss": None}
# ANP (%) after 100 epochs where the papers give it (ALGORITHMS.md; the CHTs paper's Fashion-MNIST runs).
PAPER_ANP = {"SET": 100.0, "RigL": 55.0, "CHT": 30.0, "CHTs (CH2-L3n)": 73.0, "CHTs (CH3-L3p)": 89.0}


def policy_file(method: str) -> Path:
    """The policy a row of the table trains with (FC: the CHTs policy, for its training section)."""
    if method in ABLATIONS:
        return ROOT / "benchmarks" / "ablations" / ABLATIONS[method]
    return POLICIES / (METHODS[method] or METHODS["CHTs (CH2-L3n)"])


def training_settings(method: str) -> TrainingConfig:
    """The method's policy's training section over sparsify's defaults (FC: the CHTs policy's)."""
    policy = yaml.safe_load(policy_file(method).read_text())
    return TrainingConfig(**policy.get("training", {}))


def accuracy(model: nn.Module, test) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    model.train()
    return correct / len(test.images)


def run(method: str, seed: int, epochs: int, data, backend: str | None = None) -> dict:
    """Train one method with one seed; returns the record stored in the results file."""
    torch.manual_seed(seed)
    model = data.build_model()
    handle = None
    if method != "FC":
        policy = yaml.safe_load(policy_file(method).read_text())
        policy["seed"] = seed
        if backend:  # every rule's storage backend replaced (the policies leave it at auto)
            for rule in policy["rules"]:
                rule["backend"] = backend
        # CSTI correlates the pixels over the whole training set, as the official runs do
        calibration = [x for x, _ in data.train_data(1000)]
        model, handle = sparsify.sparsify(model, policy, data.example_inputs(), calibration)
    cfg = training_settings(method)
    train_data, test = data.train_data(cfg.batch_size), data.eval_data(1000)
    optimizer = make_optimizer(model, cfg)
    per_epoch = len(train_data)
    total = epochs * per_epoch
    if handle is not None:
        handle.attach(optimizer, total_steps=total, steps_per_epoch=per_epoch)
    curve, at_target, step, seconds = [], [], 0, 0.0
    for epoch in range(1, epochs + 1):
        train_data.set_epoch(epoch + 1000 * seed)
        start = time.perf_counter()
        for x, y in train_data:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step, per_epoch, total)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
        seconds += time.perf_counter() - start
        curve.append(accuracy(model, test))
        at_target.append(handle is None or handle.at_target())
        print(f"  {method} seed {seed} epoch {epoch}/{epochs}: test accuracy {curve[-1]:.4f} "
              f"({seconds:.0f} s)", flush=True)
    best = max((a for a, ok in zip(curve, at_target) if ok), default=None)
    record = {"method": method, "seed": seed, "epochs": epochs, "accuracy": curve[-1], "best": best,
              "curve": curve, "training": cfg.to_dict(),
              "seconds": round(seconds, 1), "date": str(datetime.date.today()), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    if handle is None:
        record.update(anp=1.0, links=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)),
                      updates=0, backends=["Linear"])
    else:
        from sparsify.topology.metrics import active_neuron_rate
        active, _ = handle.parameters_active()
        dense_out = model.fc4.weight.numel()
        record.update(anp=active_neuron_rate(handle.masks(), handle.neuron_graph()), links=active + dense_out,
                      updates=len(handle.history),
                      backends=sorted({type(s.module).__name__ for s in handle.sites.values()}),
                      # per layer: inputs and outputs that still have a link (fc1's inputs are the pixels)
                      neurons={n: [int(s.module.mask.any(0).sum()), int(s.module.mask.any(1).sum())]
                               for n, s in handle.sites.items()})
    return record


def load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def anp_as_run_py(record: dict) -> float | None:
    """ANP counted as the official ``run.py --record_anp`` counts it: a pixel or a hidden neuron is
    active when it has a link to the next sparse layer, the last hidden layer's neurons when they have
    an incoming link. sparsify's count (``anp``) takes a hidden neuron's incoming links; the two agree
    on a percolated network. From the record's per-layer counts; None for records without them."""
    if record["method"] == "FC":
        return 1.0
    n = record.get("neurons")
    if not n:
        return None
    return (n["fc1"][0] + n["fc2"][0] + n["fc3"][0] + n["fc3"][1]) / (784 + 3 * 1568)


def _mean_std(values: list[float]) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def table(records: list[dict], epochs: int) -> str:
    lines = [f"| method | seeds | final accuracy % ({epochs} epochs) | best accuracy % | ANP % | ANP % (run.py's count) | "
             "paper ANP % | links | seconds per run | paper accuracy % (100 epochs) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in {**METHODS, **ABLATIONS}:
        rows = [r for r in records if r["method"] == method and r["epochs"] == epochs]
        if not rows:
            continue
        best = [100 * r["best"] for r in rows if r.get("best") is not None]
        paper = f"{PAPER[method]:.2f}" if PAPER.get(method) is not None else "–"
        paper_anp = f"{PAPER_ANP[method]:.0f}" if method in PAPER_ANP else "–"
        counted = [100 * a for a in map(anp_as_run_py, rows) if a is not None]
        run_py = (_mean_std(counted) + (f" ({len(counted)} of {len(rows)} seeds)" if len(counted) < len(rows) else "")
                  if counted else "–")
        lines.append(f"| {method} | {len(rows)} | {_mean_std([100 * r['accuracy'] for r in rows])} | "
                     f"{_mean_std(best) if best else '–'} | {_mean_std([100 * r['anp'] for r in rows])} | "
                     f"{run_py} | {paper_anp} | {round(statistics.mean(r['links'] for r in rows)):,} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} | {paper} |")
    return "\n".join(lines)


def plot(records: list[dict], epochs: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9.5, 5))
    colours = plt.get_cmap("tab20").colors
    later = []  # the curves after their first tenth, which set the y range
    for i, method in enumerate({**METHODS, **ABLATIONS}):
        rows = [r for r in records if r["method"] == method and r["epochs"] == epochs]
        if rows:
            mean = [100 * statistics.mean(c) for c in zip(*(r["curve"] for r in rows))]
            later += mean[len(mean) // 10:]
            # the table's methods solid, the ablations dashed; markers only where they stay apart
            ax.plot(range(1, len(mean) + 1), mean, color=colours[i % len(colours)], linewidth=1.2,
                    linestyle="--" if method in ABLATIONS else "-", marker="o" if epochs <= 20 else None,
                    markersize=4, label=method)
    if later and epochs > 20:  # the first epochs' climb would squeeze the differences that matter
        ax.set_ylim(min(later) - 0.5, max(later) + 0.3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy % (mean over seeds)")
    ax.set_title(f"Fashion-MNIST MLP, hidden layers 99% sparse, {epochs} epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *ABLATIONS], metavar="METHOD",
                        help=f"subset of: {', '.join([*METHODS, *ABLATIONS])}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--table-only", action="store_true", help="print the table and plot the records; train nothing")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "fmnist_mlp.jsonl")
    parser.add_argument("--backend", choices=("masked", "csr", "auto"),
                        help="storage backend of every sparse layer (default: the policies', auto); keep such "
                             "runs in their own --results file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = example()
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · {args.epochs} epochs · seeds {args.seeds}\n", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = load(args.results)
    for seed in [] if args.table_only else args.seeds:
        for method in args.methods:
            if any(r["method"] == method and r["seed"] == seed and r["epochs"] == args.epochs for r in done):
                continue
            record = run(method, seed, args.epochs, data, args.backend)
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
    records = [r for r in done if r["method"] in args.methods and r["seed"] in args.seeds]
    print(table(records, args.epochs))
    figure = args.results.with_name(f"fmnist_mlp_{args.epochs}ep.png")
    plot(records, args.epochs, figure)
    print(f"\naccuracy curves: {figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure}")


if __name__ == "__main__":
    main()
