"""Evolution pass: the scheduled topology evolution becomes part of the transformed model.

The :class:`~sparsify.evolution.Evolution` module is registered as ``sparsify_evolution`` in the
model (its state joins the model's state_dict). In a GraphModule a ``call_module`` node at the start
of the graph calls it before every forward pass, visibly in ``print(graph_module)``; in an eager
model a forward pre-hook does the same. The call only prepares the dense-gradient capture of a
coming gradient-based update; the updates themselves run at optimizer steps.
"""
from __future__ import annotations

from torch import fx, nn

from sparsify.errors import SparsifyError
from sparsify.evolution import Evolution
from sparsify.passes.couple import Coupling
from sparsify.passes.graph_pass import GraphPass
from sparsify.passes.plan import Plan
from sparsify.passes.rewrite import site_generator
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.percolation import NeuronGraph

NAME = "sparsify_evolution"


def _call_evolution(module: nn.Module, _args: tuple) -> None:
    getattr(module, NAME)()


def insert_evolution(model: nn.Module, swapped: dict[str, SparseLinear], plan: Plan, coupling: Coupling,
                     seed: int) -> Evolution:
    """Build the evolution of the ``swapped`` layers and insert it into ``model``."""
    if hasattr(model, NAME):
        raise ValueError(f"the model already has a {NAME!r} attribute; transform each model once")
    evolution = Evolution(swapped, {n: plan.sparse[n] for n in swapped}, site_generator(seed, NAME),
                          lambda names: NeuronGraph.from_coupling(coupling, names))
    for name, layer in swapped.items():  # where each layer sits, for a later switch of its storage backend
        parent, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:  # names relative to a wrapped model (DDP): no switch there
            continue
        if getattr(owner, leaf, None) is layer:
            evolution._parents[name] = (owner, leaf)
    model.add_module(NAME, evolution)
    if isinstance(model, fx.GraphModule):
        graph = model.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        anchor = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(next(iter(graph.nodes)))
        with anchor:
            graph.call_module(NAME)
        graph.lint()
        model.recompile()
    else:
        model.register_forward_pre_hook(_call_evolution)
    return evolution


def remove_evolution(model: nn.Module) -> None:
    """Take the evolution out of ``model`` again (for inference copies and export)."""
    if not hasattr(model, NAME):
        return
    if isinstance(model, fx.GraphModule):
        for node in [n for n in model.graph.nodes if n.op == "call_module" and n.target == NAME]:
            model.graph.erase_node(node)
        model.recompile()
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is _call_evolution:
            del model._forward_pre_hooks[key]
    delattr(model, NAME)


INSERT_EVOLUTION = GraphPass("insert_evolution", insert_evolution, SparsifyError)
