"""Rewrite pass: planned nn.Linear modules become SparseLinear, in place.

Modules are swapped by identity wherever the model's module tree (and a GraphModule's, when
one is given or was traced) refers to them, so the user's own classes, methods and state_dict
keys survive (``weight``, ``bias``, plus ``mask``). The pass ends with its post-conditions:
as many swaps as planned sites, no reference to a replaced module left, graph lint clean.
"""
from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from torch import fx, nn
from tqdm import tqdm

from sparsify.errors import PlanError
from sparsify.inputs import ExampleInputs
from sparsify.passes.graph_pass import GraphPass
from sparsify.passes.plan import Plan, resolved_backend
from sparsify.csr_linear import CsrLinear
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.initial import CALIBRATED_INIT, INIT_TOPOLOGIES


def site_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from the policy seed and the site's name: stable across runs and ranks."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def initial_mask(name: str, module: nn.Linear, spec, seed: int, inputs: torch.Tensor | None = None) -> torch.Tensor:
    init = INIT_TOPOLOGIES[spec.init["model"]]
    params = {k: v for k, v in spec.init.items() if k not in ("model", "weights")}
    if spec.init["model"] in CALIBRATED_INIT:
        params["inputs"] = inputs
    return init(module.out_features, module.in_features, spec.initial_density, site_generator(seed, name), **params)


def observe_inputs(model: nn.Module, names: list[str], batches: list) -> dict[str, torch.Tensor]:
    """The inputs each named layer receives over ``batches`` (a list of model inputs), as CPU
    ``[samples, in]`` tensors; a layer that never ran is left out."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).cpu()))
        for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                ExampleInputs.of(batch).call(model)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(parts) for n, parts in seen.items() if parts}


def layer_inputs(model: nn.Module, names: list[str], raw_input_layers: list[str], batches: list
                 ) -> dict[str, torch.Tensor]:
    """The calibration features of the CSTI layers ``names``: a layer that reads the model's raw input
    gets its own inputs, any other the raw input features (of the first layer reading them), which
    its initial topology tiles. Refuses inputs that do not vary."""
    if not names:
        return {}
    if not raw_input_layers:
        raise PlanError(f"layers {', '.join(names)}: CSTI correlates the model's raw input features, but no "
                        "linear layer reads the model input")
    source = {n: n if n in raw_input_layers else raw_input_layers[0] for n in names}
    seen = observe_inputs(model, sorted(set(source.values())), batches)
    out = {}
    for n in names:
        x = seen.get(source[n], torch.empty(0))
        if x.shape[0] < 2 or not bool((x.std(0) > 0).any()):
            raise PlanError(f"layer {n}: CSTI needs calibration data whose input features vary; got "
                            f"{x.shape[0]} sample(s) with no varying feature. Pass real inputs "
                            "(sparsify(..., calibration=batches); the CLI uses the first training batches).")
        out[n] = x
    return out


def _normal(weight: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill ``weight`` with N(0, std²) drawn from the (CPU) ``generator``: on the CPU, in place; on another
    device, drawn on the CPU in the weight's dtype and copied over (a CPU generator cannot fill a CUDA
    tensor), so one seed gives the same weights on every device."""
    if weight.device.type == "cpu":
        weight.normal_(0.0, std, generator=generator)
        return
    weight.copy_(torch.empty(weight.shape, dtype=weight.dtype).normal_(0.0, std, generator=generator))


def _weights_swi(layer: SparseLinear, density: float, generator: torch.Generator) -> None:
    """Sparse weight init (CHT): normal, std sqrt(2 / (density * in)), Kaiming's for the expected in-degree."""
    _normal(layer.weight, math.sqrt(2.0 / (density * layer.in_features)), generator)


def _weights_kaiming(layer: SparseLinear, density: float, generator: torch.Generator) -> None:
    """Kaiming normal as if dense: std sqrt(2 / in)."""
    _normal(layer.weight, math.sqrt(2.0 / layer.in_features), generator)


def _weights_rescale(layer: SparseLinear, density: float, generator: torch.Generator) -> None:
    """The layer's own weights, each row times sqrt(in / its active inputs): the dense activation scale."""
    layer.rescale_to_fan_in()


def _weights_keep(layer: SparseLinear, density: float, generator: torch.Generator) -> None:
    """The layer's own weights as they are (pretrained models; the official LLaMA recipe)."""


def initial_weights(name: str, layer: SparseLinear, spec, seed: int) -> None:
    """Weight the layer's links as ``spec.init['weights']`` says, in place (inactive weights stay 0)."""
    if spec.initial_density >= 1.0:
        return
    with torch.no_grad():
        WEIGHT_INITS[spec.init.get("weights", "rescale")](layer, spec.initial_density,
                                                          site_generator(seed, name + "/weights"))
        layer.apply_mask()


def replace_everywhere(roots: list[nn.Module], swaps: dict[int, nn.Module]) -> int:
    """Put ``swaps[id(m)]`` wherever a module tree under ``roots`` refers to a module ``m``, in one walk."""
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


def rewrite(model: nn.Module, plan: Plan, seed: int, graph_module: fx.GraphModule | None = None,
            calibration: Any = None, progress: bool = False) -> dict[str, SparseLinear]:
    """Swap every planned linear of ``model`` for a sparse layer with its initial topology: a
    SparseLinear (backend masked) or a CsrLinear (backend csr; auto picks by density).

    Layers are converted one at a time, each wrapping the linear's own weight, so the memory added
    is the masks' (one byte a weight) plus one layer's temporaries; ``progress`` shows a bar of the
    layers done on stderr."""
    _check_materialised(model, plan)
    calibrated = layer_inputs(model, [n for n, s in plan.sparse.items() if s.init["model"] in CALIBRATED_INIT],
                              plan.raw_input_layers, calibration)
    swaps: dict[int, nn.Module] = {}
    created: dict[str, SparseLinear] = {}
    replaced: list[nn.Module] = []  # keeps the old modules alive, so their ids stay unique
    for name, spec in tqdm(plan.sparse.items(), desc="sparse layers", unit="layer", disable=not progress,
                           leave=False):
        old = model.get_submodule(name)
        if isinstance(old, (SparseLinear, CsrLinear)):
            raise ValueError(f"{name} is already a SparseLinear; rewrite each model once")
        mask = initial_mask(name, old, spec, seed, calibrated.get(name))
        new = SparseLinear.from_linear(old, mask=mask)
        new.contiguous_output = name in plan.read_by_dense
        initial_weights(name, new, spec, seed)
        backend = resolved_backend(spec, tuple(mask.shape), plan.sharded)
        new = CsrLinear.from_masked(new) if backend == "csr" else new
        swaps[id(old)] = new
        created[name] = new
        replaced.append(old)
    roots = [model] + ([graph_module] if graph_module is not None and graph_module is not model else [])
    replace_everywhere(roots, swaps)
    _check(model, created, swaps, roots)
    if isinstance(model, fx.GraphModule):
        model.graph.lint()
        model.recompile()
    if graph_module is not None and graph_module is not model:
        graph_module.graph.lint()
        graph_module.recompile()
    return created


def _check_materialised(model: nn.Module, plan: Plan) -> None:
    """Masks and weights are drawn on real tensors: a layer still on the meta device has none."""
    meta = [n for n in plan.sparse if model.get_submodule(n).weight.is_meta]
    if meta:
        raise PlanError(f"{len(meta)} planned layer(s), the first {meta[0]}, hold their weights on the meta device, "
                        "where no mask can be drawn. Plan a model on meta with sparsify.plan(model, policy, example_inputs) or "
                        "`sparsify inspect`; to sparsify it, build it with real weights (or load them, e.g. "
                        "model.to_empty(device='cpu') and a state_dict) first.")


def _check(model: nn.Module, created: dict[str, SparseLinear], swaps: dict[int, nn.Module], roots: list) -> None:
    for name, new in created.items():
        if model.get_submodule(name) is not new:
            raise AssertionError(f"rewrite: {name} was not swapped")
    for root in roots:
        for name, module in root.named_modules(remove_duplicate=False):
            if id(module) in swaps:
                raise AssertionError(f"rewrite: {name} still refers to the replaced nn.Linear")


# init.weights: how a new sparse layer's links are first weighted (the policy schema's enum).
WEIGHT_INITS = {
    "swi": _weights_swi,
    "kaiming": _weights_kaiming,
    "rescale": _weights_rescale,
    "keep": _weights_keep,
}


REWRITE = GraphPass("rewrite", rewrite, PlanError)
