"""Rewrite pass: planned nn.Linear modules become SparseLinear, in place.

Modules are swapped by identity wherever the model's module tree (and a GraphModule's, when
one is given or was traced) refers to them, so the user's own classes, methods and state_dict
keys survive (``weight``, ``bias``, plus ``mask``). The pass ends with its post-conditions:
as many swaps as planned sites, no reference to a replaced module left, graph lint clean.
"""
from __future__ import annotations

import zlib

import torch
from torch import fx, nn

from sparsify.passes.plan import Plan
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.init import INIT_TOPOLOGIES


def site_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from the policy seed and the site's name: stable across runs and ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def initial_mask(name: str, module: nn.Linear, spec, seed: int) -> torch.Tensor:
    init = INIT_TOPOLOGIES[spec.init["model"]]
    params = {k: v for k, v in spec.init.items() if k not in ("model", "rescale")}
    return init(module.out_features, module.in_features, spec.initial_density, site_generator(seed, name), **params)


def _replace_everywhere(roots: list[nn.Module], swaps: dict[int, nn.Module]) -> int:
    replaced = 0
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for key, child in list(module._modules.items()):
                if child is not None and id(child) in swaps:
                    module._modules[key] = swaps[id(child)]
                    replaced += 1
    return replaced


def rewrite(model: nn.Module, plan: Plan, seed: int, graph_module: fx.GraphModule | None = None) -> dict[str, SparseLinear]:
    """Swap every planned linear of ``model`` for a SparseLinear with its initial topology."""
    swaps: dict[int, nn.Module] = {}
    created: dict[str, SparseLinear] = {}
    replaced: list[nn.Module] = []  # keeps the old modules alive, so their ids stay unique
    for name, spec in plan.sparse.items():
        old = model.get_submodule(name)
        if isinstance(old, SparseLinear):
            raise ValueError(f"{name} is already a SparseLinear; rewrite each model once")
        mask = initial_mask(name, old, spec, seed)
        new = SparseLinear.from_linear(old, mask=mask)
        if spec.init.get("rescale", True) and spec.initial_density < 1.0:
            new.rescale_to_fan_in()
        swaps[id(old)] = new
        created[name] = new
        replaced.append(old)
    roots = [model] + ([graph_module] if graph_module is not None and graph_module is not model else [])
    _replace_everywhere(roots, swaps)
    _check(model, created, swaps, roots)
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    if graph_module is not None and graph_module is not model:
        graph_module.graph.lint()
        graph_module.recompile()
    return created


def _check(model: nn.Module, created: dict[str, SparseLinear], swaps: dict[int, nn.Module], roots: list) -> None:
    for name, new in created.items():
        if model.get_submodule(name) is not new:
            raise AssertionError(f"rewrite: {name} was not swapped")
    for root in roots:
        for name, module in root.named_modules(remove_duplicate=False):
            if id(module) in swaps:
                raise AssertionError(f"rewrite: {name} still refers to the replaced nn.Linear")
