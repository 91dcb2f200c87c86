"""Complex-unsqueeze pass (ONNX export fix-up): an ``unsqueeze`` of a complex tensor in a
``torch.export`` program goes through the tensor's real view, which torch.onnx can export."""
from __future__ import annotations

import torch

from sparsify.errors import ExportError
from sparsify.passes.graph_pass import GraphPass


def complex_unsqueeze_as_real(program) -> None:
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


COMPLEX_UNSQUEEZE = GraphPass("complex_unsqueeze", complex_unsqueeze_as_real, ExportError)
