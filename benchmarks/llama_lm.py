"""A LLaMA-style byte-level language model, dense and sparse, on the Python standard library's source.

Model: Hugging Face LlamaForCausalLM from a config (no download): vocabulary 256 (bytes), hidden
192, MLP 512, 4 layers, 6 heads of 32 with 2 key/value heads (grouped-query attention), RoPE;
about 1.7 M parameters. Sparse runs make every attention and MLP projection (q, k, v, o, gate,
up, down) sparse; the embeddings and the output head stay dense.

Data: the ``.py`` files at the top level of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), sorted by name, read as bytes and joined by a NUL byte.
Every 10th file (the 10th, 20th, ...) is validation, the rest training; the script prints the file
counts and byte counts, and the split depends only on the Python version.

Training: AdamW (lr 2e-3, weight decay 0.01, linear warm-up over 5% of the steps then linear decay),
batch 8 random windows of 128 bytes (seeded), cross-entropy. Validation perplexity is
exp(mean cross-entropy) over 48 fixed windows of 129 bytes, measured every --eval-every steps.
Methods: FC, SET, RigL, CHTs, CHTss (their presets, an update every 50 steps, ζ 0.3) at each
sparsity. The last CHTss model is exported: shrunk, written to ONNX with its sparse layers stored as
values + indices, and checked in onnxruntime.

    python benchmarks/llama_lm.py --steps 400
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
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
SEQ, BATCH, LR = 128, 8, 2e-3


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


def build_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def policy(method: str, sparsity: float, seed: int) -> dict:
    rule = {"name": "attention and MLP projections", "match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"},
            "sparsity": sparsity, "method": method, "update": {"every": 50, "unit": "steps"}}
    if method != "CHTss":
        rule["removal"] = {"zeta": 0.3}
    return {"version": 1, "seed": seed, "rules": [rule]}


def windows(data: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` windows of SEQ + 1 bytes: random (with a generator) or evenly spaced."""
    if generator is None:
        starts = torch.linspace(0, len(data) - SEQ - 2, count).long()
    else:
        starts = torch.randint(0, len(data) - SEQ - 1, (count,), generator=generator)
    return torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])


def loss_of(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def perplexity(model: nn.Module, val: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        losses = [float(loss_of(model, b)) for b in val.split(16)]
    model.train()
    return math.exp(sum(losses) / len(losses))


def run(method: str, sparsity: float, seed: int, steps: int, eval_every: int, train, val) -> tuple[dict, tuple]:
    model = build_model(seed)
    handle = None
    if method != "FC":
        model, handle = sparsify.sparsify(model, policy(method, sparsity, seed),
                                          {"input_ids": torch.zeros(2, SEQ, dtype=torch.long)})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    warm = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm))))
    if handle is not None:
        handle.attach(optimizer, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    curve, seconds = [], 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        loss = loss_of(model, windows(train, BATCH, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        seconds += time.perf_counter() - start
        if step % eval_every == 0 or step == steps:
            curve.append((step, perplexity(model, val)))
            print(f"  {method} {sparsity:.0%} step {step}/{steps}: train loss {loss.detach().item():.3f}, "
                  f"validation perplexity {curve[-1][1]:.3f} ({seconds:.0f} s)", flush=True)
    record = {"method": method, "sparsity": sparsity if handle else 0.0, "seed": seed, "steps": steps,
              "perplexity": curve[-1][1], "curve": curve, "seconds": round(seconds, 1),
              "date": str(datetime.date.today()), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if handle is not None:
        active, total = handle.parameters_active()
        record.update(density=active / total, anp=handle.history[-1]["anp"] if handle.history else None,
                      updates=len(handle.history))
    return record, (model, handle)


def export(model, handle, val: torch.Tensor, folder: Path) -> dict:
    """Shrink, export to ONNX (sparse layers stored as values + indices) and check against the trained
    model on held-out windows."""
    held_out = [{"input_ids": val[i:i + 2, :-1]} for i in (0, 10, 20)]
    report = handle.export(folder / "chtss.onnx", {"input_ids": val[:2, :-1]}, held_out=held_out, compact=True)
    return {k: report[k] for k in ("parameters", "compact", "torch_max_abs_diff", "torch_limit",
                                   "onnxruntime_max_abs_diff", "tolerance", "onnxruntime_limit", "not_shrunk", "hf_config",
                                   "files", "size_ratio", "latency_ms", "latency_ratio") if k in report}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] > 0})
    fig, axes = plt.subplots(1, len(sparsities), figsize=(5 * len(sparsities), 4), sharey=True, squeeze=False)
    for ax, sparsity in zip(axes[0], sparsities):
        for r in sorted(rows, key=lambda r: METHODS.index(r["method"])):
            if r["sparsity"] in (0.0, sparsity):
                steps, ppl = zip(*r["curve"])
                ax.plot(steps, ppl, marker="o", label=r["method"])
        ax.set_title(f"{sparsity:.0%} sparse projections")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "llama_lm.jsonl")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val_bytes, info = corpus()
    val = windows(val_bytes, 48, None)
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · {args.steps} steps · seed {args.seed}")
    print(f"# data: {json.dumps(info)}\n", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(x) for x in args.results.read_text().splitlines()] if args.results.exists() else []
    last = None
    for sparsity in args.sparsities:
        for method in args.methods:
            key = (method, sparsity if method != "FC" else 0.0, args.seed, args.steps)
            if any((r["method"], r["sparsity"], r["seed"], r["steps"]) == key for r in done):
                continue
            if method == "FC" and sparsity != args.sparsities[0]:
                continue
            record, trained = run(method, sparsity, args.seed, args.steps, args.eval_every, train, val)
            if method == "CHTss":
                last = trained
            with args.results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done.append(record)
    rows = [r for r in done if r["seed"] == args.seed and r["steps"] == args.steps]
    print("| method | sparsity | validation perplexity | density | ANP | updates | seconds |\n|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["sparsity"], METHODS.index(r["method"]))):
        anp = f"{r['anp']:.3f}" if r.get("anp") is not None else "–"
        print(f"| {r['method']} | {r['sparsity']:.0%} | {r['perplexity']:.3f} | {r.get('density', 1.0):.3f} | "
              f"{anp} | {r.get('updates', 0)} | {r['seconds']:.0f} |")
    figure = args.results.with_name(f"llama_lm_{args.steps}steps.png")
    plot(rows, figure)
    print(f"\nperplexity curves: {figure}")
    if last is not None:
        with tempfile.TemporaryDirectory() as folder:
            print(json.dumps(export(*last, val, Path(folder)), indent=1, default=str))


if __name__ == "__main__":
    main()
