"""Export for inference: the trained sparse model, shrunk, to ONNX, checked against itself.

:func:`export` takes a transformed model's handle and writes, next to each other,

- ``<name>.onnx``: the shrunk model through ``torch.onnx.export(..., dynamo=True)`` (every input
  dimension left dynamic where the model allows), checked by ``onnx.checker`` and by onnxruntime,
  whose outputs must match the trained sparse model's on held-out inputs;
- ``<name>.pt2``: the shrunk model as a ``torch.export`` program, which reloads with
  ``torch.export.load`` without the model's source;
- ``<name>.json``: the report (parameters, neurons and heads before and after, parity, file
  sizes and onnxruntime latency of the dense export against the shrunk one), also returned;
- ``<name>_hf/``, for a Hugging Face model whose config can describe the shrunk sizes: its
  ``save_pretrained`` folder, written only once ``from_pretrained`` reloaded it with outputs
  matching the trained model's.

Files are written under temporary names and renamed only once every check passed: a failed
check leaves no file that looks valid.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import io
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from sparsify import checkpoint
from sparsify.errors import SparsifyError, first_line
from sparsify.files import atomic_write, temporary
from sparsify.passes.capture import (ExampleInputs, auto_dynamic, caching_configs, first_example, other_rows,
                                     replace_module)
from sparsify.passes.insert_evolution import remove_evolution
from sparsify.passes.linearize import transposed_back
from sparsify.passes.shrink import scaled_limit, shrink as shrink_pass
from sparsify.csr_linear import CsrLinear
from sparsify.onnx_layers import COMPACT_DENSITY, GATHER_DENSITY, CompactLinear, GatherLinear
from sparsify.sparse_linear import SparseLinear

OPSET = 18
TORCH_TOLERANCE = 1e-5  # the shrunk model against the trained one, in PyTorch


class ExportError(SparsifyError):
    """An export whose result does not match the trained model (or that could not be written)."""


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference: sparse layers become plain nn.Linear (inactive weights
    zero), the topology evolution is removed, eval mode, a Hugging Face model's key/value cache is
    off (an ONNX graph returns tensors only), and its mixture-of-experts layers compute their experts
    in batched matmuls (``batched_mm``, the same products): transformers' default grouped_mm runs
    a custom op with no ONNX function, and its eager loop depends on the data (Mixtral)."""
    dense = copy.deepcopy(model)
    remove_evolution(dense)
    for config in caching_configs(dense):
        config.use_cache = False
    experts = {id(c): c for m in dense.modules() if getattr(c := getattr(m, "config", None), "_experts_implementation",
                                                               "batched_mm") not in (None, "batched_mm")}
    for config in experts.values():
        config._experts_implementation = "batched_mm"
    for name, module in list(dense.named_modules()):
        if isinstance(module, (SparseLinear, CsrLinear)):
            replace_module(dense, name, module.to_linear())
    return dense.eval()


def store_sparse(model: nn.Module, compact: bool, sparse_matmul: bool) -> tuple[list[str], list[str]]:
    """Replace the plain nn.Linear layers of ``model``: those at most GATHER_DENSITY dense by a
    GatherLinear when ``sparse_matmul``, then those at most COMPACT_DENSITY dense by a
    CompactLinear when ``compact``. Returns the names of each kind."""
    gathered, compacted = [], []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        density = float(module.weight.ne(0).float().mean())
        try:
            if sparse_matmul and density <= GATHER_DENSITY:
                replace_module(model, name, GatherLinear(module))
                gathered.append(name)
            elif compact and density <= COMPACT_DENSITY:
                replace_module(model, name, CompactLinear(module))
                compacted.append(name)
        except ValueError as exc:
            raise ExportError(f"{name}: {exc}") from exc
    return gathered, compacted


def held_out_batches(data: Any, count: int = 2) -> list:
    """The inputs of the first ``count`` batches of an evaluation iterable of (inputs, targets)."""
    batches = []
    for inputs, _targets in data:
        batches.append(inputs)
        if len(batches) >= count:
            break
    return batches


def _tensors(output: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _max_diff(a: list[torch.Tensor], b: list) -> float:
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
def _quiet():
    """The exporter's progress lines and warnings would bury our own report."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def to_onnx(model: nn.Module, inputs: ExampleInputs, path: Path, opset: int = OPSET):
    """``torch.onnx.export(..., dynamo=True)`` of ``model`` to ``path`` (dynamic dims where allowed),
    through ``torch.export`` first so that its graph's ``contiguous()`` become copies (see
    :func:`_contiguous_copies`).

    With CompactLinear layers the exporter's own optimizer stays off: its constant folding would
    rebuild the dense weights into the file (onnxruntime folds them at load time instead).
    Identical initializers are stored once (constant folding can turn a buffer used by both
    branches of a GatherLinear's cond into two copies), and the nodes' debugging metadata (the
    exporter's fx nodes and Python stack traces, with local paths) is left out. Returns the
    ``torch.export`` program it exported (None when only the ONNX exporter could capture the model)."""
    dynamic = auto_dynamic(model, inputs.args, inputs.kwargs)
    compact = any(isinstance(m, CompactLinear) for m in model.modules())
    try:
        with _quiet():
            try:
                captured = torch.export.export(model, inputs.args, inputs.kwargs or None, dynamic_shapes=dynamic,
                                               strict=False)
            except Exception:  # the ONNX exporter has other ways to capture the model: let it try them
                captured = None
                program = torch.onnx.export(model, inputs.args, kwargs=inputs.kwargs or None, dynamo=True,
                                            opset_version=opset, dynamic_shapes=dynamic, verbose=False,
                                            optimize=not compact)
            else:
                _contiguous_copies(captured)
                _complex_unsqueeze_as_real(captured)
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


def _contiguous_copies(program) -> None:
    """Every ``contiguous()`` in ``program``'s graph becomes a contiguous copy (an Identity in ONNX).
    With a dynamic size that may be 1, the decomposition for ONNX finds ``x.transpose(1, 2)`` possibly
    contiguous, drops ``contiguous()``, and then cannot prove the ``view`` that follows valid
    (T5's attention fails to export); a copy always has contiguous strides."""
    changed = False
    for node in program.graph_module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.contiguous.default and len(node.args) == 1:
            node.target, node.kwargs = torch.ops.aten.clone.default, {"memory_format": torch.contiguous_format}
            changed = True
    if changed:
        program.graph_module.recompile()


def _complex_unsqueeze_as_real(program) -> None:
    """Every ``unsqueeze`` of a complex tensor in ``program``'s graph goes through the tensor's real
    view: ``view_as_complex(view_as_real(z).unsqueeze(d))``, the same values. torch.onnx stores a
    complex tensor as a real one with a last axis of 2 and has complex functions for ``mul``,
    ``view`` and the ``view_as_*``, not for ``unsqueeze``: a rotary embedding computed in complex
    numbers (Meta's LLaMA code, DeepSeek-V2's ``freqs_cis.unsqueeze(1)``) stopped the exporter with
    "No decompositions registered for the complex-valued input"."""
    graph, aten = program.graph_module.graph, torch.ops.aten
    changed = False
    for node in tuple(graph.nodes):
        value = node.meta.get("val")
        if not (node.op == "call_function" and node.target is aten.unsqueeze.default
                and isinstance(value, torch.Tensor) and value.is_complex()):
            continue
        source, dim = node.args
        dim = dim if dim >= 0 else dim - 1  # counted from the end, past the real view's last axis
        with graph.inserting_before(node):
            real = graph.call_function(aten.view_as_real.default, (source,))
            unsqueezed = graph.call_function(aten.unsqueeze.default, (real, dim))
            complex_ = graph.call_function(aten.view_as_complex.default, (unsqueezed,))
        real_value = torch.view_as_real(source.meta["val"])
        for new, val in ((real, real_value), (unsqueezed, real_value.unsqueeze(dim)), (complex_, value)):
            new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})
            new.meta["val"] = val
        node.replace_all_uses_with(complex_)
        graph.erase_node(node)
        changed = True
    if changed:
        program.graph_module.recompile()


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


class OnnxModel:
    """An onnxruntime session fed from the same inputs as the PyTorch model."""

    def __init__(self, path: Path, model: nn.Module, threads: int | None = None):
        import onnxruntime as ort

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


# Llama/BERT/NeoX/ViT..., GPT-2, OPT, Falcon, DistilBERT, T5; BART, Whisper, Marian (one per side);
# Qwen2-MoE's shared expert
MLP_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "d_ff",
                 "encoder_ffn_dim", "decoder_ffn_dim", "shared_expert_intermediate_size")


def _mlp_sizes(config) -> dict[str, int]:
    """Every key of a Hugging Face config that sizes MLPs, with its size (GPT-2's n_inner and
    Falcon's ffn_hidden_size, when None, mean 4 x the model width)."""
    defaults = {"n_inner": "n_embd", "ffn_hidden_size": "hidden_size"}
    sizes = {}
    for key in MLP_SIZE_KEYS:
        if hasattr(config, key):
            size = getattr(config, key)
            if size is None and isinstance(getattr(config, defaults.get(key, ""), None), int):
                size = 4 * getattr(config, defaults[key])
            if isinstance(size, int):
                sizes[key] = size
    return sizes


def _hf_config(shrunk: nn.Module, units: list) -> dict | None:
    """Rewrite each MLP size of a Hugging Face config (MLP_SIZE_KEYS) whose MLPs all kept the same
    width. A size kept apart for the encoder's or the decoder's MLPs counts only theirs (by module
    name); the reload check after save_pretrained tells whether the model reads what was written."""
    config = getattr(shrunk, "config", None)
    sizes = _mlp_sizes(config) if config is not None else {}
    if not sizes:
        if config is None or not units or not hasattr(shrunk, "save_pretrained"):
            return None
        return {"rewritten": False, "why": f"{type(config).__name__} has no MLP size ({', '.join(MLP_SIZE_KEYS)})"}
    rewritten, differ = {}, []
    for key, size in sizes.items():
        side = key.split("_")[0] if key.startswith(("encoder_", "decoder_")) else None
        widths = {len(u.kept) for u in units if u.width == size and (side is None or f"{side}." in u.dst)}
        if len(widths) == 1 and widths != {size}:
            rewritten[key] = widths.pop()
        elif len(widths) > 1:
            differ.append(key)
    for key, size in rewritten.items():
        setattr(config, key, size)
    why = {"why": f"the MLPs sized by {', '.join(differ)} kept different widths"} if differ else {}
    if rewritten:
        return {**rewritten, "rewritten": True, **why}
    return {**sizes, "rewritten": False, **(why or {"why": "no MLP changed width"})}


def _hf_heads(shrunk: nn.Module, heads: list, attentions: int) -> dict | None:
    """Rewrite a Hugging Face config's head counts when every attention kept the same heads (the
    head size is written out as head_dim, since the config would otherwise derive it anew). A
    config with a head size of its own but no num_key_value_heads (T5's d_kv) gets its head count
    alone, where every kv head stayed with its q head. T5's relative position bias, one column per
    head shared by a stack's attentions, is named under "narrowed": the saved folder keeps the
    kept heads' columns (see :func:`_narrow_heads`), which needs every attention to keep the same
    heads."""
    config = getattr(shrunk, "config", None)
    count = getattr(config, "num_attention_heads", None)
    if count is None or not heads:
        return None
    kept = {(len(h.kept), len(h.kept_kv)) for h in heads}
    if len(heads) != attentions or len(kept) != 1:
        return {"rewritten": False, "why": "the attentions kept different numbers of heads"}
    shared = [name for name, p in shrunk.named_parameters()
              if name.endswith(SHARED_PER_HEAD) and p.dim() == 2 and p.shape[1] == count]
    if shared and len({tuple(h.kept) for h in heads}) != 1:
        return {"rewritten": False, "why": f"the attentions kept different heads, and {shared[0]} (one column per "
                                           "head) is shared by them"}
    q_heads, kv_heads = kept.pop()
    narrowed = {"narrowed": shared} if shared else {}
    if not hasattr(config, "num_key_value_heads"):
        if not _stored(config, "head_dim"):
            return {"rewritten": False, "why": f"{type(config).__name__} has no num_key_value_heads or head_dim: its "
                                               "models derive the head size from the head count"}
        if kv_heads != q_heads:
            return {"rewritten": False, "why": f"{type(config).__name__} has no num_key_value_heads"}
        config.num_attention_heads = q_heads
        return {"rewritten": True, "num_attention_heads": q_heads, **narrowed}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // count  # written out even where the
    # config had none (Phi-3 reads it if present); the reload check tells whether the model reads it
    try:
        config.head_dim = head_dim  # unchanged here; a derived head size (Falcon's property) cannot be set
    except AttributeError:
        return {"rewritten": False, "why": f"{type(config).__name__} derives head_dim from the head count: its models "
                                           "derive the head size"}
    config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
    return {"rewritten": True, "num_attention_heads": q_heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            **narrowed}


def _stored(config, key: str) -> bool:
    """Whether a Hugging Face config holds ``key`` itself (T5's head_dim is its d_kv), rather than
    deriving it (Falcon's head_dim property) or lacking it."""
    held = vars(config)
    return held.get(key, held.get(getattr(config, "attribute_map", {}).get(key))) is not None


SHARED_PER_HEAD = "relative_attention_bias.weight"  # T5, mT5, UMT5, LongT5: [buckets, heads]


@torch.no_grad()
def _narrow_heads(model: nn.Module, names: list[str], kept: list[int]) -> None:
    """Cut the parameters ``names`` (one column per head) of the copy saved with save_pretrained to
    the kept heads' columns. The shrunk model itself keeps them whole: its attentions' graphs take
    their heads' slices of the bias they compute."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, attr)
        setattr(module, attr, nn.Parameter(param[:, kept].clone(), requires_grad=param.requires_grad))


def export(handle, example_inputs: Any, path: str | Path, *, held_out: list | None = None, shrink: bool = True,
           verify: bool = True, tolerance: float = 1e-4, opset: int = OPSET, compact: bool = False,
           sparse_matmul: bool = False, compare_dense: bool = True, latency_repeat: int = 30) -> dict:
    """Shrink the model of ``handle`` and write ``path`` (.onnx), its .pt2 and its .json report.

    ``example_inputs`` drive the export; ``held_out`` (a list of inputs of the same form) are what
    the checks compare on, by default the example inputs. ``compact`` stores layers at most half
    dense as values + int32 positions; ``sparse_matmul`` makes layers at most 2% dense multiply
    only their non-zero weights (see the report's latencies). ``tolerance`` bounds onnxruntime's max
    abs difference from the trained model, the shrunk PyTorch model's is TORCH_TOLERANCE; both scale
    with the largest output once outputs exceed 1 (:func:`scaled_limit`). Raises ExportError when a
    check fails.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"{path}: the export path must end in .onnx")
    if opset < 17:
        raise ExportError(f"opset {opset}: sparsify exports opset 17 or newer")
    path.parent.mkdir(parents=True, exist_ok=True)
    model = handle.model
    was_training = model.training
    model.eval()
    inputs = ExampleInputs.of(example_inputs)
    checks = [ExampleInputs.of(b) for b in (held_out or [example_inputs])]
    try:
        with torch.no_grad():
            reference = [_tensors(c.call(model)) for c in checks]
        dense = inference_copy(model)
        shrunk = copy.deepcopy(dense)
        result = shrink_pass(shrunk, handle.coupling, [example_inputs] + list(held_out or [])) if shrink else None
        configs = {}
        if result is not None:  # a Hugging Face config follows the shrunk sizes where it can
            configs["hf_config"] = _hf_config(shrunk, result.units)
            heads = _hf_heads(shrunk, result.heads, len(handle.coupling.attentions))
            if heads is not None:
                configs["hf_config_heads"] = heads
        pretrained = None
        if hasattr(shrunk, "save_pretrained"):  # before storage swaps; in the model class's own layers
            pretrained = copy.deepcopy(shrunk)
            transposed_back(pretrained, handle.analysis.linearized)
            if configs.get("hf_config_heads", {}).get("narrowed"):
                _narrow_heads(pretrained, configs["hf_config_heads"]["narrowed"], result.heads[0].kept)
        nonzero = sum(int(torch.count_nonzero(t)) for t in shrunk.parameters())  # before storage swaps
        gathered, compacted = store_sparse(shrunk, compact, sparse_matmul)
        other = other_rows(checks[0]) if gathered else None
        if other is not None:  # a gathered layer branches on one row or several: check both
            checks.append(other)
            with torch.no_grad():
                reference.append(_tensors(other.call(model)))
        with torch.no_grad():
            torch_diff = max(_max_diff(r, _tensors(c.call(shrunk))) for r, c in zip(reference, checks))
        limit = scaled_limit(TORCH_TOLERANCE, tree_leaves(reference))
        if not torch_diff <= limit:
            raise ExportError(f"the shrunk model differs from the trained model by {torch_diff:.3g} "
                              f"(limit {limit:.3g}); no file was written. Export with shrink off "
                              "(--no-shrink) and report this model")
        report: dict = {"onnx": str(path), "opset": opset, "shrink": shrink, "compact": compacted,
                        "sparse_matmul": gathered,
                        "torch_max_abs_diff": torch_diff, "torch_limit": limit}
        if result is not None:
            report["parameters"] = {"before": result.parameters_before, "after": result.parameters_after,
                                    "nonzero": nonzero}
            report["units"] = [u.to_json() for u in result.units]
            report["heads"] = [h.to_json() for h in result.heads]
            report["not_shrunk"] = result.skipped
            report.update(configs)
        written = _write(shrunk, dense, inputs, checks, reference, path, report, verify, tolerance, opset,
                         compare_dense, latency_repeat)
        if pretrained is not None:
            hints = [c["why"] for c in configs.values() if c and c.get("why") not in (None, "no MLP changed width")]
            report["hf_pretrained"] = _save_pretrained(pretrained, path.with_name(path.stem + "_hf"), checks, reference,
                                                       limit, getattr(model.config, "use_cache", None),
                                                       "; ".join(hints))
        report["files"] = written
        atomic_write(path.with_suffix(".json"), lambda f: json.dump(report, f, indent=2))
        return report
    finally:
        model.train(was_training)


def fastest(runtimes: dict, inputs: ExampleInputs, repeat: int, rounds: int = 3) -> dict:
    """Each runtime's fastest run on ``inputs`` in seconds, alternating them ``rounds`` times
    (``repeat`` runs each in all)."""
    best = {name: float("inf") for name in runtimes}
    for _ in range(rounds):
        for name, runtime in runtimes.items():
            best[name] = min(best[name], runtime.latency(inputs, max(1, repeat // rounds)))
    return best


def _write(shrunk, dense, inputs, checks, reference, path, report, verify, tolerance, opset, compare_dense,
           latency_repeat) -> dict:
    onnx_tmp, dense_tmp, pt2_tmp = temporary(path), temporary(path), temporary(path.with_suffix(".pt2"))
    try:
        captured = to_onnx(shrunk, inputs, onnx_tmp, opset)
        import onnx

        try:
            onnx.checker.check_model(str(onnx_tmp), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejects the exported model: {exc}") from exc
        runtime = OnnxModel(onnx_tmp, shrunk)
        if verify:
            diff = max(_max_diff(r, runtime.run(c)) for r, c in zip(reference, checks))
            report["onnxruntime_max_abs_diff"] = diff
            report["tolerance"] = tolerance  # as given; the limit scales it (scaled_limit)
            limit = report["onnxruntime_limit"] = scaled_limit(tolerance, tree_leaves(reference))
            if not diff <= limit:
                raise ExportError(f"onnxruntime's outputs differ from the trained model's by {diff:.3g} "
                                  f"(limit {limit:.3g}); no file was written")
        with _quiet():
            program = captured or torch.export.export(shrunk, inputs.args, inputs.kwargs or None,
                                                      dynamic_shapes=auto_dynamic(shrunk, inputs.args, inputs.kwargs))
            with open(pt2_tmp, "wb") as f:  # through a file object, the archive's root is not the temporary name
                torch.export.save(program, f)
        sizes = {"onnx_bytes": onnx_tmp.stat().st_size, "pt2_bytes": pt2_tmp.stat().st_size}
        if compare_dense:
            to_onnx(dense, inputs, dense_tmp, opset)
            dense_runtime = OnnxModel(dense_tmp, dense)

            def timed(key: str, runtimes: dict, on: ExampleInputs, repeat: int) -> None:
                seconds = fastest(runtimes, on, repeat)
                report[key + "_ms"] = {k: round(v * 1e3, 4) for k, v in seconds.items()}
                report[key + "_ratio"] = seconds["shrunk"] / seconds["dense"]

            timed("latency", {"dense": dense_runtime, "shrunk": runtime}, checks[0], latency_repeat)
            one = first_example(checks[0])
            if one is not None:  # the latency of a single example, where small batches differ most
                timed("latency_one_example", {"dense": dense_runtime, "shrunk": runtime}, one, latency_repeat * 5)
                # and with one onnxruntime thread each, as a server running a worker per core would:
                # a gathered product gains nothing from more threads, a dense one does
                timed("latency_one_example_one_thread", {"dense": OnnxModel(dense_tmp, dense, threads=1),
                                                         "shrunk": OnnxModel(onnx_tmp, shrunk, threads=1)},
                      one, latency_repeat * 5)
            sizes["dense_onnx_bytes"] = dense_tmp.stat().st_size
            report["size_ratio"] = sizes["onnx_bytes"] / sizes["dense_onnx_bytes"]
        os.replace(onnx_tmp, path)
        os.replace(pt2_tmp, path.with_suffix(".pt2"))
        return {**sizes, "pt2": str(path.with_suffix(".pt2"))}
    finally:
        for tmp in (onnx_tmp, dense_tmp, pt2_tmp):
            tmp.unlink(missing_ok=True)
            Path(str(tmp) + ".data").unlink(missing_ok=True)


def _save_pretrained(model: nn.Module, folder: Path, checks: list, reference: list, limit: float, use_cache: Any,
                     hint: str) -> dict:
    """``save_pretrained`` of a shrunk Hugging Face model, kept only when ``from_pretrained`` reloads
    it with its config and its outputs are within ``limit`` of the trained model's (the shrunk
    model's limit)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        if use_cache is not None:
            model.config.use_cache = use_cache  # as trained; off only while checking
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):  # transformers' own progress bars
            try:
                model.save_pretrained(tmp)
            except Exception as exc:  # a secondary artifact: the ONNX and .pt2 stand, the report says why
                return {"written": False, "why": f"save_pretrained failed: {type(exc).__name__}: {exc}"}
            try:
                cache = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
                loaded = type(model).from_pretrained(tmp, **cache).eval()
            except Exception as exc:  # the config does not describe the shrunk sizes
                return {"written": False, "why": "from_pretrained cannot reload it: its config does not describe "
                        f"the shrunk sizes ({'; '.join(filter(None, [hint, _unlike_config(model)])) or first_line(exc)[:300]})"}
        with torch.no_grad():
            diff = max(_max_diff(r, _tensors(c.call(loaded))) for r, c in zip(reference, checks))
        if not diff <= limit:
            return {"written": False, "why": f"reloaded, its outputs differ by {diff:.3g} (limit {limit:.3g})"}
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return {"written": True, "folder": str(folder), "max_abs_diff": diff}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unlike_config(model: nn.Module) -> str:
    """The weights of a Hugging Face ``model`` whose shapes its config does not give (a model of its
    class built from its config, on the meta device, for the shapes only)."""
    try:
        with torch.device("meta"):
            built = type(model)(model.config)
    except Exception:  # noqa: BLE001 - only a better reason is at stake
        return ""
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    unlike = [f"{k} {list(v.shape)} where the config gives {list(expected[k])}" for k, v in model.state_dict().items()
              if k in expected and tuple(v.shape) != expected[k]]
    return "; ".join(unlike[:3]) + (f"; {len(unlike) - 3} more" if len(unlike) > 3 else "")


def print_report(report: dict) -> None:
    """A summary of an export a person can read."""
    lines = [f"exported {report['onnx']} (opset {report['opset']}) and {report['files']['pt2']}"]
    if "parameters" in report:
        p = report["parameters"]
        lines.append(f"  parameters {p['before']:,} -> {p['after']:,} ({p['after'] / max(p['before'], 1):.1%}), "
                     f"{p['nonzero']:,} of them non-zero")
        for u in report["units"]:
            split = "".join(f"; {a} set to {w}" for a, w in u.get("rewritten", {}).items())
            lines.append(f"  {' + '.join(u['layers'])} -> {u['into']}: {u['kept']} of {u['neurons']} neurons kept "
                         f"({u['unused']} unused, {u['folded']} constant folded, {u['zero']} zero{split})")
        for h in report.get("heads", []):
            layers = ' + '.join(dict.fromkeys(h['layers']))  # a fused qkv layer once
            split = "".join(f"; {a} set to {w}" for a, w in h.get("rewritten", {}).items())
            split += "".join(f"; {a} cut to the kept heads" for a in h.get("narrowed", []))
            if h.get("traced") is not None:
                split += f"; {h['traced'] or 'the model'} runs as its graph with the head sizes rewritten"
            lines.append(f"  {layers} -> {h['into']}: {h['kept']} of {h['heads']} heads kept "
                         f"({h['kept_kv']} of {h['kv_heads']} kv heads; {h['folded']} dead groups' bias folded{split})")
        for dst, why in report.get("not_shrunk", {}).items():
            lines.append(f"  not shrunk: input of {dst}: {why}")
    if report["compact"]:
        lines.append(f"  stored as values + indices: {', '.join(report['compact'])}")
    if report.get("sparse_matmul"):
        lines.append(f"  multiplying only their non-zero weights: {', '.join(report['sparse_matmul'])}")
    check = report.get("onnxruntime_max_abs_diff")
    lines.append(f"  parity: PyTorch {report['torch_max_abs_diff']:.2g} (limit {report['torch_limit']:.2g})"
                 + (f", onnxruntime {check:.2g} (limit {report['onnxruntime_limit']:.2g})" if check is not None else
                    ", onnxruntime not checked"))
    pretrained = report.get("hf_pretrained")
    if pretrained:
        lines.append(f"  from_pretrained folder: {pretrained['folder']} (reloaded, max abs diff {pretrained['max_abs_diff']:.2g})"
                     if pretrained["written"] else f"  no from_pretrained folder: {pretrained['why']}")
    files = report["files"]
    if "dense_onnx_bytes" in files:
        lines.append(f"  size {files['onnx_bytes'] / 1e6:.2f} MB vs dense export {files['dense_onnx_bytes'] / 1e6:.2f} MB "
                     f"({report['size_ratio']:.3f}x)")
        lines.append(f"  onnxruntime latency {report['latency_ms']['shrunk']:.3f} ms vs {report['latency_ms']['dense']:.3f} ms "
                     f"dense ({report['latency_ratio']:.2f}x)"
                     + "".join(f"; {label} {report[key + '_ms']['shrunk']:.3f} ms vs {report[key + '_ms']['dense']:.3f} ms "
                               f"({report[key + '_ratio']:.2f}x)" for key, label in
                               (("latency_one_example", "one example"),
                                ("latency_one_example_one_thread", "one example on one thread"))
                               if key + "_ms" in report))
    print("\n".join(lines))


def load_run(source: str | Path):
    """The trained model of a run (its folder, model.pt or checkpoint.pt), rebuilt from its model.py:
    (handle, model file, policy, the file read)."""
    from sparsify.api import sparsify
    from sparsify.model_file import load_model_file
    from sparsify.policy import load_policy

    source = Path(source)
    file = source / "model.pt" if source.is_dir() else source
    if not file.exists():
        raise ExportError(f"{source}: no model.pt in this folder; give a run folder, model.pt or checkpoint.pt"
                          if source.is_dir() else f"{source}: no such file")
    saved = checkpoint.read(file)
    state, document, model_path = saved.get("state_dict", saved.get("model")), saved["policy"], saved["model_file"]
    model_file = load_model_file(model_path)
    policy = load_policy(document)
    model, handle = sparsify(model_file.build_model(), policy, model_file.example_inputs(),
                             _calibration_for(model_file, policy))
    checkpoint.load_state(model, state, file, model_path)
    return handle, model_file, policy, file


POLICY_OPTIONS = ("shrink", "verify", "tolerance", "opset", "compact", "sparse_matmul")  # the policy's export: keys export() takes


def export_trained(handle, model_file, policy, out: Path, eval_data: Any = None, **overrides: Any) -> dict:
    """Export a trained model as its policy's ``export`` section says (``overrides`` that are not
    None win), checked on the first batches of ``eval_data``; prints the summary."""
    options = {**{k: policy.export[k] for k in POLICY_OPTIONS if k in policy.export},
               **{k: v for k, v in overrides.items() if v is not None}}
    held_out = held_out_batches(eval_data) if eval_data is not None else None
    report = export(handle, model_file.example_inputs(), out, held_out=held_out, **options)
    print_report(report)
    return report


def export_run(source: str | Path, out: str | Path | None = None, **options: Any) -> dict:
    """Export a training run (its folder, model.pt or checkpoint.pt) the way :func:`export` does,
    checked on the first batches of its eval_data."""
    handle, model_file, policy, file = load_run(source)
    eval_data = None
    if model_file.has("eval_data"):
        eval_data = model_file.module.eval_data(policy.training.get("batch_size", 32))
    return export_trained(handle, model_file, policy, Path(out) if out else file.parent / "model.onnx",
                          eval_data, **options)


def _calibration_for(model_file, policy):
    from sparsify.train import TRAINING_DEFAULTS, _calibration

    return _calibration(model_file, policy, {**TRAINING_DEFAULTS, **policy.training}) if model_file.has("train_data") else None
