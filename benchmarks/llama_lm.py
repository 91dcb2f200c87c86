"""A LLaMA-style byte-level language model, dense and sparse, on the Python standard library's source.

The papers' language-model comparison (FC, SET, RigL, CHTs, CHTss at 70% and 90% sparsity, several
seeds, validation perplexity mean ± std) at a size a CPU trains: one record per finished run is
appended to a JSON-lines file, so a long sweep can stop and resume; rows already there are skipped.

Model: Hugging Face LlamaForCausalLM from a config (no download): vocabulary 256 (bytes), hidden
--hidden, MLP --intermediate, --layers blocks, heads of 32 with a third as many key/value heads
(grouped-query attention), RoPE, initialiser std 0.02. Sparse runs make every attention and MLP
projection (q, k, v, o, gate, up, down) sparse at the same sparsity; embeddings, norms and the
output head stay dense.

Data: the ``.py`` files at the top level of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), sorted by name, read as bytes and joined by a NUL byte.
Every 10th file (the 10th, 20th, ...) is validation, the rest training; the split depends only on
the Python version. Validation perplexity is exp(mean cross-entropy) over --val-windows fixed
windows, every --eval-every steps; the record's perplexity is the last one.

Training: the official LLaMA recipe of the Cannistraci-Hebb papers' code (docs/fidelity.md) at a
smaller batch: Adam without weight decay, lr 3e-3, linear warm-up over the first 10% of the steps,
then cosine to 0.1x; the lr is re-warmed linearly over the first 10 steps of every 100; on a step
that ends with a topology update the optimizer step is skipped (that batch's gradient is only
used for the update). The same loop and schedule for every method, FC included.

Besides the perplexity curve, each sparse run records the survival of the links every update grows
(see ``Survival``) and the share of positions ever active; ``--override`` swaps one field of every
sparse method's rule, for an ablation of one point of the recipe.

Methods (the official llm/ settings where they are defined; the CHTss preset is that recipe):
- CHTss: its preset unchanged (sigmoid density decay from 50% by RI, soft |W| removal with T 1 -> 9,
  ζ 0.1 on a cosine, CH2-L3n top-k regrowth, BRF r 0.3 with uniform degrees, the model's weights,
  an update every 100 steps until 75% of training, no percolation);
- CHTs: the same without the density decay (the official llm/ CHTs command); sparsify's CHTs
  preset is the MLP recipe, so the rule restates the LLaMA one;
- SET, RigL: their presets' removal and regrowth (|W| hard; random / dense-gradient regrowth; ER
  start) on the LLaMA runs' common schedule: an update every 100 steps until 75% of training,
  ζ 0.1 (RigL's on a cosine), the model's weights.

    python benchmarks/llama_lm.py --seeds 0 1 2 --sparsities 0.7 0.9 --threads 1
    python benchmarks/llama_lm.py --seeds 0 1 2 --sparsities 0.7 --threads 1 --steps 2000 \\
        --hidden 288 --intermediate 768 --layers 6 --results benchmarks/results/llama_lm_5m.jsonl

The learning-rate sweep at 70% (FC below the recipe's rate, where it trains better; the sparse
methods above it), then its tables: each method at each rate, and the methods ranked each at its
best rate (the 3e-3 runs are the first command's):

    python benchmarks/llama_lm.py --seeds 0 1 2 --sparsities 0.7 --threads 1 --lr 5e-4 1e-3 2e-3 \\
        --methods FC --results benchmarks/results/llama_lm_lr.jsonl
    python benchmarks/llama_lm.py --seeds 0 1 2 --sparsities 0.7 --threads 1 --lr 1e-3 2e-3 5e-3 \\
        --methods SET RigL CHTs CHTss --results benchmarks/results/llama_lm_lr.jsonl
    python benchmarks/llama_lm.py --table-only --sparsities 0.7 --lr 5e-4 1e-3 2e-3 3e-3 5e-3 \\
        --results benchmarks/results/llama_lm_lr.jsonl benchmarks/results/llama_lm.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import sparsify

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["FC", "SET", "RigL", "CHTs", "CHTss"]
LR, WARMUP, MIN_LR, EVERY, REWARM, T_END, ZETA = 3e-3, 0.1, 0.1, 100, 10, 0.75, 0.1
# LLaMA-60M on OpenWebText, validation perplexity at 70% sparsity (the CHTss paper's table).
PAPER_70 = {"FC": 26.56, "CHTss": 27.62, "CHTs": 28.12, "SET": 31.77, "RigL": 39.96}


def corpus() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, description) from the standard library's top-level .py files."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = [], []
    for i, path in enumerate(files, start=1):
        (val if i % 10 == 0 else train).append(path.read_bytes())
    join = lambda parts: torch.frombuffer(bytearray(b"\0".join(parts)), dtype=torch.uint8).long()  # noqa: E731
    info = {"stdlib": sysconfig.get_paths()["stdlib"], "python": platform.python_version(),
            "train_files": len(train), "val_files": len(val),
            "train_bytes": sum(map(len, train)), "val_bytes": sum(map(len, val))}
    return join(train), join(val), info


def build_model(seed: int, shape: dict) -> nn.Module:
    torch.manual_seed(seed)
    heads = shape["hidden"] // 32
    config = LlamaConfig(vocab_size=256, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=heads,
                         num_key_value_heads=heads // 3,
                         max_position_embeddings=shape["seq"], initializer_range=0.02,
                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def policy(method: str, sparsity: float, seed: int, every: int = EVERY, override: dict | None = None) -> dict:
    """The rule of ``method`` on the seven projections (see the module docstring); ``every``: the
    topology update interval in steps (the recipe's 100 unless an ablation changes it); ``override``:
    fields that replace the rule's (whole fields: ``{"regrowth": {"predictor": "random"}}`` replaces
    the regrowth), for an ablation of one point of the recipe."""
    rule = {"name": "attention and MLP projections", "match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"},
            "sparsity": sparsity, "method": method, "backend": "masked"}  # the same layers in every run, at any load
    if method == "CHTs":  # the official llm/ CHTs command: CHTss's recipe without the density decay
        rule.update(init={"model": "BRF", "r": 0.3, "degrees": "uniform", "weights": "keep"},
                    removal={"score": "WM", "mode": "soft", "delta": {"start": 0.5, "end": 0.9},
                             "ramp": "temperature", "zeta": ZETA, "zeta_schedule": "cosine"},
                    regrowth={"predictor": "CH2_L3n", "mode": "hard"}, percolation=False,
                    update={"every": every, "unit": "steps"}, t_end=T_END)
    elif method in ("SET", "RigL"):  # the LLaMA runs' common schedule, each method's own criteria
        rule.update(init={"model": "ER", "weights": "keep"}, removal={"zeta": ZETA},
                    update={"every": every, "unit": "steps"}, t_end=T_END)
    elif method == "CHTss" and every != EVERY:
        rule["update"] = {"every": every, "unit": "steps"}
    rule.update(override or {})
    return {"version": 1, "seed": seed, "rules": [rule]}


class Survival:
    """Whether the links an update grows last: at every update, of the links grown at the one before,
    the share this update's removal keeps, beside the same share for the older links (the rest of
    the mask). A predictor that grows links the loss needs should see them grow large enough to
    outlast the next removal; random links start at zero and go first. A link removed and grown
    again in the same update restarts at zero (the layer resets it, and the optimizer's state), so
    it counts as removed, and as grown: after an update, the links at exactly zero are the ones it
    grew and the others are the ones it kept."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.grown: dict[str, torch.Tensor] = {}  # per layer, the links the last update grew
        self.after: dict[str, torch.Tensor] = {}  # and its mask after it
        self.rows: list[dict] = []
        handle.evolution.listeners.append(self)

    def __call__(self, record: dict) -> None:
        masks = self.handle.masks()
        row = {"step": record["step"], "grown": 0, "grown_kept": 0, "older": 0, "older_kept": 0}
        for name in record["layers"]:
            grown = masks[name] & (self.handle.sites[name].module.weight == 0)
            kept = masks[name] & ~grown
            if name in self.grown:
                last, older = self.grown[name], self.after[name] & ~self.grown[name]
                row["grown"] += int(last.sum())
                row["grown_kept"] += int((last & kept).sum())
                row["older"] += int(older.sum())
                row["older_kept"] += int((older & kept).sum())
            self.grown[name], self.after[name] = grown, masks[name].clone()
        if row["grown"]:
            self.rows.append(row)


def lr_factor(step: int, steps: int) -> float:
    """The official schedule's factor at optimizer step ``step`` (0-based): a linear warm-up over
    WARMUP of the steps, then cosine to MIN_LR, times a linear re-warm over the first REWARM steps of
    every EVERY."""
    warm = max(1, int(WARMUP * steps))
    if step < warm:
        base = step / warm
    else:
        base = MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
    return base * min(1.0, (step % EVERY) / REWARM)


def windows(data: torch.Tensor, count: int, seq: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` windows of seq + 1 bytes: random (with a generator) or evenly spaced."""
    if generator is None:
        starts = torch.linspace(0, len(data) - seq - 2, count).long()
    else:
        starts = torch.randint(0, len(data) - seq - 1, (count,), generator=generator)
    return torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def perplexity(model: nn.Module, val: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(loss_of(model, b)) for b in val.split(16)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def run(method: str, sparsity: float, seed: int, lr: float, args, train, val) -> tuple[dict, tuple]:
    shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "seq": args.seq}
    model = build_model(seed, shape)
    parameters = sum(p.numel() for p in model.parameters())
    handle = None
    if method != "FC":
        model, handle = sparsify.sparsify(model, policy(method, sparsity, seed, args.update_every, args.override),
                                          {"input_ids": torch.zeros(2, args.seq, dtype=torch.long)})
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.steps))
    evolution = None
    if handle is not None:
        handle.attach(optimizer, total_steps=args.steps, hook=False)
        evolution = handle.evolution
        survival = Survival(handle)
    generator = torch.Generator().manual_seed(seed)
    curve, seconds, skipped = [], 0.0, 0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = loss_of(model, windows(train, args.batch, args.seq, generator))
        optimizer.zero_grad()
        loss.backward()
        if evolution is not None and any(evolution.due(n, evolution.step_index + 1) for n in evolution.evolving):
            skipped += 1  # the official loop: an update step trains nothing, the update uses its gradient
        else:
            optimizer.step()
        if evolution is not None:
            evolution.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, perplexity(model, val)))
            print(f"  {method} {sparsity:.0%} seed {seed} lr {lr:g} step {step}/{args.steps}: "
                  f"train loss {loss.detach().item():.3f}, validation perplexity {curve[-1][1]:.3f} ({seconds:.0f} s)",
                  flush=True)
    record = {"method": method, "sparsity": sparsity if handle else 0.0, "seed": seed, "steps": args.steps,
              "model": shape, "batch": args.batch, "update_every": args.update_every, "lr": lr, "parameters": parameters,
              **({"override": args.override} if args.override else {}),
              "perplexity": curve[-1][1], "best": min(p for _, p in curve), "curve": curve,
              "seconds": round(seconds, 1), "s_per_step": round(seconds / args.steps, 4),
              "date": str(datetime.date.today()), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if handle is not None:
        active, total = handle.parameters_active()
        record.update(density=active / total, anp=handle.history[-1]["anp"] if handle.history else None,
                      updates=len(handle.history), skipped_steps=skipped, kept=survival.rows)
        if handle.history:  # the share of the positions ever active (in-time over-parameterisation), all layers
            sizes = {n: m.numel() for n, m in handle.masks().items()}
            last = handle.history[-1]["layers"]
            record["itop"] = sum(last[n]["itop"] * sizes[n] for n in last) / sum(sizes[n] for n in last)
    return record, (model, handle)


def read(path: Path) -> list[dict]:
    """The records of ``path`` (none if it does not exist)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def export(model, handle, val: torch.Tensor, folder: Path) -> dict:
    """Shrink, export to ONNX (sparse layers stored as values + indices) and check against the trained
    model on held-out windows."""
    held_out = [{"input_ids": val[i:i + 2, :-1]} for i in (0, 10, 20)]
    report = handle.export(folder / "chtss.onnx", {"input_ids": val[:2, :-1]}, held_out=held_out, compact=True)
    return {k: report[k] for k in ("parameters", "compact", "torch_max_abs_diff", "torch_limit",
                                   "onnxruntime_max_abs_diff", "tolerance", "onnxruntime_limit", "not_shrunk", "hf_config",
                                   "files", "size_ratio", "latency_ms", "latency_ratio") if k in report}


def levels(rows: list[dict]) -> list[float]:
    """The sparsities of the sparse runs among ``rows``, in order (FC's 0 is not one)."""
    return sorted({r["sparsity"] for r in rows if r["sparsity"] > 0})


def summary(rows: list[dict], sparsities: list[float] | None = None) -> list[dict]:
    """Mean ± sample std of the final perplexity per (sparsity, method); FC joins every sparsity (by
    default those of the sparse rows)."""
    out = []
    sparsities = sparsities or levels(rows) or [0.0]
    for sparsity in sparsities:
        for method in METHODS:
            runs = [r for r in rows if r["method"] == method and r["sparsity"] == (0.0 if method == "FC" else sparsity)]
            if not runs:
                continue
            ppl = [r["perplexity"] for r in runs]
            out.append({"sparsity": sparsity, "method": method, "n": len(runs), "mean": statistics.mean(ppl),
                        "std": statistics.stdev(ppl) if len(ppl) > 1 else float("nan"),
                        "per_seed": [(r["seed"], r["perplexity"]) for r in sorted(runs, key=lambda r: r["seed"])],
                        "anp": statistics.mean(r["anp"] for r in runs) if runs[0].get("anp") is not None else None,
                        "seconds": statistics.mean(r["seconds"] for r in runs)})
    return out


def table(rows: list[dict], sparsities: list[float] | None = None) -> str:
    lines = ["| sparsity | method | seeds | validation perplexity (mean ± std) | per seed | rank "
             "| paper (70%, LLaMA-60M) | paper rank | ANP | s/run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    paper_rank = {m: i + 1 for i, m in enumerate(sorted(PAPER_70, key=PAPER_70.get))}
    stats = summary(rows, sparsities)
    for sparsity in sorted({s["sparsity"] for s in stats}):
        group = [s for s in stats if s["sparsity"] == sparsity]
        rank = {s["method"]: i + 1 for i, s in enumerate(sorted(group, key=lambda s: s["mean"]))}
        for s in group:
            std = f"{s['std']:.3f}" if s["n"] > 1 else "–"
            anp = f"{s['anp']:.3f}" if s["anp"] is not None else "–"
            per_seed = ", ".join(f"s{seed} {p:.3f}" for seed, p in s["per_seed"])
            paper = f"{PAPER_70[s['method']]:.2f} | {paper_rank[s['method']]}" if sparsity == 0.7 else "– | –"
            lines.append(f"| {sparsity:.0%} | {s['method']} | {s['n']} | {s['mean']:.3f} ± {std} | {per_seed} | "
                         f"{rank[s['method']]} | {paper} | {anp} | {s['seconds']:.0f} |")
    return "\n".join(lines)


PAIRS = [("CHTss", "CHTs"), ("CHTs", "SET"), ("CHTs", "RigL"), ("CHTss", "SET"), ("SET", "RigL")]


def paired(rows: list[dict]) -> str:
    """The difference in final perplexity between two methods, one value per seed they share (a run
    and its counterpart share the data order and the dense weights); negative: the first is better."""
    lines = ["| sparsity | " + " | ".join(f"{a} − {b}" for a, b in PAIRS) + " |", "|---" * (len(PAIRS) + 1) + "|"]
    for sparsity in levels(rows):
        ppl = {(r["method"], r["seed"]): r["perplexity"] for r in rows if r["sparsity"] == sparsity}
        cells = []
        for a, b in PAIRS:
            seeds = sorted(s for m, s in ppl if m == a and (b, s) in ppl)
            cells.append(", ".join(f"{ppl[a, s] - ppl[b, s]:+.3f}" for s in seeds) or "–")
        lines.append(f"| {sparsity:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def survival_table(rows: list[dict]) -> str:
    """Per method, the share of the links an update grew that the next update's removal keeps, the same
    share for the older links (over all updates and layers, then mean ± std over seeds) and the share
    of positions ever active (see ``Survival``); runs recorded before the measures existed are left out."""
    lines = ["| sparsity | method | seeds | grown links kept | older links kept | grown / older | positions ever active |",
             "|---" * 7 + "|"]
    fmt = lambda v: f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"  # noqa: E731
    for sparsity in levels(rows):
        for method in METHODS[1:]:
            chosen = [r for r in rows if r["method"] == method and r["sparsity"] == sparsity and r.get("kept")]
            if not chosen:
                continue
            runs, itop = [r["kept"] for r in chosen], [r["itop"] for r in chosen if "itop" in r]
            total = lambda run, key: sum(u[key] for u in run)  # noqa: E731
            grown = [total(u, "grown_kept") / total(u, "grown") for u in runs]
            older = [total(u, "older_kept") / total(u, "older") for u in runs]
            lines.append(f"| {sparsity:.0%} | {method} | {len(runs)} | {fmt(grown)} | {fmt(older)} | "
                         f"{fmt([g / o for g, o in zip(grown, older)])} | {fmt(itop) if itop else '–'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def panels(count: int):
    """A figure of ``count`` panels side by side, one per sparsity, sharing the y axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, count, figsize=(5 * count, 4), sharey=True, squeeze=False)


def save(fig, axes, ylabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], path: Path) -> None:
    sparsities = levels(rows) or [0.0]
    fig, axes = panels(len(sparsities))
    for ax, sparsity in zip(axes[0], sparsities):
        for method in METHODS:
            runs = [r for r in rows if r["method"] == method and r["sparsity"] == (0.0 if method == "FC" else sparsity)]
            if not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            mean = [statistics.mean(r["curve"][i][1] for r in runs) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=f"{method} ({len(runs)} seeds)")
        ax.set_title(f"{sparsity:.0%} sparse projections")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, axes, "validation perplexity (mean over seeds)", path)


def per_rate(rows: list[dict], lrs: list[float]) -> dict[float, dict[tuple[float, str], dict]]:
    """``summary`` at each rate, keyed by (sparsity, method); FC joins the sweep's sparsities."""
    sparsities = levels(rows) or [0.0]
    return {lr: {(s["sparsity"], s["method"]): s for s in summary([r for r in rows if r.get("lr", LR) == lr], sparsities)}
            for lr in lrs}


def sweep(rows: list[dict], lrs: list[float]) -> str:
    """Each method at each peak learning rate (final perplexity, mean ± std over seeds), its best rate
    (lowest mean) and the ranking of the methods each at its best rate. The rate is chosen on the
    validation windows that also report the perplexity: there is no third split."""
    lines = ["| sparsity | method | " + " | ".join(f"lr {lr:g}" for lr in lrs)
             + f" | best lr | rank at best lr | rank at lr {LR:g} | paper rank |", "|---" * (len(lrs) + 6) + "|"]
    paper_rank = {m: i + 1 for i, m in enumerate(sorted(PAPER_70, key=PAPER_70.get))}
    at = per_rate(rows, lrs)
    for sparsity in sorted({key[0] for table in at.values() for key in table}):
        methods = [m for m in METHODS if any((sparsity, m) in at[lr] for lr in lrs)]
        best = {m: min((lr for lr in lrs if (sparsity, m) in at[lr]), key=lambda lr: at[lr][sparsity, m]["mean"])
                for m in methods}
        tuned = {m: i + 1 for i, m in enumerate(sorted(methods, key=lambda m: at[best[m]][sparsity, m]["mean"]))}
        recipe = sorted((m for m in methods if (sparsity, m) in at.get(LR, {})), key=lambda m: at[LR][sparsity, m]["mean"])
        for m in methods:
            cells = []
            for lr in lrs:
                s = at[lr].get((sparsity, m))
                if s is None:
                    cells.append("–")
                    continue
                cell = f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']})" if s["n"] > 1 else f"{s['mean']:.3f} (1)"
                cells.append(f"**{cell}**" if lr == best[m] else cell)
            rank = recipe.index(m) + 1 if m in recipe else "–"
            lines.append(f"| {sparsity:.0%} | {m} | " + " | ".join(cells)
                         + f" | {best[m]:g} | {tuned[m]} | {rank} | {paper_rank[m] if sparsity == 0.7 else '–'} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], lrs: list[float], path: Path) -> None:
    """Final perplexity against the peak learning rate, one line per method (mean ± std over seeds)."""
    sparsities, at = levels(rows) or [0.0], per_rate(rows, lrs)
    fig, axes = panels(len(sparsities))
    for ax, sparsity in zip(axes[0], sparsities):
        for method in METHODS:
            points = [(lr, at[lr][sparsity, method]) for lr in lrs if (sparsity, method) in at[lr]]
            if points:
                ax.errorbar([lr for lr, _ in points], [s["mean"] for _, s in points],
                            yerr=[0 if s["n"] < 2 else s["std"] for _, s in points], marker="o", capsize=3, label=method)
        ax.set_title(f"{sparsity:.0%} sparse projections")
        ax.set_xlabel("peak learning rate")
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, axes, "final validation perplexity", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps per run (a multiple of 100)")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--hidden", type=int, default=192, help="a multiple of 96 (heads of 32, a third as many key/value heads)")
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--val-windows", type=int, default=128)
    parser.add_argument("--update-every", type=int, default=EVERY,
                        help="topology update interval in steps of every sparse method (the recipe: 100; "
                             "the lr re-warm stays every 100)")
    parser.add_argument("--lr", type=float, nargs="+", default=[LR],
                        help="peak learning rate (default: the recipe's 3e-3); several: a sweep, which also prints each "
                             "method at each rate and the methods ranked each at its best rate")
    parser.add_argument("--override", type=json.loads, default=None, metavar="JSON",
                        help="fields that replace those of every sparse method's rule, for an ablation of one point "
                             "of the recipe, e.g. '{\"regrowth\": {\"predictor\": \"random\"}}'; recorded, and a sweep "
                             "skips only runs with the same override")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--export", action="store_true", help="export the last CHTss model to ONNX and check it")
    parser.add_argument("--results", type=Path, nargs="+", default=[ROOT / "benchmarks" / "results" / "llama_lm.jsonl"],
                        help="JSON-lines records: new runs are appended to the first file; every file is read, "
                             "to skip the runs already done and for the tables")
    parser.add_argument("--table-only", action="store_true", help="print the tables and plot the records; train nothing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val_bytes, info = corpus()
    val = windows(val_bytes, args.val_windows, args.seq, None)
    shape = {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "seq": args.seq}
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · {args.steps} steps · seeds {args.seeds} · model {shape} · "
          f"batch {args.batch} · lr {' '.join(f'{lr:g}' for lr in args.lr)}")
    print(f"# data: {json.dumps(info)}\n", flush=True)
    out = args.results[0]
    out.parent.mkdir(parents=True, exist_ok=True)

    def read_all() -> list[dict]:
        return [r for path in args.results for r in read(path)]

    def same(r: dict) -> bool:
        return (r["steps"] == args.steps and r.get("model") == shape and r.get("batch") == args.batch
                and r.get("update_every", EVERY) == args.update_every and r.get("override") == args.override)

    last = None
    for lr in [] if args.table_only else args.lr:
        for sparsity in args.sparsities:
            for seed in args.seeds:
                for method in args.methods:
                    target = 0.0 if method == "FC" else sparsity
                    done = read_all()  # again before each run: another sweep may have written it
                    if any(same(r) and (r["method"], r["sparsity"], r["seed"], r.get("lr", LR)) == (method, target, seed, lr)
                           for r in done):
                        continue
                    record, trained = run(method, sparsity, seed, lr, args, train, val)
                    if method == "CHTss":
                        last = trained
                    with out.open("a") as f:
                        f.write(json.dumps(record) + "\n")
    rows = [r for r in read_all() if same(r) and r["seed"] in args.seeds and r.get("lr", LR) in args.lr
            and (r["sparsity"] in args.sparsities or r["method"] == "FC") and r["method"] in args.methods]
    for lr in args.lr:
        at = [r for r in rows if r.get("lr", LR) == lr]
        if len(args.lr) > 1:
            print(f"\n## lr {lr:g}\n")
        print(table(at, levels(rows) or None))
        print("\nPaired by seed, the difference in perplexity (negative: the first method is better):\n")
        print(paired(at))
        if kept := survival_table(at):
            print("\nThe links each update grows, kept by the next update's removal, beside the older links:\n")
            print(kept)
    figure = out.with_suffix(".png")
    if len(args.lr) > 1:
        print("\nEach method at each peak learning rate (bold: its best), and ranked at its best rate:\n")
        print(sweep(rows, args.lr))
        plot_sweep(rows, args.lr, figure)
        print(f"\nperplexity against the learning rate: {figure}")
    else:
        plot(rows, figure)
        print(f"\nperplexity curves: {figure}")
    if args.export and last is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(export(*last, val, Path(folder)), indent=1, default=str))


if __name__ == "__main__":
    main()
