"""Store-sparse pass (export): the plain nn.Linear layers of a shrunk model that are sparse enough
become layers that store or multiply only their non-zero weights (:mod:`sparsify.onnx_layers`)."""
from __future__ import annotations

from torch import nn

from sparsify.errors import ExportError
from sparsify.onnx_layers import COMPACT_DENSITY, GATHER_DENSITY, CompactLinear, GatherLinear
from sparsify.passes.capture import replace_module
from sparsify.passes.graph_pass import GraphPass


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


STORE_SPARSE = GraphPass("store_sparse", store_sparse, ExportError)
