"""Contiguous-copies pass (ONNX export fix-up): every ``contiguous()`` of a ``torch.export`` program
becomes a copy, so the ONNX decomposition cannot drop it."""
from __future__ import annotations

import torch

from sparsify.errors import ExportError
from sparsify.passes.graph_pass import GraphPass


def contiguous_copies(program) -> None:
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


CONTIGUOUS_COPIES = GraphPass("contiguous_copies", contiguous_copies, ExportError)
