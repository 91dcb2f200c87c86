"""Which input dimensions an ONNX export serves: the sizes its inputs declare, each dynamic one
checked at a second size, and the check inputs fitted to the fixed ones.

``torch.export`` makes a dimension asked for as ``Dim.AUTO`` static without a word when the
model's code depends on its size (a Python loop over the sequence, as Hugging Face's Mamba runs
without its kernels): the file then declares that size and fails on any other. A dimension the
file declares dynamic may still fail at another size inside onnxruntime. Both become fixed
dimensions the report names, with their size and why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.utils import _pytree as pytree

from sparsify.inputs import ExampleInputs
from sparsify.passes.capture import auto_dynamic

Where = tuple[int, int]  # (index of the tensor among the inputs' tensors, dimension)


@dataclass
class Shapes:
    """The export's inputs (name -> sizes, an int for a fixed dimension, a name for a dynamic one),
    the dynamic names with the sizes they were checked at, and the fixed dimensions with why."""

    inputs: dict[str, list] = field(default_factory=dict)
    checked: dict[str, list[int]] = field(default_factory=dict)
    fixed: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"inputs": self.inputs, "dynamic_checked_at": self.checked, "fixed": self.fixed}


def declared(path: Path) -> tuple[dict[str, list], set[tuple[str, int]]]:
    """The sizes the ONNX file at ``path`` declares for each graph input (an int where fixed, the
    dimension's name where dynamic, None where it has neither), and the dimensions named by a
    number: torch.export specialised them, and the file names them dynamic but serves only that
    size (they count as fixed, at that size)."""
    model = onnx.load(str(path), load_external_data=False)
    stored = {i.name for i in model.graph.initializer}
    sizes: dict[str, list] = {}
    numbered = set()
    for value in model.graph.input:
        if value.name in stored:
            continue
        sizes[value.name] = []
        for dim, d in enumerate(value.type.tensor_type.shape.dim):
            size = d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            if isinstance(size, str) and size.isdigit():
                size = int(size)
                numbered.add((value.name, dim))
            sizes[value.name].append(size)
    return sizes, numbered


def tensors_of(inputs: ExampleInputs) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]


def positions(names: list[str], feed: dict, inputs: ExampleInputs) -> dict[str, int]:
    """Which of the inputs' tensors each ONNX input ``names`` is, given the ``feed`` built from
    ``inputs`` (the same tensors, as numpy arrays sharing their memory)."""
    tensors = tensors_of(inputs)
    at = {t.data_ptr(): i for i, t in reversed(list(enumerate(tensors))) if t.numel()}
    found = {}
    for name in names:
        array = feed.get(name)
        if array is not None and array.size and array.__array_interface__["data"][0] in at:
            found[name] = at[array.__array_interface__["data"][0]]
    return found


def resized(inputs: ExampleInputs, where: list[Where], size: int) -> ExampleInputs:
    """``inputs`` with each dimension in ``where`` cut to ``size``, or grown to it by repeating
    its last slice (token ids stay token ids, masks stay masks)."""
    dims: dict[int, list[int]] = {}
    for tensor, dim in where:
        dims.setdefault(tensor, []).append(dim)
    count = [0]

    def change(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        index = count[0]
        count[0] += 1
        for dim in dims.get(index, []):
            n = value.shape[dim]
            if n >= size:
                value = value.narrow(dim, 0, size)
            elif n:
                last = value.narrow(dim, n - 1, 1)
                value = torch.cat([value] + [last] * (size - n), dim=dim)
        return value

    args, kwargs = pytree.tree_map(change, (inputs.args, inputs.kwargs))
    return ExampleInputs(tuple(args), dict(kwargs))


def second_sizes(n: int) -> list[int]:
    """Sizes to check a dynamic dimension of size ``n`` at, in order of preference."""
    return [s for s in (n + 1, n - 1, 2 * n) if s >= 1 and s != n]


def dynamic_shapes(model: torch.nn.Module, inputs: ExampleInputs, fixed: set[Where] | None) -> Any:
    """torch.export's dynamic_shapes: every dimension dynamic where the model allows
    (:func:`~sparsify.passes.capture.auto_dynamic`) but those in ``fixed``; None (all static)
    when ``fixed`` is None."""
    if fixed is None:
        return None
    spec = auto_dynamic(model, inputs.args, inputs.kwargs)
    if not fixed:
        return spec
    count = [0]

    def strip(dims: Any, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            index = count[0]
            count[0] += 1
            return {d: hint for d, hint in dims.items() if (index, d) not in fixed}
        if type(value) in (tuple, list):
            return type(value)(strip(d, v) for d, v in zip(dims, value))
        if type(value) is dict:
            return {k: strip(dims[k], v) for k, v in value.items()}
        return dims

    if isinstance(spec, tuple):
        return tuple(strip(d, a) for d, a in zip(spec, inputs.args))
    values = [*inputs.args, *inputs.kwargs.values()]
    return {k: strip(d, v) for (k, d), v in zip(spec.items(), values)}
