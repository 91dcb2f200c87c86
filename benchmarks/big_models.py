"""Models too big to allocate: a LLaMA-2-7B planned on the meta device, a 1.1B model sparsified on the CPU.

Every measured part runs in a child process of its own, so its peak resident memory (``ru_maxrss``)
is its own; each child prints one JSON line, and this script prints the tables of
benchmarks/RESULTS.md. Models are Hugging Face LlamaForCausalLM built from a config (no download),
planned with examples/lm/policy.yaml (every attention and MLP projection CHTss at 70% sparsity).

- ``plan``: LLaMA-2-7B (32 layers, hidden 4096, MLP 11008, 32 heads, vocabulary 32000) built under
  ``torch.device("meta")``, then ``sparsify.plan(...)`` (capture, linear sites, coupling groups,
  plan) and the report printed (saved to results/llama2_7b_plan.txt), at example inputs of 16
  tokens.
- ``coupling``: the coupling pass alone on the same model at 16, 128 and 512 tokens, with index
  tensors dropped after their last reader (as shipped) and kept to the end (as before), and
  single-threaded (as shipped) against torch's default threads, side by side.
- ``materialise``: TinyLlama-1.1B's configuration (hidden 2048, MLP 5632, 22 layers, 32 heads,
  4 key/value heads, vocabulary 32000) planned on meta, then built with random weights on the CPU
  and sparsified (``sparsify.sparsify(..., progress=True)``); peak memory against the dense
  parameters' bytes. Needs about 1.6x the model's size free: the script checks MemAvailable first.

    python benchmarks/big_models.py plan
    python benchmarks/big_models.py coupling
    python benchmarks/big_models.py materialise [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "examples" / "lm" / "policy.yaml"
PLAN_TEXT = ROOT / "benchmarks" / "results" / "llama2_7b_plan.txt"
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
GB = 1024 ** 3


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def machine() -> str:
    import torch
    flags = open("/proc/cpuinfo").read()
    isa = "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {platform.machine()} with {isa}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# children: each prints one JSON line last

def child_plan(tokens: int) -> dict:
    t0 = time.perf_counter()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsify
    imported, base = time.perf_counter() - t0, rss()
    t = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    report = sparsify.plan(model, POLICY, {"input_ids": torch.zeros(1, tokens, dtype=torch.long)})
    text = io.StringIO()
    report.print(Console(file=text, width=240, highlight=False, color_system=None))
    PLAN_TEXT.write_text("".join(line.rstrip() + "\n" for line in text.getvalue().splitlines()))
    seconds = time.perf_counter() - t
    analysis = report.analysis
    return {"part": "plan", "tokens": tokens, "import_s": imported, "plan_s": seconds, "rss_after_import": base,
            "peak_rss": peak_rss(), "sites": len(analysis.sites.sites), "groups": len(analysis.coupling.groups),
            "sparse": len(analysis.plan.sparse), "parameters": sum(s.parameters for s in analysis.sites.sites.values())}


def child_couple(tokens: int, release: bool, one_thread: bool) -> dict:
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsify.passes import couple as couple_pass
    from sparsify.passes.capture import capture
    from sparsify.passes.find_linears import find_linears
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2_7B))
    cap = capture(model, {"input_ids": torch.zeros(1, tokens, dtype=torch.long)})
    sites = find_linears(model, cap)
    if not release:  # as before: every value and index tensor kept to the end of the run
        couple_pass._Propagator._last_uses = lambda self: {}
    if not one_thread:  # torch's default intra-op threads
        couple_pass._one_thread = contextlib.nullcontext
    base = rss()
    t = time.perf_counter()
    coupling = couple_pass.couple(cap, sites)
    seconds = time.perf_counter() - t
    return {"part": "couple", "tokens": tokens, "release": release, "one_thread": one_thread, "couple_s": seconds,
            "rss_before": base, "peak_rss": peak_rss(), "groups": len(coupling.groups)}


def child_materialise(dtype_name: str, tokens: int, backend: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    import sparsify
    policy = yaml.safe_load(POLICY.read_text())
    for rule in policy["rules"]:
        rule["backend"] = backend
    imported, base = time.perf_counter() - t0, rss()
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(**TINYLLAMA)
    inputs = {"input_ids": torch.randint(0, TINYLLAMA["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))}
    t = time.perf_counter()
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    planned = sparsify.plan(meta, policy, inputs)
    plan_s = time.perf_counter() - t
    del meta, planned
    t = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    build_s = time.perf_counter() - t
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    after_build = rss()
    t = time.perf_counter()
    model, handle = sparsify.sparsify(model, policy, inputs, progress=True)
    sparsify_s = time.perf_counter() - t
    active, total = handle.parameters_active()
    # the masks (bool) and the evolution's explored positions (packed uint8, one bit a weight)
    mask_bytes = sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype in (torch.bool, torch.uint8)
                     and b.dim() > 0 and b is not handle.evolution.rng_state)
    return {"part": "materialise", "dtype": dtype_name, "backend": backend, "tokens": tokens, "import_s": imported,
            "plan_s": plan_s,
            "build_s": build_s, "sparsify_s": sparsify_s, "dense_bytes": dense, "mask_bytes": mask_bytes,
            "rss_after_import": base, "rss_after_build": after_build, "peak_rss": peak_rss(),
            "sparse_layers": len(handle.sites), "active": active, "total": total}


# ---------------------------------------------------------------------------------------------
# the parent

def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan_table() -> None:
    print(f"`python benchmarks/big_models.py plan` · {machine()}\n")
    r = run_child("plan", "16")
    print("| model | example tokens | sites | sparse | groups | build + plan + print s | peak RSS MB | "
          "RSS after imports MB | imports s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| LLaMA-2-7B on meta ({r['parameters'] / 1e9:.2f} B linear weights) | {r['tokens']} | {r['sites']} | "
          f"{r['sparse']} | {r['groups']} | {r['plan_s']:.1f} | {r['peak_rss'] / 2**20:.0f} | "
          f"{r['rss_after_import'] / 2**20:.0f} | {r['import_s']:.1f} |")


def coupling_table() -> None:
    print(f"`python benchmarks/big_models.py coupling` · {machine()}\n")
    print("| example tokens | index tensors | threads | couple s | couple peak extra MB | groups |")
    print("|---|---|---|---|---|---|")
    cases = [(16, True, True), (16, True, False), (16, False, True), (128, True, True), (128, False, True),
             (512, True, True)]
    for tokens, release, one_thread in cases:
        c = run_child("couple", str(tokens), str(int(release)), str(int(one_thread)))
        extra = max(c["peak_rss"] - c["rss_before"], 0) / 2**20
        print(f"| {tokens} | {'dropped after last use' if release else 'all kept'} | "
              f"{'one' if one_thread else 'torch default'} | {c['couple_s']:.1f} | {extra:.0f} | {c['groups']} |",
              flush=True)


def materialise_table(dtype: str, tokens: int, backend: str) -> None:
    need = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype] * 1.10e9 * 1.6 + 1 * GB
    free = mem_available()
    if free < need:
        sys.exit(f"materialise: {free / GB:.1f} GB available, {need / GB:.1f} GB needed; try --dtype bfloat16 "
                 "or a quieter machine")
    print(f"`python benchmarks/big_models.py materialise --dtype {dtype} --backend {backend}` · {machine()}\n")
    r = run_child("materialise", dtype, str(tokens), backend)
    dense = r["dense_bytes"]
    model_peak = r["peak_rss"] - r["rss_after_import"]
    print("| model | dtype | backend | dense GB | masks GB | plan on meta s | build s | sparsify s | peak RSS GB | "
          "RSS after imports GB | peak less imports / dense | peak / dense | active / dense weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| TinyLlama-1.1B config, random weights | {dtype} | {backend} | {dense / GB:.2f} | {r['mask_bytes'] / GB:.2f} | "
          f"{r['plan_s']:.1f} | {r['build_s']:.1f} | {r['sparsify_s']:.1f} | {r['peak_rss'] / GB:.2f} | "
          f"{r['rss_after_import'] / GB:.2f} | {model_peak / dense:.2f} | {r['peak_rss'] / dense:.2f} | "
          f"{r['active']:,} / {r['total']:,} in {r['sparse_layers']} layers |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        part, args = sys.argv[2], sys.argv[3:]
        if part == "plan":
            result = child_plan(int(args[0]))
        elif part == "couple":
            result = child_couple(int(args[0]), bool(int(args[1])), bool(int(args[2])))
        else:
            result = child_materialise(args[0], int(args[1]), args[2])
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["plan", "coupling", "materialise"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=16, help="example input length for materialise")
    parser.add_argument("--backend", default="masked", choices=["masked", "auto", "csr"],
                        help="materialise: the sparse layers' storage (masked: weight + mask, what the memory "
                             "bound is about; auto picks csr for these shapes at 30%% density, 16 bytes a link)")
    args = parser.parse_args()
    if args.part == "plan":
        plan_table()
    elif args.part == "coupling":
        coupling_table()
    else:
        materialise_table(args.dtype, args.tokens, args.backend)


if __name__ == "__main__":
    main()
