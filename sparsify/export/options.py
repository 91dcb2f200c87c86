"""The policy's ``export`` section, typed: its fields, their defaults, and the options of
:func:`~sparsify.export.pipeline.export` they become."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sparsify.export.onnx_file import OPSET


@dataclass(frozen=True)
class ExportOptions:
    """What an export does (schema/policy.schema.json, ``export``). The defaults are export()'s.

    >>> ExportOptions.from_section({"sparse_matmul": True}, tolerance=None, opset=19)
    ExportOptions(onnx=False, shrink=True, verify=True, tolerance=0.0001, opset=19, compact=False, sparse_matmul=True)
    """

    onnx: bool = False  # export at the end of the CLI's training run
    shrink: bool = True
    verify: bool = True
    tolerance: float = 1e-4
    opset: int = OPSET
    compact: bool = False
    sparse_matmul: bool = False

    @classmethod
    def from_section(cls, section: dict, **overrides: Any) -> "ExportOptions":
        """The options of a policy's ``export`` section, with the ``overrides`` that are not None
        (the command line's flags) winning."""
        given = {**section, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**{f.name: given[f.name] for f in fields(cls) if f.name in given})

    def export_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of export() these options give."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "onnx"}
