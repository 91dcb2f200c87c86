"""Export for inference, step by step: the trained sparse model, shrunk, to ONNX, checked against itself.

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
import errno
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from sparsify.csr_linear import CsrLinear
from sparsify.errors import ExportError, SparsifyError, first_line
from sparsify.export.huggingface import narrow_heads, rewrite_head_counts, rewrite_mlp_sizes, save_pretrained
from sparsify.export.latency import compare_with_dense
from sparsify.export.onnx_file import (OnnxModel, check_onnx, max_diff, onnxruntime_parity, tensors, to_onnx,
                                      write_pt2)
from sparsify.export.options import ExportOptions
from sparsify.export.report import print_report
from sparsify.export.shapes import Shapes, declared, dynamic_shapes, positions, resized, second_sizes, tensors_of
from sparsify.files import os_error, replace, temporary
from sparsify.inputs import ExampleInputs, other_rows
from sparsify.passes.capture import caching_configs, replace_module
from sparsify.passes.insert_evolution import remove_evolution
from sparsify.passes.linearize import transposed_back
from sparsify.passes.pipeline import shrink_model
from sparsify.passes.shrink import scaled_limit
from sparsify.passes.store_sparse import STORE_SPARSE
from sparsify.sparse_linear import SparseLinear

TORCH_TOLERANCE = 1e-5  # the shrunk model against the trained one, in PyTorch


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


def held_out_batches(data: Any, count: int = 2) -> list:
    """The inputs of the first ``count`` batches of an evaluation iterable of (inputs, targets)."""
    batches = []
    for inputs, _targets in data:
        batches.append(inputs)
        if len(batches) >= count:
            break
    return batches


@contextlib.contextmanager
def _step(name: str, what_to_do: str):
    """An exception from torch, onnx or onnxruntime inside step ``name`` becomes an ExportError that
    names the step and says what to do (the cause stays chained); sparsify's own errors pass as they are."""
    try:
        yield
    except SparsifyError:
        raise
    except Exception as exc:
        raise ExportError(f"export step '{name}' failed: {first_line(exc)}; no file was written. {what_to_do}") from exc


REPORT_IT = "Export with shrink off (--no-shrink) and report this model"


def export(handle, example_inputs: Any, path: str | Path, *, held_out: list | None = None,
           shrink: bool = ExportOptions.shrink, verify: bool = ExportOptions.verify,
           tolerance: float = ExportOptions.tolerance, opset: int = ExportOptions.opset,
           compact: bool = ExportOptions.compact, sparse_matmul: bool = ExportOptions.sparse_matmul,
           static_shapes: bool = ExportOptions.static_shapes, compare_dense: bool = True,
           latency_repeat: int = 30) -> dict:
    """Shrink the model of ``handle`` and write ``path`` (.onnx), its .pt2 and its .json report.

    ``example_inputs`` drive the export; ``held_out`` (a list of inputs of the same form) are what
    the checks compare on, by default the example inputs. ``compact`` stores layers at most half
    dense as values + int32 positions; ``sparse_matmul`` makes layers at most 2% dense multiply
    only their non-zero weights (see the report's latencies). ``static_shapes`` fixes every input
    dimension at the example inputs' size; otherwise each dimension the file declares dynamic is
    checked at a second size and fixed where it fails (the report's ``shapes`` names the fixed
    ones, their sizes and why). ``tolerance`` bounds onnxruntime's max
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
        with _step("run the trained model on the check inputs", "Check that held_out has the example inputs' form"), \
                torch.no_grad():
            reference = [tensors(c.call(model)) for c in checks]
        dense = inference_copy(model)
        shrunk = copy.deepcopy(dense)
        with _step("shrink", REPORT_IT):
            result = shrink_model(shrunk, handle.coupling, [example_inputs] + list(held_out or [])) if shrink else None
        configs = {}
        if result is not None:  # a Hugging Face config follows the shrunk sizes where it can
            configs["hf_config"] = rewrite_mlp_sizes(shrunk, result.units)
            heads = rewrite_head_counts(shrunk, result.heads, len(handle.coupling.attentions))
            if heads is not None:
                configs["hf_config_heads"] = heads
        pretrained = None
        if hasattr(shrunk, "save_pretrained"):  # before storage swaps; in the model class's own layers
            pretrained = copy.deepcopy(shrunk)
            transposed_back(pretrained, handle.analysis.linearized)
            if configs.get("hf_config_heads", {}).get("narrowed"):
                narrow_heads(pretrained, configs["hf_config_heads"]["narrowed"], result.heads[0].kept)
        nonzero = sum(int(torch.count_nonzero(t)) for t in shrunk.parameters())  # before storage swaps
        gathered, compacted = STORE_SPARSE(shrunk, compact, sparse_matmul, after="shrink")
        other = other_rows(checks[0]) if gathered else None
        if other is not None:  # a gathered layer branches on one row or several: check both
            checks.append(other)
            with torch.no_grad():
                reference.append(tensors(other.call(model)))
        with _step("check the shrunk model in PyTorch", REPORT_IT), torch.no_grad():
            torch_diff = max(max_diff(r, tensors(c.call(shrunk))) for r, c in zip(reference, checks))
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
        finals = (path, path.with_suffix(".pt2"), path.with_suffix(".json"))
        temps = [temporary(final) for final in finals]
        try:
            with _writing(path):
                written = _write(model, shrunk, dense, inputs, checks, reference, path, temps[0], temps[1], report,
                                 verify, tolerance, opset, static_shapes, compare_dense, latency_repeat)
                if pretrained is not None:
                    hints = [c["why"] for c in configs.values() if c and c.get("why") not in (None, "no MLP changed width")]
                    report["hf_pretrained"] = save_pretrained(pretrained, path.with_name(path.stem + "_hf"), checks,
                                                              reference, limit, getattr(model.config, "use_cache", None),
                                                              "; ".join(hints))
                report["files"] = written
                with open(temps[2], "w") as f:
                    json.dump(report, f, indent=2)
                for tmp, final in zip(temps, finals):  # only once everything is written and checked
                    replace(tmp, final)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
                Path(str(tmp) + ".data").unlink(missing_ok=True)
        return report
    finally:
        model.train(was_training)


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)


@contextlib.contextmanager
def _writing(path: Path):
    """A write of the export's files that the operating system refuses (a full disk, a read-only
    folder) becomes an ExportError naming the folder; nothing is left behind (the caller's cleanup)."""
    try:
        yield
    except Exception as exc:
        cause = os_error(exc)
        if cause is None or cause.errno not in DISK_ERRORS:
            raise
        raise ExportError(f"{path.parent}: cannot write the export there ({cause.strerror}); no file was written. "
                          "Free space on that disk, or export elsewhere (-o)") from exc


def _write(model, shrunk, dense, inputs, checks, reference, path, onnx_tmp, pt2_tmp, report, verify, tolerance, opset,
           static_shapes, compare_dense, latency_repeat) -> dict:
    """The ONNX file and the .pt2 program of ``shrunk``, written to ``onnx_tmp`` and ``pt2_tmp`` and
    checked (and timed against ``dense`` when ``compare_dense``); returns their sizes. The caller
    renames them once everything is written.

    Every dimension the file declares dynamic is run at a second size; one that fails there (or
    that the trained model itself runs at no other size) is exported again as fixed, at the example
    inputs' size. The checks run at the fixed sizes (held-out inputs cut or grown to them), and the
    report's ``shapes`` says which dimensions are fixed, at what size, and why."""
    dense_tmp = temporary(path)
    fixed: set | None = None if static_shapes else set()
    why: dict = {}
    try:
        while True:
            captured = to_onnx(shrunk, inputs, onnx_tmp, opset, dynamic_shapes(shrunk, inputs, fixed))
            check_onnx(onnx_tmp)
            with _step("check the ONNX file in onnxruntime", "The file fails on inputs like the held-out ones: "
                       "export with static shapes (--static-shapes), or report this model"):
                runtime = OnnxModel(onnx_tmp, shrunk)
                sizes, numbered = declared(onnx_tmp)
                at = positions(runtime.names, runtime.feed(inputs), inputs)
                specialised = {(at[n], d) for n, d in numbered if n in at} - (fixed or set())
                if specialised and fixed is not None:  # declared dynamic, served at one size: export it fixed
                    fixed |= specialised
                    continue
                shapes, fitted, fitted_reference = _fit(model, runtime, sizes, at, inputs, checks, reference, why,
                                                        static_shapes)
                if verify:
                    report.update(onnxruntime_parity(runtime, fitted, fitted_reference, tolerance))
                failed = _second_sizes(model, runtime, shapes, fitted[0], tolerance) if verify else {}
            if not failed or fixed is None:
                break
            why.update(failed)
            fixed |= set(failed)
        report["shapes"] = shapes.to_json()
        with _step("write the .pt2 program", "Export with the example inputs torch.export captured, or report this model"):
            write_pt2(captured, shrunk, inputs, pt2_tmp)
        sizes = {"onnx_bytes": onnx_tmp.stat().st_size, "pt2_bytes": pt2_tmp.stat().st_size}
        if compare_dense:
            sizes["dense_onnx_bytes"] = compare_with_dense(report, shrunk, onnx_tmp, runtime, dense, dense_tmp, inputs,
                                                           fitted[0], opset, latency_repeat,
                                                           one_example=not any(f["dim"] == 0 for f in shapes.fixed))
            report["size_ratio"] = sizes["onnx_bytes"] / sizes["dense_onnx_bytes"]
        return {**sizes, "pt2": str(path.with_suffix(".pt2"))}
    finally:
        dense_tmp.unlink(missing_ok=True)
        Path(str(dense_tmp) + ".data").unlink(missing_ok=True)


def _runs(model, inputs: ExampleInputs) -> list | None:
    """The trained model's outputs on ``inputs``, or None when it cannot run on them."""
    try:
        with torch.no_grad():
            return tensors(inputs.call(model))
    except Exception:
        return None


def _fit(model, runtime: OnnxModel, sizes: dict, at: dict, inputs: ExampleInputs, checks: list, reference: list,
         why: dict, static_shapes: bool) -> tuple[Shapes, list, list]:
    """The file's input shapes, and the checks (with the trained model's outputs) cut or grown to
    its fixed sizes (``sizes`` as the file declares them, ``at``: which input tensor each ONNX input
    is). A fixed dimension the trained model also runs at another size is listed in
    ``fixed`` with why: ``why`` (dimensions fixed after a failed second size), static shapes asked
    for, or torch.export's specialisation; one it runs at no other size is the model's own."""
    shapes = Shapes(inputs={n: sizes[n] for n in runtime.names if n in sizes})
    pinned = [(at[n], d, size) for n in shapes.inputs if n in at for d, size in enumerate(shapes.inputs[n])
              if isinstance(size, int)]
    by_size: dict[int, list] = {}
    for tensor, dim, size in pinned:
        by_size.setdefault(size, []).append((tensor, dim))
    names = {v: k for k, v in at.items()}
    for size, where in sorted(by_size.items()):
        other = second_sizes(size)[0]
        if _runs(model, resized(inputs, where, other)) is None:
            continue  # the model's own size (a feature dimension its weights fix)
        for tensor, dim in where:
            reason = why.get((tensor, dim)) or ("static shapes asked for" if static_shapes else
                                                f"torch.export specialised it (the trained model also runs at {other})")
            shapes.fixed.append({"input": names[tensor], "dim": dim, "size": size, "why": reason})
    fitted, fitted_reference = [], []
    for check, ref in zip(checks, reference):
        tensors_ = tensors_of(check)
        changes = [(t, d, s) for t, d, s in pinned if tensors_[t].shape[d] != s]
        for tensor, dim, size in changes:
            check = resized(check, [(tensor, dim)], size)
        if changes:
            ref = _runs(model, check)
            if ref is None:
                raise ExportError(f"the trained model fails on the check inputs fitted to the export's fixed sizes "
                                  f"({', '.join(f'{names[t]} dim {d} = {s}' for t, d, s in changes)}); no file was "
                                  "written. Export with example inputs of the held-out inputs' sizes")
        fitted.append(check)
        fitted_reference.append(ref)
    return shapes, fitted, fitted_reference


def _second_sizes(model, runtime: OnnxModel, shapes: Shapes, check: ExampleInputs, tolerance: float) -> dict:
    """Run every dynamic dimension of ``shapes`` at a second size (on ``check``, a held-out input);
    returns the dimensions that failed, with why. The sizes that passed go into ``shapes.checked``."""
    at = positions(runtime.names, runtime.feed(check), check)
    dynamic: dict[str, list] = {}
    for name, sizes in shapes.inputs.items():
        for dim, size in enumerate(sizes):
            if isinstance(size, str) and name in at:
                dynamic.setdefault(size, []).append((at[name], dim))
    failed = {}
    for symbol, where in dynamic.items():
        n = tensors_of(check)[where[0][0]].shape[where[0][1]]
        reason = f"the trained model runs at no size tried besides {n} ({', '.join(map(str, second_sizes(n)))})"
        for size in second_sizes(n):
            variant = resized(check, where, size)
            expected = _runs(model, variant)
            if expected is None:
                continue
            reason = _ort_failure(runtime, variant, expected, tolerance, size)
            if reason is None:
                shapes.checked[symbol] = [n, size]
            break
        if symbol not in shapes.checked:
            failed.update({w: reason for w in where})
    return failed


def _ort_failure(runtime: OnnxModel, inputs: ExampleInputs, expected: list, tolerance: float, size: int) -> str | None:
    """Why onnxruntime's outputs on ``inputs`` (a dimension at ``size``) do not match ``expected``, or None."""
    try:
        diff = max_diff(expected, runtime.run(inputs))
    except Exception as exc:
        return f"onnxruntime fails at {size}: {first_line(exc)}"
    limit = scaled_limit(tolerance, tree_leaves(expected))
    return None if diff <= limit else f"onnxruntime differs at {size} by {diff:.3g} (limit {limit:.3g})"


def export_trained(handle, model_file, policy, out: Path, eval_data: Any = None, **overrides: Any) -> dict:
    """Export a trained model as its policy's ``export`` section says (``overrides`` that are not
    None win), checked on the first batches of ``eval_data``; prints the summary."""
    options = ExportOptions.from_section(policy.export, **overrides)
    held_out = held_out_batches(eval_data) if eval_data is not None else None
    report = export(handle, model_file.example_inputs(), out, held_out=held_out, **options.export_kwargs())
    print_report(report)
    return report
