"""sparsify: sparse linear layers whose topology evolves while training, for PyTorch models.

>>> import sparsify
>>> model, handle = sparsify.sparsify(model, "policy.yaml", example_inputs)  # doctest: +SKIP
"""
from sparsify.errors import (CaptureError, ExportError, ModelFileError, PlanError, PolicyError, SparsifyError,
                             SparsifyWarning)
from sparsify.inspection import InspectReport, plan
from sparsify.policy import LayerSpec, Policy, load_policy
from sparsify.sparse_linear import SparseLinear
from sparsify.sparse_model import SparseModel, SparseSite, sparsify

__version__ = "0.1.0"
__all__ = [
    "sparsify", "plan", "InspectReport", "SparseModel", "SparseSite", "SparseLinear", "load_policy", "Policy", "LayerSpec",
    "SparsifyError", "PolicyError", "CaptureError", "PlanError", "ModelFileError", "ExportError", "SparsifyWarning",
]
