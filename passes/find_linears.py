"""Find-linears pass: every call of an ``nn.Linear`` in a captured graph, grouped by module.

A module called twice is one site with two calls. A linear whose weight is shared with another
module (typically an output head tied to the token embedding) is reported and excluded, since
sparsifying it through one module would silently change the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from sparsify.errors import SparsifyError
from sparsify.passes.capture import Capture
from sparsify.passes.graph_pass import GraphPass
from sparsify.sparse_linear import SparseLinear

LINEAR_OPS = {"linear"}  # aten.linear / F.linear by op name


def overrides_forward(module: nn.Module) -> bool:
    """An nn.Linear subclass with a forward of its own (its call may not be a linear call)."""
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def linear_types() -> tuple[type, ...]:
    return (nn.Linear, SparseLinear)


@dataclass
class LinearSite:
    """One linear module of the model and the graph nodes that call it."""

    name: str
    module: nn.Module = field(repr=False)
    in_features: int
    out_features: int
    bias: bool
    nodes: list[str] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.nodes)

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass
class Sites:
    """The result of the pass: sites by name (graph order), excluded linears, and the node→site map."""

    sites: dict[str, LinearSite]
    excluded: dict[str, str]  # module name -> reason
    node_to_site: dict[str, str]  # fx node name -> site name (only for included sites)
    node_to_excluded: dict[str, str]


def _module_name_from_stack(node: fx.Node, linears: dict[str, nn.Module]) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        name = _normalize(path)
        if name in linears:
            return name
    return None


def _normalize(path: str) -> str:
    # strict export writes L['self'].a.b; non-strict writes a.b
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _called_module(node: fx.Node, gm: fx.GraphModule, linears: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return node.target if node.target in linears else None
    if node.op != "call_function":
        return None
    opname = getattr(node.target, "_opname", getattr(node.target, "__name__", ""))
    if opname not in LINEAR_OPS:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight"):
        owner = weight.target[: -len(".weight")]
        if owner in linears:
            return owner
    return _module_name_from_stack(node, linears)


def tied_weights(model: nn.Module) -> dict[str, str]:
    """Linear modules whose weight is also held by another module: name -> 'weight tied to X.weight'."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            holders.setdefault(id(weight), [])
            if name not in holders[id(weight)]:
                holders[id(weight)].append(name)
    tied = {}
    types = linear_types()
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        others = [n for n in holders.get(id(module.weight), []) if n != name]
        if others:
            tied[name] = f"weight tied to {others[0]}.weight"
    return tied


def find_linears(model: nn.Module, cap: Capture) -> Sites:
    """Map every linear call in ``cap``'s graph to its module in ``model``."""
    types = linear_types()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    excluded = tied_weights(model)
    for name, module in linears.items():  # the linearize pass swapped those computing the plain product
        if overrides_forward(module):
            excluded.setdefault(name, f"{type(module).__name__} overrides nn.Linear.forward with more than the "
                                      "linear product; a sparse layer in its place would drop the rest")
    sites: dict[str, LinearSite] = {}
    node_to_site, node_to_excluded = {}, {}
    for node in cap.graph_module.graph.nodes:
        name = _called_module(node, cap.graph_module, linears)
        if name is None:
            continue
        if name in excluded:
            node_to_excluded[node.name] = name
            continue
        module = linears[name]
        site = sites.get(name)
        if site is None:
            site = sites[name] = LinearSite(name, module, module.in_features, module.out_features,
                                            module.bias is not None)
        site.nodes.append(node.name)
        node_to_site[node.name] = name
    for name in linears:
        if name not in sites and name not in excluded:
            excluded[name] = "never called in the captured forward"
    return Sites(sites, excluded, node_to_site, node_to_excluded)


FIND_LINEARS = GraphPass("find_linears", find_linears, SparsifyError)
