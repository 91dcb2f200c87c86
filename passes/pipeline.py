"""The pass pipelines, each one readable function calling its passes in order.

- :func:`analyze`: linearize -> capture -> find_linears -> couple (-> plan, with a policy);
- :func:`transform`: analyze, then rewrite -> insert_evolution;
- :func:`shrink_model`: shrink (the export's first step, on an inference copy);
- :func:`onnx_fixups`: contiguous_copies -> complex_unsqueeze (on a ``torch.export`` program
  before torch.onnx exports it).

Every pass is a :class:`~sparsify.passes.graph_pass.GraphPass`. User errors (SparsifyError) pass
through unchanged: they already say what to do. Anything else is an internal error and is
reported as PassFailed, with the pass that failed and the one before it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from sparsify.errors import SparsifyWarning
from sparsify.evolution import Evolution
from sparsify.passes.capture import CAPTURE, EXPORT, Capture
from sparsify.passes.complex_unsqueeze import COMPLEX_UNSQUEEZE
from sparsify.passes.contiguous_copies import CONTIGUOUS_COPIES
from sparsify.passes.couple import COUPLE, Coupling
from sparsify.passes.find_linears import FIND_LINEARS, Sites
from sparsify.passes.graph_pass import PassFailed
from sparsify.passes.insert_evolution import INSERT_EVOLUTION
from sparsify.passes.linearize import LINEARIZE
from sparsify.passes.plan import PLAN, Plan
from sparsify.passes.rewrite import REWRITE
from sparsify.passes.shrink import SHRINK, Shrink
from sparsify.policy import Policy
from sparsify.sparse_linear import SparseLinear

__all__ = ["Analysis", "PassFailed", "analyze", "onnx_fixups", "shrink_model", "transform"]


@dataclass
class Analysis:
    capture: Capture
    sites: Sites
    coupling: Coupling
    plan: Plan | None = None
    swapped: dict[str, SparseLinear] | None = None
    evolution: Evolution | None = None
    linearized: dict[str, str] = field(default_factory=dict)  # name -> the layer it was, swapped for nn.Linear


def analyze(model: nn.Module, example_inputs: Any, policy: Policy | None = None) -> Analysis:
    """Capture and analyze ``model``; plan the policy's rules onto it when a policy is given.
    Linear layers written another way (transformers Conv1D, nn.Linear subclasses computing the
    product by hand) become nn.Linear first, in place: see the linearize pass."""
    linearized = LINEARIZE(model)
    cap = CAPTURE(model, example_inputs, after="linearize")
    sites = FIND_LINEARS(model, cap, after="capture")
    coupling = COUPLE(cap, sites, after="find_linears")
    result = Analysis(cap, sites, coupling, linearized=linearized)
    if policy is not None:
        result.plan = PLAN(model, sites, policy, coupling, after="couple")
        for message in result.plan.warnings():
            warnings.warn(f"{policy.source}: {message}", SparsifyWarning, stacklevel=2)
    return result


def transform(model: nn.Module, example_inputs: Any, policy: Policy, calibration: Any = None,
              progress: bool = False) -> Analysis:
    """Analyze ``model``, rewrite its planned linears into SparseLinear modules and insert the
    topology evolution, in place.

    ``calibration``, a list of input batches (each of the form of ``example_inputs``), feeds the
    initial topologies computed from data (CSTI); it defaults to ``[example_inputs]``. ``progress``
    shows a bar of the layers rewritten.
    """
    result = analyze(model, example_inputs, policy)
    traced = result.capture.graph_module if result.capture.kind != EXPORT else None
    batches = calibration if calibration is not None else [example_inputs]
    result.swapped = REWRITE(model, result.plan, policy.seed, traced, batches, progress, after="plan")
    result.evolution = INSERT_EVOLUTION(model, result.swapped, result.plan, result.coupling, policy.seed,
                                        after="rewrite")
    return result


def shrink_model(model: nn.Module, coupling: Coupling, samples: list) -> Shrink:
    """Remove ``model``'s dead neurons and heads in place (an inference copy; see the shrink pass)."""
    return SHRINK(model, coupling, samples)


def onnx_fixups(program) -> None:
    """Rewrite a ``torch.export`` program, in place, into one torch.onnx exports: see each pass."""
    CONTIGUOUS_COPIES(program)
    COMPLEX_UNSQUEEZE(program, after="contiguous_copies")
