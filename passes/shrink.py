"""Shrink pass: hidden neurons that carry nothing are removed, so weights become physically smaller.

A *unit* is one hidden feature between linear layers: row c of every layer that feeds column c of
a consumer ``dst`` through elementwise operations only (an MLP's fc1 → act → fc2; LLaMA's
act(gate) · up → down), with nothing but ``dst`` reading those rows. A unit goes when

- column c of ``dst`` has no weight left: nothing reads the feature, its rows are dropped;
- every feeding row has no input weight: the feature is a constant (act(bias), or a product of
  such constants), measured on the sample inputs and folded into ``dst``'s bias;
- one factor of a product has no input and no bias and the feature measured exactly zero on every
  sample (act(0) · up = 0 for the activations used in gated MLPs): dropped, nothing to fold.

Features that go through a reshape (attention heads: v → o, q · k) and the residual stream are
not touched in this version. The pass works on plain ``nn.Linear`` layers (call it on a copy whose
SparseLinear layers were made dense with ``to_linear``) and replaces the changed layers in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sparsify.passes.couple import ACTIVATIONS, ADDITIVE, MULTIPLICATIVE, UNARY, Coupling
from sparsify.passes.rewrite import observe_inputs

ELEMENTWISE = ACTIVATIONS | UNARY | ADDITIVE | MULTIPLICATIVE


@dataclass
class Unit:
    """The hidden features between ``sources`` and ``dst`` and what the pass did with them."""

    sources: tuple[str, ...]
    dst: str
    width: int
    kept: list[int] = field(default_factory=list)
    unused: int = 0  # dropped: nothing read them
    folded: int = 0  # dropped: constant, folded into dst's bias
    zero: int = 0  # dropped: a factor without input made them zero

    @property
    def removed(self) -> int:
        return self.width - len(self.kept)

    def to_json(self) -> dict:
        return {"layers": list(self.sources), "into": self.dst, "neurons": self.width, "kept": len(self.kept),
                "unused": self.unused, "folded": self.folded, "zero": self.zero}


@dataclass
class Shrink:
    units: list[Unit]
    skipped: dict[str, str]  # dst -> why its features were left as they are
    parameters_before: int
    parameters_after: int


def _units(coupling: Coupling) -> tuple[dict[str, list], dict[str, str]]:
    """dst -> the chain groups feeding it feature by feature, elementwise; and why others are skipped."""
    by_dst: dict[str, list] = {}
    skipped: dict[str, str] = {}
    sites = coupling.sites.sites
    for g in coupling.groups:
        if g.kind == "chain":
            by_dst.setdefault(g.dst, []).append(g)
    units = {}
    for dst, chains in by_dst.items():
        width = sites[dst].in_features
        why = None
        for g in chains:
            if not set(g.trail) <= ELEMENTWISE:
                why = f"its input comes from {g.src} through {' -> '.join(g.trail)}"
            elif sites[g.src].out_features != width or not np.array_equal(g.mapping, np.arange(width)):
                why = f"{g.src}'s features do not map one to one onto its input"
            elif (g.src, "out") in coupling.boundaries:
                why = f"{g.src}'s output is also read elsewhere ({', '.join(sorted(coupling.boundaries[(g.src, 'out')]))})"
            else:
                sources = {c.src for c in chains}
                others = [o for o in coupling.groups_of(g.src)  # other readers of g.src's output
                          if (o.kind == "chain" and o.src == g.src and o.dst != dst)
                          or (o.kind == "mul" and not set(o.sites) <= sources) or o.kind == "dot"]
                if others:
                    why = f"{g.src}'s output also goes into a {others[0].kind} group"
            if why:
                break
        if (dst, "in") in coupling.boundaries and why is None:
            why = f"its input is also {', '.join(sorted(coupling.boundaries[(dst, 'in')]))}"
        if why:
            skipped[dst] = why
        else:
            units[dst] = chains
    return units, skipped


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def shrink(model: nn.Module, coupling: Coupling, samples: list) -> Shrink:
    """Remove the hidden units of ``model`` that carry nothing (see the module docstring), in place."""
    before = sum(p.numel() for p in model.parameters())
    chains_of, skipped = _units(coupling)
    seen = observe_inputs(model, list(chains_of), samples)
    units = []
    for dst, chains in chains_of.items():
        sources = tuple(g.src for g in chains)
        d = model.get_submodule(dst)
        layers = [model.get_submodule(s) for s in sources]
        if not isinstance(d, nn.Linear) or not all(isinstance(s, nn.Linear) for s in layers):
            skipped[dst] = "its layers are not plain nn.Linear (make sparse layers dense first)"
            continue
        unit = Unit(sources, dst, d.in_features)
        read = d.weight.ne(0).any(0)  # [in]: the column still has a weight
        silent = [s.weight.eq(0).all(1) for s in layers]  # per source, [width]: the row has no input weight
        biasless = [s.weight.new_ones(s.out_features, dtype=torch.bool) if s.bias is None else s.bias.eq(0)
                    for s in layers]
        values = seen.get(dst)
        observed = values is not None and len(values) > 0
        if observed:
            constant_cols = values.eq(values[:1]).all(0)
            zero_cols = values.eq(0).all(0)
        bias = d.bias.clone() if d.bias is not None else torch.zeros(d.out_features, dtype=d.weight.dtype,
                                                                     device=d.weight.device)
        for c in range(unit.width):
            if not bool(read[c]):
                unit.unused += 1
                continue
            all_silent = all(bool(s[c]) for s in silent)
            if observed and all_silent and bool(constant_cols[c]):
                bias += d.weight[:, c] * values[0, c]
                unit.folded += 1
                continue
            if observed and len(layers) > 1 and bool(zero_cols[c]) and any(
                    bool(s[c]) and bool(b[c]) for s, b in zip(silent, biasless)):
                unit.zero += 1
                continue
            unit.kept.append(c)
        units.append(unit)
        if unit.removed == 0:
            continue
        keep = torch.tensor(unit.kept, dtype=torch.long, device=d.weight.device)
        for name, layer in zip(sources, layers):
            replace_module(model, name, _linear(layer.weight[keep], None if layer.bias is None else layer.bias[keep]))
        needs_bias = d.bias is not None or unit.folded > 0
        replace_module(model, dst, _linear(d.weight[:, keep], bias if needs_bias else None))
    return Shrink(units, skipped, before, sum(p.numel() for p in model.parameters()))
