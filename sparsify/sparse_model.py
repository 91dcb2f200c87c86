"""The transform as one call (:func:`sparsify`) and the handle it returns on the model's sparse sites,
coupling groups, plan and topology evolution (:class:`SparseModel`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.evolution import Evolution
from sparsify.export.pipeline import export
from sparsify.passes.couple import Coupling
from sparsify.passes.linearize import summary_lines
from sparsify.passes.pipeline import Analysis, transform
from sparsify.policy import LayerSpec, Policy, load_policy
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.initial import link_count
from sparsify.topology.percolation import NeuronGraph


@dataclass
class SparseSite:
    """One sparsified layer: its module, its resolved spec and the rule that chose it."""

    name: str
    module: SparseLinear
    spec: LayerSpec
    rule: str


class SparseModel:
    """A handle on a transformed model's sparse sites, coupling groups and plan."""

    def __init__(self, model: nn.Module, analysis: Analysis, policy: Policy):
        self.model = model
        self.policy = policy
        self.analysis = analysis
        self._sites = {name: SparseSite(name, module, analysis.plan.decisions[name].spec,
                                        analysis.plan.decisions[name].rule_text)
                       for name, module in analysis.swapped.items()}

    @property
    def sites(self) -> dict[str, SparseSite]:
        """The sparse layers by name; a layer whose backend auto moved it to csr is the new module."""
        if self.evolution is not None:
            for name, site in self._sites.items():
                site.module = self.evolution.layer(name)
        return self._sites

    @property
    def evolution(self) -> Evolution:
        """The topology evolution inserted into the model (``model.sparsify_evolution``)."""
        return self.analysis.evolution

    def attach(self, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int | None = None,
               hook: bool = True):
        """Register the optimizer and the length of training; the one line a training loop adds.

        After it, every ``optimizer.step()`` counts, and scheduled steps end with a topology update
        that also resets the optimizer's moments of changed links. See :class:`Evolution`.
        """
        return self.evolution.attach(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, hook=hook)

    def export(self, path: str | Path, example_inputs: Any, **options: Any) -> dict:
        """Shrink and export the model to ONNX (+ .pt2 and a .json report), checked against the
        trained model; see :func:`sparsify.export.pipeline.export` for the options."""
        return export(self, example_inputs, path, **options)

    @property
    def history(self) -> list[dict]:
        """One record per topology update so far (see :class:`Evolution`)."""
        return self.evolution.history

    @property
    def coupling(self) -> Coupling:
        return self.analysis.coupling

    @property
    def capture(self) -> str:
        return self.analysis.capture.describe()

    def groups_of(self, name: str) -> list:
        return self.coupling.groups_of(name)

    def neuron_graph(self) -> NeuronGraph:
        """How the sparse layers' rows and columns feed each other, for percolation and ANP."""
        return NeuronGraph.from_coupling(self.coupling, self.sites)

    def masks(self) -> dict[str, torch.Tensor]:
        """The current mask of every sparse layer (the live buffers, not copies)."""
        return {name: site.module.mask for name, site in self.sites.items()}

    def parameters_active(self) -> tuple[int, int]:
        """(active weights, dense weights) over the sparse sites."""
        active = sum(s.module.active_links for s in self.sites.values())
        total = sum(s.module.mask.numel() for s in self.sites.values())
        return active, total

    def at_target(self) -> bool:
        """Whether every sparse layer holds its final density (no gradual pruning or EM&S growth
        pending): from then on the official runs count their best accuracy."""
        return all(s.module.active_links == link_count(s.module.out_features, s.module.in_features, s.spec.density)
                   for s in self.sites.values())

    def summary(self) -> str:
        active, total = self.parameters_active()
        lines = [f"{len(self.sites)} sparse layers, {active:,} of {total:,} weights active "
                 f"({active / max(total, 1):.2%}); capture: {self.capture}"]
        lines += [f"  linearized: {line}" for line in summary_lines(self.analysis.linearized)]
        for s in self.sites.values():
            lines.append(f"  {s.name}: {s.module.out_features}x{s.module.in_features} density "
                         f"{s.module.density:.4f} method {s.spec.method} ({s.rule})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparseModel({len(self.sites)} sparse layers)"


def sparsify(model: nn.Module, policy: str | Path | dict | Policy, example_inputs: Any,
             calibration: Any = None, progress: bool = False) -> tuple[nn.Module, SparseModel]:
    """Make ``model``'s linear layers sparse as ``policy`` says; returns (model, handle).

    ``model`` is an nn.Module (changed in place: its own class and methods survive) or a
    torch.fx.GraphModule (its graph is recompiled); inside DistributedDataParallel, the wrapped
    module is transformed, so rules see names without the ``module.`` prefix (better: sparsify
    first, then wrap). The model gains a ``sparsify_evolution`` submodule; register the optimizer
    with ``handle.attach(optimizer, total_steps=...)`` to evolve the topology while training.
    ``policy`` is a YAML path, a dict or a Policy.
    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``calibration`` is a list of input batches (each of the same form) for initial topologies
    computed from data (CSTI); by default the example inputs. ``progress`` shows a bar of the layers
    converted (for big models). A model on the meta device is refused: plan it with
    :func:`sparsify.plan`, then sparsify it once it holds real weights.

    >>> model, handle = sparsify(model, "policy.yaml", torch.randn(2, 784))  # doctest: +SKIP
    """
    policy = load_policy(policy)
    inner = _unwrap(model)
    analysis = transform(inner, example_inputs, policy, calibration, progress)
    return model, SparseModel(inner, analysis, policy)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel, so rules match the model's own names."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model
