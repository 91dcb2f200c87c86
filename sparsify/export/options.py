"""The policy's ``export`` section, typed: its fields, their defaults, and the options of
:func:`~sparsify.export.pipeline.export` they become."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sparsify.export.onnx_file import OPSET


@dataclass(frozen=True)
class ExportOptions:
    """What an export does (schema/policy.schema.json, ``export``). The defaults are export()'s.

    >>> options = ExportOptions.from_section({"sparse_matmul": True}, tolerance=None, opset=19)
    >>> options.sparse_matmul, options.tolerance, options.opset, options.static_shapes
    (True, 0.0001, 19, False)
    """

    onnx: bool = False  # export at the end of the CLI's training run
    shrink: bool = True
    verify: bool = True
    tolerance: float = 1e-4
    opset: int = OPSET
    compact: bool = False
    sparse_matmul: bool = False
    static_shapes: bool = False  # every input dimension fixed at the example inputs' size

    @classmethod
    def from_section(cls, section: dict, **overrides: Any) -> "ExportOptions":
        """The options of a policy's ``export`` section, with the ``overrides`` that are not None
        (the command line's flags) winning."""
        given = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})

    def export_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of export() these options give."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "onnx"}
