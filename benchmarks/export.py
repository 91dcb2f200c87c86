"""Export of a trained run: ONNX file size and onnxruntime latency against the dense model's export.

For a run folder (e.g. the Fashion-MNIST MLP trained with CHTs at 99% sparsity by
``./scripts/quickstart.sh``), export it shrunk (dead neurons removed), shrunk + compact (values +
indices) and shrunk + sparse matmul (layers at most 2% dense multiply only their links), each
beside the dense export of the same weights. onnxruntime's latency is measured on the first
evaluation batch, on its first 32 examples and on its first example, alternating the two sessions
and keeping each one's fastest run, with onnxruntime's default intra-op threads and again with one
thread for both. The model takes one tensor input, batched along its first dimension.
Run from the repository root:

    python benchmarks/export.py runs/fmnist-<time>
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
from pathlib import Path

import torch

from sparsify.export.latency import fastest
from sparsify.export.onnx_file import OnnxModel, to_onnx
from sparsify.export.pipeline import export, held_out_batches, inference_copy
from sparsify.export.run import load_run
from sparsify.inputs import ExampleInputs, first_example


def milliseconds(runs: dict[str, OnnxModel], inputs: ExampleInputs, repeat: int) -> dict[str, float]:
    """Fastest times over 12 alternations: on a shared machine, slow spells last seconds."""
    return {name: seconds * 1e3 for name, seconds in fastest(runs, inputs, repeat, rounds=12).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder with model.pt")
    parser.add_argument("--repeat", type=int, default=60)
    args = parser.parse_args()
    handle, model_file, policy, _ = load_run(args.run)
    batch = held_out_batches(model_file.module.eval_data(policy.training.get("batch_size", 32)), 1)
    example = model_file.example_inputs()
    single = first_example(ExampleInputs.of(batch[0]))
    print(f"# {datetime.date.today()} · torch {torch.__version__} · {platform.machine()} · "
          f"{torch.get_num_threads()} threads · run {args.run}\n")
    inputs = {"batch": ExampleInputs.of(batch[0]), "32": ExampleInputs.of(batch[0][:32]), "1": single}
    repeats = {"batch": args.repeat, "32": args.repeat * 4, "1": args.repeat * 10}
    print(f"| export | threads | parameters | ONNX MB | dense ONNX MB | size ratio | ms, batch of {len(batch[0])} | "
          "dense ms | ratio | ms, 32 examples | dense ms | ratio | ms, 1 example | dense ms | ratio | ORT max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = Path(tmp) / "dense.onnx"
        dense = inference_copy(handle.model)
        to_onnx(dense, ExampleInputs.of(example), dense_path)
        variants = (("shrunk", {}), ("shrunk + compact", {"compact": True}),
                    ("shrunk + sparse matmul", {"sparse_matmul": True}))
        for label, options in variants:
            out = Path(tmp) / f"{len(options)}{''.join(options)}.onnx"
            report = export(handle, example, out, held_out=batch, compare_dense=False, **options)
            exported = torch.export.load(str(out.with_suffix(".pt2"))).module()
            for threads in (None, 1):
                runs = {"shrunk": OnnxModel(out, exported, threads), "dense": OnnxModel(dense_path, dense, threads)}
                times = {k: list(milliseconds(runs, x, repeats[k]).values()) for k, x in inputs.items()}
                size, dense_size = out.stat().st_size, dense_path.stat().st_size
                print(f"| {label} | {threads or 'default'} | {report['parameters']['after']:,} of "
                      f"{report['parameters']['before']:,} | {size / 1e6:.3f} | {dense_size / 1e6:.3f} | "
                      f"{size / dense_size:.3f} | " + " | ".join(
                          f"{mine:.4f} | {dense:.4f} | {mine / dense:.2f}" for mine, dense in times.values()) +
                      f" | {report['onnxruntime_max_abs_diff']:.2g} |")

if __name__ == "__main__":
    main()
