"""The pass pipeline: linearize -> capture -> find_linears -> couple -> plan -> rewrite -> insert_evolution, in one readable function.

User errors (SparsifyError) pass through unchanged: they already say what to do. Anything else
is an internal error and is reported with the pass that failed and the one before it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from sparsify.errors import SparsifyError, SparsifyWarning
from sparsify.passes.capture import EXPORT, Capture, capture
from sparsify.evolution import Evolution
from sparsify.passes.couple import Coupling, couple
from sparsify.passes.insert_evolution import insert_evolution
from sparsify.passes.find_linears import Sites, find_linears
from sparsify.passes.linearize import linearize
from sparsify.passes.plan import Plan, plan
from sparsify.passes.rewrite import rewrite
from sparsify.policy import Policy
from sparsify.sparse_linear import SparseLinear


@dataclass
class Analysis:
    capture: Capture
    sites: Sites
    coupling: Coupling
    plan: Plan | None = None
    swapped: dict[str, SparseLinear] | None = None
    evolution: Evolution | None = None
    linearized: dict[str, str] = field(default_factory=dict)  # name -> the layer it was, swapped for nn.Linear


class PassFailed(RuntimeError):
    """An internal error inside a pass (not the user's input)."""


def _run(name: str, previous: str | None, fn: Callable, *args: Any) -> Any:
    try:
        return fn(*args)
    except SparsifyError:
        raise
    except Exception as exc:
        after = f" (after {previous})" if previous else ""
        raise PassFailed(f"pass {name} failed{after}: {type(exc).__name__}: {exc}") from exc


def analyze(model: nn.Module, example_inputs: Any, policy: Policy | None = None) -> Analysis:
    """Capture and analyze ``model``; plan the policy's rules onto it when a policy is given.
    Linear layers written another way (transformers Conv1D, nn.Linear subclasses computing the
    product by hand) become nn.Linear first, in place: see the linearize pass."""
    linearized = _run("linearize", None, linearize, model)
    cap = _run("capture", "linearize", capture, model, example_inputs)
    sites = _run("find_linears", "capture", find_linears, model, cap)
    coupling = _run("couple", "find_linears", couple, cap, sites)
    result = Analysis(cap, sites, coupling, linearized=linearized)
    if policy is not None:
        result.plan = _run("plan", "couple", plan, model, sites, policy, coupling)
        for message in result.plan.warnings():
            warnings.warn(f"{policy.source}: {message}", SparsifyWarning, stacklevel=2)
    return result


def transform(model: nn.Module, example_inputs: Any, policy: Policy, calibration: Any = None) -> Analysis:
    """Analyze ``model``, rewrite its planned linears into SparseLinear modules and insert the
    topology evolution, in place.

    ``calibration``, a list of input batches (each of the form of ``example_inputs``), feeds the
    initial topologies computed from data (CSTI); it defaults to ``[example_inputs]``.
    """
    result = analyze(model, example_inputs, policy)
    traced = result.capture.graph_module if result.capture.kind != EXPORT else None
    batches = calibration if calibration is not None else [example_inputs]
    result.swapped = _run("rewrite", "plan", rewrite, model, result.plan, policy.seed, traced, batches)
    result.evolution = _run("insert_evolution", "rewrite", insert_evolution, model, result.swapped, result.plan,
                            result.coupling, policy.seed)
    return result
