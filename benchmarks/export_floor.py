"""The floor of a gathered export: how fast onnxruntime can run an unpercolated 99%-sparse MLP with
its standard operators, against the dense export and against the least work any per-link form does.

The papers' MLP (784-1568-1568-1568-10), its three hidden layers at 1% density with uniformly random
masks (every neuron keeps links: nothing to shrink), the output layer dense. Three onnxruntime graphs
per thread setting, alternated and each kept at its fastest run:

- dense: the dense export (``nn.Linear`` layers);
- gathered: the export ``sparse_matmul`` writes (GatherLinear layers, parity checked here);
- floor: only the gathering such a product cannot avoid, one operator a layer, plus the dense output
  layer: for one example, one GatherElements of the layer's links from the input row (the fastest
  per-element gather onnxruntime has); for a batch, one Gather of a batch column per link from the
  transposed input (contiguous blocks). No multiply, no sum, no layout change: any gathered product
  with onnxruntime's standard operators does at least this.

``floor / dense`` is the lowest time ratio a gathered export can reach on this machine; the goal is
out of reach where it exceeds the goal. Run from the repository root:

    python benchmarks/export_floor.py
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sparsify.export.onnx_file import to_onnx
from sparsify.inputs import ExampleInputs
from sparsify.onnx_layers import GatherLinear

SIZES = (784, 1568, 1568, 1568, 10)
GOALS = {1: 0.2, 1000: 0.4}


def build(density: float, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(4):
        linear = nn.Linear(SIZES[i], SIZES[i + 1])
        if i < 3:
            with torch.no_grad():
                linear.weight.mul_(torch.rand(linear.weight.shape) < density)
        layers += [linear] + ([nn.ReLU()] if i < 3 else [])
    return nn.Sequential(*layers)


def gathered(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[GatherLinear(m) if isinstance(m, nn.Linear) and i < 6 else m for i, m in enumerate(model)])


def output_layer(head: nn.Linear, h: str, one: bool) -> tuple[list, list]:
    """The dense output layer reading ``h``: a row ([1, in]) for one example, else the transposed
    activations ([in, batch]), as Wᵀ-form product with the bias broadcast over the batch."""
    weight, bias = head.weight.detach().numpy(), head.bias.detach().numpy()
    if one:
        inits = [numpy_helper.from_array(weight.T.copy(), "wo"), numpy_helper.from_array(bias, "bo")]
        return [helper.make_node("Gemm", [h, "wo", "bo"], ["y"])], inits
    inits = [numpy_helper.from_array(weight, "wo"), numpy_helper.from_array(bias.reshape(-1, 1), "bo")]
    return [helper.make_node("Gemm", ["wo", h, "bo"], ["y"])], inits


def as_model(name: str, nodes: list, inits: list, x, outputs: list) -> onnx.ModelProto:
    proto = helper.make_model(helper.make_graph(nodes, name, [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def floor_graph(model: nn.Sequential, batch: int) -> onnx.ModelProto:
    """The gathering of every hidden layer's links from the input (each layer reads the input, so the
    operators are independent of one another) and the dense output layer."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZES[1]] if batch == 1 else [SIZES[1], batch])
    nodes, inits, outputs = [], [], []
    for i, linear in enumerate(linears[:3]):
        columns = torch.nonzero(linear.weight.detach())[:, 1].numpy().astype(np.int64)
        if batch == 1:
            inits.append(numpy_helper.from_array(columns.reshape(1, -1), f"idx{i}"))
            nodes.append(helper.make_node("GatherElements", ["x", f"idx{i}"], [f"g{i}"], axis=1))
        else:
            inits.append(numpy_helper.from_array(columns, f"idx{i}"))
            nodes.append(helper.make_node("Gather", ["x", f"idx{i}"], [f"g{i}"], axis=0))
        outputs.append(helper.make_tensor_value_info(f"g{i}", TensorProto.FLOAT, None))
    head_nodes, head_inits = output_layer(linears[3], "x", batch == 1)
    outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    return as_model("floor", nodes + head_nodes, inits + head_inits, x, outputs)


def ideal_graph(model: nn.Sequential, batch: int, reduce: str) -> onnx.ModelProto:
    """The whole gathered product as if every neuron held exactly its layer's mean number of links:
    one bin a layer, no padding, no branch on the batch size; the links are the layer's first
    ``rows x mean`` ones. For one example GatherElements, multiply, sum; for a batch, on transposed
    activations, Gather of batch columns, then multiply and sum (``reduce`` "sum") or a batched
    matmul ("matmul")."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    one = batch == 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIZES[0]] if one else [SIZES[0], batch])
    nodes, inits, h = [], [], "x"
    for i, linear in enumerate(linears[:3]):
        n = linear.out_features
        d = max(1, int(linear.weight.count_nonzero()) // n)
        nz = torch.nonzero(linear.weight.detach())[: n * d]
        columns, values = nz[:, 1].numpy().astype(np.int64), linear.weight.detach()[nz[:, 0], nz[:, 1]].numpy()
        bias = linear.bias.detach().numpy()
        if one:
            inits += [numpy_helper.from_array(columns.reshape(1, -1), f"idx{i}"),
                      numpy_helper.from_array(values.reshape(n, d), f"w{i}"),
                      numpy_helper.from_array(np.array([n, d], np.int64), f"shape{i}"),
                      numpy_helper.from_array(bias.reshape(1, n), f"b{i}")]
            nodes += [helper.make_node("GatherElements", [h, f"idx{i}"], [f"g{i}"], axis=1),
                      helper.make_node("Reshape", [f"g{i}", f"shape{i}"], [f"r{i}"]),
                      helper.make_node("Mul", [f"r{i}", f"w{i}"], [f"m{i}"]),
                      helper.make_node("ReduceSum", [f"m{i}", "axis1"], [f"s{i}"], keepdims=0),
                      helper.make_node("Unsqueeze", [f"s{i}", "axis0"], [f"u{i}"]),
                      helper.make_node("Add", [f"u{i}", f"b{i}"], [f"a{i}"]),
                      helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        else:
            inits += [numpy_helper.from_array(columns, f"idx{i}"),
                      numpy_helper.from_array(np.array([n, d, batch], np.int64), f"shape{i}"),
                      numpy_helper.from_array(bias.reshape(n, 1), f"b{i}")]
            nodes += [helper.make_node("Gather", [h, f"idx{i}"], [f"g{i}"], axis=0),
                      helper.make_node("Reshape", [f"g{i}", f"shape{i}"], [f"r{i}"])]
            if reduce == "sum":
                inits.append(numpy_helper.from_array(values.reshape(n, d, 1), f"w{i}"))
                nodes += [helper.make_node("Mul", [f"r{i}", f"w{i}"], [f"m{i}"]),
                          helper.make_node("ReduceSum", [f"m{i}", "axis1"], [f"s{i}"], keepdims=0)]
            else:
                inits += [numpy_helper.from_array(values.reshape(n, 1, d), f"w{i}"),
                          numpy_helper.from_array(np.array([n, batch], np.int64), f"flat{i}")]
                nodes += [helper.make_node("MatMul", [f"w{i}", f"r{i}"], [f"m{i}"]),
                          helper.make_node("Reshape", [f"m{i}", f"flat{i}"], [f"s{i}"])]
            nodes += [helper.make_node("Add", [f"s{i}", f"b{i}"], [f"a{i}"]), helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        h = f"h{i}"
    head_nodes, head_inits = output_layer(linears[3], h, one)
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axis1"),
              numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    return as_model("ideal", nodes + head_nodes, inits + head_inits, x,
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def session(path_or_bytes, threads: int | None) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def fastest(runs: dict, rounds: int, repeat: int) -> dict[str, float]:
    """Each (session, feed)'s fastest run in seconds, alternating them ``rounds`` times."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (s, feed) in runs.items():
            for _ in range(repeat):
                start = time.perf_counter()
                s.run(None, feed)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    model = build(args.density, args.seed).eval()
    sparse = gathered(model).eval()
    links = sum(int(m.weight.count_nonzero()) for m in list(model)[:6] if isinstance(m, nn.Linear))
    print(f"# {datetime.date.today()} · torch {torch.__version__} · onnxruntime {onnxruntime.__version__} · "
          f"{platform.machine()} · MLP {'-'.join(map(str, SIZES))}, hidden layers at {args.density:.0%} "
          f"({links:,} links), output layer dense\n")
    print("| batch | threads | dense ms | gathered ms | gathered / dense | ideal product ms | ideal / dense | "
          "gathering alone ms | gathering alone / dense | goal |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        example = ExampleInputs.of((torch.randn(8, SIZES[0]),))
        paths = {"dense": Path(tmp) / "dense.onnx", "gathered": Path(tmp) / "gathered.onnx"}
        to_onnx(model, example, paths["dense"])
        to_onnx(sparse, example, paths["gathered"])
        for batch in GOALS:
            x = torch.randn(batch, SIZES[0], generator=torch.Generator().manual_seed(1))
            hidden = torch.randn(batch, SIZES[1], generator=torch.Generator().manual_seed(2)).numpy()
            floor_bytes = floor_graph(model, batch).SerializeToString()
            ideals = {f"ideal {r}": ideal_graph(model, batch, r).SerializeToString()
                      for r in (("sum",) if batch == 1 else ("sum", "matmul"))}
            for threads in (None, 1):
                sessions = {k: session(str(p), threads) for k, p in paths.items()}
                sessions["floor"] = session(floor_bytes, threads)
                sessions.update({k: session(b, threads) for k, b in ideals.items()})
                feeds = {k: {sessions[k].get_inputs()[0].name: x.numpy()} for k in paths}
                feeds["floor"] = {"x": hidden if batch == 1 else np.ascontiguousarray(hidden.T)}
                feeds.update({k: {"x": x.numpy() if batch == 1 else np.ascontiguousarray(x.numpy().T)} for k in ideals})
                with torch.no_grad():
                    expected = model(x).numpy()
                diff = float(np.abs(sessions["gathered"].run(None, feeds["gathered"])[0] - expected).max())
                if diff > 1e-4:
                    raise SystemExit(f"the gathered export differs from the model by {diff:.2e}")
                best = fastest({k: (sessions[k], feeds[k]) for k in sessions}, args.rounds, 20 if batch == 1 else 2)
                d, g, f = (best[k] * 1e3 for k in ("dense", "gathered", "floor"))
                i = min(best[k] for k in ideals) * 1e3
                print(f"| {batch} | {threads or 'default'} | {d:.4f} | {g:.4f} | {g / d:.3f} | {i:.4f} | {i / d:.3f} | "
                      f"{f:.4f} | {f / d:.3f} | {GOALS[batch]} |", flush=True)


if __name__ == "__main__":
    main()
