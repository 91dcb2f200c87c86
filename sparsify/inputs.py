"""The inputs of one forward call, in the forms sparsify accepts (a tensor, a tuple of positional
inputs, a dict of keyword inputs), and the other batch sizes the export checks on."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword inputs for one forward call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, value: Any) -> "ExampleInputs":
        """Accept a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or an ExampleInputs."""
        if isinstance(value, ExampleInputs):
            return value
        if isinstance(value, torch.Tensor):
            return cls((value,), {})
        if isinstance(value, dict):
            return cls((), dict(value))
        if isinstance(value, (tuple, list)):
            return cls(tuple(value), {})
        raise TypeError(
            f"example inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
            f"not {type(value).__name__}"
        )

    def call(self, fn):
        return fn(*self.args, **self.kwargs)



def first_example(inputs: ExampleInputs) -> ExampleInputs | None:
    """``inputs`` cut to their first example, when every tensor input has the same batch size
    above one along its first dimension; else None."""
    tensors = [t for t in pytree.tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes or sizes == {1}:
        return None
    cut = lambda v: v[:1] if isinstance(v, torch.Tensor) else v  # noqa: E731
    return ExampleInputs(tuple(cut(a) for a in inputs.args), {k: cut(v) for k, v in inputs.kwargs.items()})


def other_rows(inputs: ExampleInputs) -> ExampleInputs | None:
    """``inputs`` with another number of rows: their first example, or a single example twice;
    None when the tensor inputs do not share one batch size."""
    one = first_example(inputs)
    if one is not None:
        return one
    tensors = [t for t in pytree.tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, torch.Tensor)]
    if {t.shape[0] if t.dim() else None for t in tensors} != {1}:
        return None
    twice = lambda v: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return ExampleInputs(tuple(twice(a) for a in inputs.args), {k: twice(v) for k, v in inputs.kwargs.items()})
