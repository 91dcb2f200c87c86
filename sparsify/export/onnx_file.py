"""Writing the ONNX file and the .pt2 program, and checking them: ``onnx.checker``, and
onnxruntime's outputs against the trained model's."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from sparsify.errors import ExportError, first_line
from sparsify.inputs import ExampleInputs
from sparsify.onnx_layers import CompactLinear
from sparsify.passes.capture import auto_dynamic
from sparsify.passes.pipeline import onnx_fixups
from sparsify.passes.shrink import scaled_limit

OPSET = 18


def tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def max_diff(a: list[torch.Tensor], b: list) -> float:
    if len(a) != len(b):
        raise ExportError(f"the exported model gives {len(b)} outputs, the trained model {len(a)}")
    diff = 0.0
    for x, y in zip(a, b):
        y = torch.as_tensor(y)
        if tuple(x.shape) != tuple(y.shape):
            raise ExportError(f"an output has shape {tuple(y.shape)} in the export, {tuple(x.shape)} in the trained model")
        if x.numel():
            diff = max(diff, float((x.double() - y.double()).abs().max()))
    return diff


@contextlib.contextmanager
def quiet():
    """The exporter's progress lines and warnings would bury our own report."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def to_onnx(model: nn.Module, inputs: ExampleInputs, path: Path, opset: int = OPSET, dynamic: Any = "auto"):
    """``torch.onnx.export(..., dynamo=True)`` of ``model`` to ``path`` (dynamic dims where allowed),
    through ``torch.export`` first so that its graph's ``contiguous()`` become copies (see
    :mod:`sparsify.passes.contiguous_copies`).

    With CompactLinear layers the exporter's own optimizer stays off: its constant folding would
    rebuild the dense weights into the file (onnxruntime folds them at load time instead).
    Identical initializers are stored once (constant folding can turn a buffer used by both
    branches of a GatherLinear's cond into two copies), and the nodes' debugging metadata (the
    exporter's fx nodes and Python stack traces, with local paths) is left out. ``dynamic`` is
    torch.export's dynamic_shapes ("auto": every dimension where the model allows; None: static).
    Returns the ``torch.export`` program it exported (None when only the ONNX exporter could
    capture the model)."""
    if isinstance(dynamic, str) and dynamic == "auto":
        dynamic = auto_dynamic(model, inputs.args, inputs.kwargs)
    compact = any(isinstance(m, CompactLinear) for m in model.modules())
    try:
        with quiet():
            try:
                captured = torch.export.export(model, inputs.args, inputs.kwargs or None, dynamic_shapes=dynamic,
                                               strict=False)
            except Exception:  # the ONNX exporter has other ways to capture the model: let it try them
                captured = None
                program = torch.onnx.export(model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True,
                                            opset_version=opset, dynamic_shapes=dynamic, verbose=False,
                                            optimize=not compact)
            else:
                onnx_fixups(captured)
                program = torch.onnx.export(captured, dynamo=True, opset_version=opset, verbose=False,
                                            optimize=not compact)
            _store_once(program.model)
            for graph in program.model.graphs():
                for node in graph:
                    node.metadata_props.clear()
            program.save(str(path))
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {first_line(exc)}" + "".join(
            f"\n  caused by {first_line(cause)}" for cause in _causes(exc))) from exc
    return captured


def _store_once(model) -> None:
    """Point every use of an initializer equal to an earlier one (dtype, shape and bytes) of the
    same graph at that one, and drop it (an onnx_ir model, changed in place)."""
    for graph in model.graphs():
        kept: dict[tuple, Any] = {}
        for initializer in tuple(graph.initializers.values()):
            value = initializer.const_value
            if value is None or initializer.is_graph_input() or initializer.is_graph_output():
                continue
            data = value.numpy()  # (ascontiguousarray would turn a scalar into shape [1])
            key = (value.dtype, data.shape, hashlib.sha256(np.ascontiguousarray(data).tobytes()).digest())
            if key in kept and np.array_equal(kept[key].const_value.numpy(), data):
                initializer.replace_all_uses_with(kept[key])
                graph.initializers.pop(initializer.name)
            else:
                kept.setdefault(key, initializer)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exceptions behind ``exc`` (torch.onnx puts the actual reason there), innermost last."""
    chain, seen = [], {id(exc)}
    while (exc := exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
    return chain[-2:]


def check_onnx(path: Path) -> None:
    """``onnx.checker`` (full check) of the file at ``path``; ExportError when it rejects it."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects the exported model: {exc}") from exc


def onnxruntime_parity(runtime: "OnnxModel", checks: list, reference: list, tolerance: float) -> dict:
    """onnxruntime's max abs difference from the trained model's outputs ``reference`` on ``checks``,
    with its limit (``tolerance`` scaled, see :func:`~sparsify.passes.shrink.scaled_limit`); ExportError
    beyond the limit."""
    diff = max(max_diff(r, runtime.run(c)) for r, c in zip(reference, checks))
    limit = scaled_limit(tolerance, tree_leaves(reference))
    if not diff <= limit:
        raise ExportError(f"onnxruntime's outputs differ from the trained model's by {diff:.3g} "
                          f"(limit {limit:.3g}); no file was written")
    # the tolerance as given; the limit scales it (scaled_limit)
    return {"onnxruntime_max_abs_diff": diff, "tolerance": tolerance, "onnxruntime_limit": limit}


def write_pt2(captured, model: nn.Module, inputs: ExampleInputs, path: Path) -> None:
    """The ``torch.export`` program of ``model`` (``captured``, or captured now) saved to ``path``."""
    with quiet():
        program = captured or torch.export.export(model, inputs.args, inputs.kwargs or None,
                                                  dynamic_shapes=auto_dynamic(model, inputs.args, inputs.kwargs))
        with open(path, "wb") as f:  # through a file object, the archive's root is not the temporary name
            torch.export.save(program, f)


class OnnxModel:
    """An onnxruntime session fed from the same inputs as the PyTorch model."""

    def __init__(self, path: Path, model: nn.Module, threads: int | None = None):
        import onnxruntime as ort  # lazy: loading onnxruntime takes a while, and only sessions need it

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.model = model

    def feed(self, inputs: ExampleInputs) -> dict:
        bound = inspect.signature(self.model.forward).bind(*inputs.args, **inputs.kwargs).arguments
        named = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
        if all(n in named for n in self.names):
            return {n: named[n].detach().cpu().numpy() for n in self.names}
        tensors = [t for t in tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]
        return {n: t.detach().cpu().numpy() for n, t in zip(self.names, tensors)}

    def run(self, inputs: ExampleInputs) -> list:
        return self.session.run(None, self.feed(inputs))

    def latency(self, inputs: ExampleInputs, repeat: int) -> float:
        feed = self.feed(inputs)
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            self.session.run(None, feed)
            best = min(best, time.perf_counter() - start)
        return best
