"""Capture pass: a model and its example inputs become a torch.fx graph.

``torch.fx.symbolic_trace`` comes first; where it fails or gives a graph that does not
reproduce the model's output (data-dependent control flow, asserts on shapes, as in nanoGPT
and Hugging Face models), ``torch.export.export(..., strict=False)`` is the fallback. Both
give a GraphModule whose nodes carry ``nn_module_stack``, so every call maps back to a module.

A model built on the meta device (weights without storage: a model too big to allocate, planned
before it is materialised) is captured by ``torch.export`` alone, on its example inputs moved to
the meta device: eager code that reads tensor values (``.item()`` in Hugging Face's mask helpers)
and symbolic_trace's output check both need values a meta tensor does not have, while
``torch.export`` runs the model on fake tensors, where such reads are skipped or guarded.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from sparsify.csr_linear import CsrLinear
from sparsify.errors import CaptureError, first_line, user_frame
from sparsify.inputs import ExampleInputs
from sparsify.passes.graph_pass import GraphPass
from sparsify.sparse_linear import SparseLinear

log = logging.getLogger(__name__)

SYMBOLIC = "torch.fx.symbolic_trace"
EXPORT = "torch.export (strict=False)"
GIVEN = "GraphModule given"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def auto_dynamic(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """torch.export's dynamic_shapes for ``module`` called on ``args`` and ``kwargs``: every dimension
    of every tensor input dynamic where the module allows (Dim.AUTO). Keywords that ``**kwargs``
    takes must be named first (:func:`keywords_named`): torch.export refuses dynamic shapes for them."""
    def dims(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {i: torch.export.Dim.AUTO for i in range(value.dim())}
        if type(value) in (tuple, list):  # a tuple of tensors (a decoder layer's (cos, sin))
            return type(value)(dims(v) for v in value)
        if type(value) is dict:
            return {k: dims(v) for k, v in value.items()}
        return None

    if not kwargs:
        return tuple(dims(a) for a in args)
    positional = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {**{n: dims(a) for n, a in zip(positional, args)}, **{k: dims(v) for k, v in kwargs.items()}}


def keywords_named(module: nn.Module, kwargs: dict) -> nn.Module:
    """``module``, or when it takes some of ``kwargs`` through ``**kwargs`` (a Hugging Face attention
    receives position_ids and use_cache so), a shallow copy whose forward names each of them:
    torch.export makes inputs dynamic only by name, and refuses dynamic shapes for keywords behind
    ``**kwargs``. The copy shares the module's parameters and submodules, under the same names, and
    computes the same function."""
    cls = type(module)
    signature = inspect.signature(cls.forward)
    extra = [k for k in kwargs if k not in signature.parameters]
    if not extra or not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return module
    parameters = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]

    def forward(self, *args, **keywords):
        return cls.forward(self, *args, **keywords)

    forward.__signature__ = signature.replace(parameters=parameters)
    named = copy.copy(module)
    named.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    return named


@dataclass
class Capture:
    """A captured graph, how it was captured, and the flat inputs its placeholders take."""

    kind: str
    graph_module: fx.GraphModule
    flat_inputs: list
    fallback_reason: str | None = None

    def describe(self) -> str:
        if self.fallback_reason == META_REASON:
            return f"{self.kind} (symbolic_trace skipped: {self.fallback_reason})"
        if self.fallback_reason:
            return f"{self.kind} (symbolic_trace failed: {self.fallback_reason})"
        return self.kind


class LeafTracer(fx.Tracer):
    """A tracer that keeps sparsify's own modules as leaves, like torch.nn's, and traces into
    torch.nn modules that hold linear layers (nn.TransformerEncoder and its layers), so their
    linear calls are in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        linear = (nn.Linear, SparseLinear, CsrLinear)
        if isinstance(m, linear):
            return True
        if any(isinstance(child, linear) for child in m.modules()):
            return False
        return super().is_leaf_module(m, qualname)


_PASSES_DIR = (os.path.dirname(os.path.abspath(__file__)),)
_EXPORT_FRAME = re.compile(r"File: (\S+):(\d+) in \w+, code: (.*)")


def _user_frame(exc: BaseException) -> str:
    """The innermost frame of the user's code in the traceback (or in torch.export's message):
    'file:line: code'."""
    f = user_frame(exc, skip=_PASSES_DIR)
    if f is not None:
        return f"{os.path.basename(f.filename)}:{f.lineno}: {(f.line or '').strip()}"
    found = _EXPORT_FRAME.search(str(exc))
    if found:
        return f"{os.path.basename(found.group(1))}:{found.group(2)}: {found.group(3).strip()}"
    return ""


def _reason(exc: BaseException) -> str:
    where = _user_frame(exc)
    return first_line(exc) + (f" at {where}" if where else "")


def _advice(reasons: str) -> str:
    """What to change in forward(), from the captures' reasons."""
    if "DeviceMismatch" in reasons or "found at least two devices" in reasons:
        return ("make the tensors forward() creates on its input's device (torch.arange(n, device=x.device)), or "
                "register them as buffers.")
    if "numpy" in reasons:
        return "keep forward() in torch operations: .numpy() and torch.from_numpy leave the graph."
    if ".item()" in reasons or "tolist" in reasons or "TruncToInt" in reasons or "specialized integer" in reasons:
        return ("do not turn tensor values into Python numbers (.item(), .tolist(), int(tensor)); keep them "
                "tensors.")
    return ("replace Python control flow on tensor values (if tensor: ...) with torch operations "
            "(torch.where, masks).")


def _placeholder_inputs(gm: fx.GraphModule, inputs: ExampleInputs) -> list:
    """Match example inputs to a symbolically traced graph's placeholders (by position, then name)."""
    values, args = [], list(inputs.args)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = node.target.lstrip("*")
        if args:
            values.append(args.pop(0))
        elif name in inputs.kwargs:
            values.append(inputs.kwargs[name])
        elif node.args:
            values.append(node.args[0])
        else:
            raise CaptureError(f"no example input for the model's argument {name!r}")
    return values


def _same(a: Any, b: Any) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor) and (x.shape != y.shape or not torch.allclose(x, y, atol=1e-5, equal_nan=True)):
            return False
    return True


def _symbolic(model: nn.Module, inputs: ExampleInputs, reference: Any) -> Capture:
    tracer = LeafTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    flat = _placeholder_inputs(gm, inputs)
    with torch.no_grad():
        out = gm(*flat)
    if not _same(out, reference):
        raise RuntimeError("the traced graph does not reproduce the model's output on the example inputs "
                           "(control flow was specialized during tracing)")
    return Capture(SYMBOLIC, gm, flat)


def _export(model: nn.Module, inputs: ExampleInputs) -> Capture:
    # On failure torch.export prints its partial graph to stderr; the CaptureError says what matters.
    with contextlib.redirect_stderr(io.StringIO()):
        ep = torch.export.export(model, inputs.args, inputs.kwargs, strict=False)
    gm = ep.module()
    flat, _ = pytree.tree_flatten((inputs.args, inputs.kwargs))
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    flat = [x for x in flat if x is not None] if len(flat) != n_placeholders else flat
    return Capture(EXPORT, gm, flat)


def caching_configs(model: nn.Module) -> list:
    """The distinct Hugging Face configs held by ``model``'s modules that have ``use_cache`` on."""
    configs = {id(c): c for m in model.modules() if getattr(c := getattr(m, "config", None), "use_cache", None) is True}
    return list(configs.values())


@contextlib.contextmanager
def without_kv_cache(model: nn.Module):
    """Hugging Face models built with ``use_cache=True`` return a cache object that neither capture
    nor the ONNX export can carry; the graph is the same without it, so it is off meanwhile, in
    every config the model holds (an encoder-decoder's decoder has its own)."""
    configs = caching_configs(model)
    for config in configs:
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs:
            config.use_cache = True


def on_meta(model: nn.Module) -> bool:
    """Whether ``model`` holds a parameter or buffer on the meta device (built without storage)."""
    return any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def to_meta(inputs: ExampleInputs) -> ExampleInputs:
    """``inputs`` with every tensor moved to the meta device (shapes and dtypes kept)."""
    move = lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v  # noqa: E731
    return ExampleInputs(*pytree.tree_map(move, (inputs.args, inputs.kwargs)))


def capture(model: nn.Module, example_inputs: Any) -> Capture:
    """Capture ``model`` as a graph; see the module docstring for the order of attempts."""
    inputs = ExampleInputs.of(example_inputs)
    if isinstance(model, fx.GraphModule):
        return Capture(GIVEN, model, _placeholder_inputs(model, inputs))
    was_training = model.training
    model.eval()
    with without_kv_cache(model):
        if on_meta(model):
            return _capture_meta(model, to_meta(inputs), was_training)
        return _capture(model, inputs, was_training)


META_REASON = "the model is on the meta device, where its output has no values to check a trace against"


def _capture_meta(model: nn.Module, inputs: ExampleInputs, was_training: bool) -> Capture:
    try:
        result = _export(model, inputs)
    except Exception as exc:
        reason = _reason(exc)
        raise CaptureError(
            f"could not capture the model on the meta device: torch.export.export(strict=False): {reason}. "
            f"What to do: {_advice(reason)} Or capture the model with real weights (a smaller configuration of "
            "it has the same coupling per layer)."
        ) from exc
    finally:
        model.train(was_training)
    result.fallback_reason = META_REASON
    return result


def _capture(model: nn.Module, inputs: ExampleInputs, was_training: bool) -> Capture:
    try:
        try:
            with torch.no_grad():
                reference = inputs.call(model)
        except Exception as exc:
            raise CaptureError(
                f"the model fails on its own example inputs: {_reason(exc)}. "
                "Fix example_inputs() in model.py so that model(*inputs) runs."
            ) from exc
        try:
            return _symbolic(model, inputs, reference)
        except CaptureError:
            raise
        except Exception as exc:
            trace_reason = _reason(exc)
            log.info("symbolic_trace failed (%s); falling back to torch.export", trace_reason)
        try:
            result = _export(model, inputs)
        except Exception as exc:
            export_reason = _reason(exc)
            raise CaptureError(
                "could not capture the model as a graph.\n"
                f"  torch.fx.symbolic_trace: {trace_reason}\n"
                f"  torch.export.export(strict=False): {export_reason}\n"
                f"What to do: {_advice(trace_reason + export_reason)} Or move that code into a submodule that "
                "needs no sparsification, or pass a torch.fx.GraphModule you traced yourself."
            ) from exc
        result.fallback_reason = trace_reason
        return result
    finally:
        model.train(was_training)


CAPTURE = GraphPass("capture", capture, CaptureError)
