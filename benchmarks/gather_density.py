"""Where sparse matmul pays: one 1568x1568 layer exported with GatherLinear against the dense
export, by density, batch size and onnxruntime thread count.

Each density draws a uniformly random mask (seed 0); both sessions are alternated 12 times and
each keeps its fastest run. Prints the ratio gathered / dense (below 1: the gathered product is
faster). export's GATHER_DENSITY, the density up to which ``sparse_matmul`` gathers, comes from
this table. Run from the repository root:

    python benchmarks/gather_density.py
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from sparsify.export.latency import fastest
from sparsify.export.onnx_file import OnnxModel, to_onnx
from sparsify.onnx_layers import GatherLinear
from sparsify.inputs import ExampleInputs

BATCHES = (1, 32, 256)
RUNS = {1: 600, 32: 240, 256: 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1568)
    parser.add_argument("--densities", default="0.01,0.02,0.03,0.05,0.1")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {datetime.date.today()} · torch {torch.__version__} · onnxruntime {onnxruntime.__version__} · "
          f"{platform.machine()} · {args.width}x{args.width} layer\n")
    columns = [f"batch {b}, {t or 'default'} threads" for t in (None, 1) for b in BATCHES]
    print("| density | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for density in (float(d) for d in args.densities.split(",")):
            linear = nn.Linear(args.width, args.width)
            with torch.no_grad():
                linear.weight.mul_(torch.rand(args.width, args.width) < density)
            dense, gathered = nn.Sequential(linear), nn.Sequential(GatherLinear(linear))
            example = ExampleInputs.of((torch.randn(8, args.width),))
            paths = Path(tmp) / "dense.onnx", Path(tmp) / "gathered.onnx"
            to_onnx(dense, example, paths[0])
            to_onnx(gathered, example, paths[1])
            ratios = []
            for threads in (None, 1):
                for batch in BATCHES:
                    runs = {"gathered": OnnxModel(paths[1], gathered, threads), "dense": OnnxModel(paths[0], dense, threads)}
                    best = fastest(runs, ExampleInputs.of((torch.randn(batch, args.width),)), RUNS[batch], rounds=12)
                    ratios.append(best["gathered"] / best["dense"])
            print(f"| {density:g} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
