"""Percolation: remove the links of neurons that carry no signal, across coupled layers, to a fixed point.

A neuron is inactive when it has no input links or its output reaches nothing. Here a neuron is
a row of a layer (an output) or a column (an input), and the layers are tied together by a
:class:`NeuronGraph`, built from the coupling groups the analysis found:

- a *chain* feeds column c of ``dst`` from row ``rows[c]`` of ``src`` (v → o, up → down, fc1 → fc2);
- a *product* multiplies rows elementwise (act(gate) · up, of two layers or of one fused layer):
  the product is zero when either row has no input, so both count as silent; a row is used while
  its product is (one fused layer's chain follows only one factor's rows);
- a *contraction* pairs rows inside a dot product (q · k): a row is used only while a partner row
  of the other layer has input; with grouped-query attention one k row has several q partners;
- *paired* rows of one layer are rotated together (RoPE's i and i + head_dim/2): one unit, live
  while either row has input.

Boundaries (the residual stream, norms, embeddings, the model's inputs and outputs, dense
layers) are never percolated: their columns always have input and their rows are always used.

A neuron with a bias but no input still emits act(bias); removing its outgoing links drops that
constant. Percolation only edits masks; ``Percolation.silent_columns`` names the columns cut
this way so that a caller who needs the function unchanged (export) can fold the constant into
the next layer's bias first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from sparsify.topology import bits


@dataclass(frozen=True)
class Chain:
    """Column ``columns[i]`` of ``dst`` is fed by row ``rows[i]`` of ``src``."""

    src: str
    dst: str
    rows: torch.Tensor  # long
    columns: torch.Tensor  # long


@dataclass(frozen=True)
class Product:
    """Row ``pairs[i, 0]`` of ``a`` is multiplied elementwise with row ``pairs[i, 1]`` of ``b``."""

    a: str
    b: str
    pairs: torch.Tensor  # long (n, 2)


@dataclass(frozen=True)
class Contraction:
    """Row ``pairs[i, 0]`` of ``q`` is contracted with row ``pairs[i, 1]`` of ``k`` (a dot product)."""

    q: str
    k: str
    pairs: torch.Tensor  # long (n, 2)


@dataclass
class NeuronGraph:
    """How the rows and columns of sparse layers feed each other.

    ``shapes``: ``site -> (out, in)``. ``open_inputs``: sites whose columns always have input;
    ``open_outputs``: sites whose rows are always used (both: boundaries, dense neighbours).
    """

    shapes: dict[str, tuple[int, int]]
    chains: list[Chain] = field(default_factory=list)
    products: list[Product] = field(default_factory=list)
    contractions: list[Contraction] = field(default_factory=list)
    paired: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (n, 2) rows rotated together
    open_inputs: set[str] = field(default_factory=set)
    open_outputs: set[str] = field(default_factory=set)

    @classmethod
    def from_coupling(cls, coupling, sparse: Iterable[str]) -> "NeuronGraph":
        """The graph of the ``sparse`` sites of a :class:`~sparsify.passes.couple.Coupling`.

        A group with a site that is not sparse becomes a boundary of its sparse side: a dense
        layer uses every row it reads and gives input to every column it feeds.
        """
        sparse = set(sparse)
        shapes = {n: (s.out_features, s.in_features) for n, s in coupling.sites.sites.items() if n in sparse}
        graph = cls(shapes)
        consumed: set[str] = set()
        for g in coupling.groups:
            if g.kind == "chain":
                mapping = torch.as_tensor(np.asarray(g.mapping), dtype=torch.long)
                cols = torch.nonzero(mapping >= 0).squeeze(1)
                if g.src in sparse and g.dst in sparse:
                    graph.chains.append(Chain(g.src, g.dst, mapping[cols], cols))
                    consumed.add(g.src)
                elif g.src in sparse:
                    graph.open_outputs.add(g.src)
                elif g.dst in sparse:
                    graph.open_inputs.add(g.dst)
            elif g.kind == "mul":
                if g.a in sparse and g.b in sparse:
                    graph.products.append(Product(g.a, g.b, torch.as_tensor(np.asarray(g.pairs), dtype=torch.long)))
            elif g.kind == "dot":
                for site, pairs in g.rope.items():
                    if site in sparse:
                        graph.paired[site] = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
                if g.q in sparse and g.k in sparse:
                    graph.contractions.append(Contraction(g.q, g.k, torch.as_tensor(np.asarray(g.pairs), dtype=torch.long)))
                    consumed.update((g.q, g.k))
                else:
                    graph.open_outputs.update(s for s in (g.q, g.k) if s in sparse)
        for site, side in coupling.boundaries:
            if site in sparse:
                (graph.open_inputs if side == "in" else graph.open_outputs).add(site)
        # a sparse layer whose output goes nowhere the analysis could follow is kept whole
        graph.open_outputs.update(s for s in sparse if s not in consumed)
        return graph


@dataclass
class Percolation:
    """The percolated masks and what was removed."""

    masks: dict[str, torch.Tensor]
    removed: dict[str, torch.Tensor]  # site -> bool [out, in]: links removed
    silent_columns: dict[str, torch.Tensor]  # site -> bool [in]: columns cut for lack of input
    iterations: int

    @property
    def removed_links(self) -> dict[str, int]:
        return {s: bits.count(r) for s, r in self.removed.items()}

    @property
    def total_removed(self) -> int:
        return sum(self.removed_links.values())


def _or_paired(rows: torch.Tensor, pairs: torch.Tensor | None) -> torch.Tensor:
    """Rows rotated together count as one unit: live if either row is."""
    if pairs is None or not len(pairs):
        return rows
    either = rows[pairs[:, 0]] | rows[pairs[:, 1]]
    out = rows.clone()
    out[pairs[:, 0]] |= either
    out[pairs[:, 1]] |= either
    return out


def _scatter_or(size: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(size, dtype=torch.int32)
    out.index_add_(0, index, values.to(torch.int32))
    return out > 0


def percolate(masks: dict[str, torch.Tensor], graph: NeuronGraph) -> Percolation:
    """Remove links of silent neurons until nothing changes; the input masks are not modified.

    Example: a chain fc1 (3 rows) → fc2. fc1's row 2 has no input, so fc2's column 2 is cut;
    fc2's column 0 has no link, so fc1's row 0 reaches nothing and loses its input links.

    >>> chain = Chain("fc1", "fc2", rows=torch.arange(3), columns=torch.arange(3))
    >>> g = NeuronGraph({"fc1": (3, 2), "fc2": (2, 3)}, chains=[chain], open_inputs={"fc1"},
    ...                 open_outputs={"fc2"})
    >>> fc1 = torch.tensor([[1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    >>> fc2 = torch.tensor([[0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    >>> p = percolate({"fc1": fc1, "fc2": fc2}, g)
    >>> p.masks["fc1"].int().tolist(), p.masks["fc2"].int().tolist(), p.removed_links
    ([[0, 0], [0, 1], [0, 0]], [[0, 1, 0], [0, 0, 0]], {'fc1': 2, 'fc2': 2})
    """
    for name, shape in graph.shapes.items():
        if name not in masks:
            raise KeyError(f"percolate: no mask for layer {name}")
        if tuple(masks[name].shape) != tuple(shape):
            raise ValueError(f"percolate: mask of {name} has shape {tuple(masks[name].shape)}, "
                             f"the graph says {tuple(shape)}")
    current = {n: masks[n].detach().cpu().clone() for n in graph.shapes}
    silent = {n: torch.zeros(shape[1], dtype=torch.bool) for n, shape in graph.shapes.items()}
    # columns no chain feeds (and all columns of an open layer) always have input
    chained = {n: torch.zeros(shape[1], dtype=torch.bool) for n, shape in graph.shapes.items()}
    for c in graph.chains:
        chained[c.dst][c.columns] = True
    always_fed = {n: ~v | (n in graph.open_inputs) for n, v in chained.items()}
    iterations = 0
    while True:
        iterations += 1
        live_in = {n: _or_paired(bits.any_along(m, 1), graph.paired.get(n)) for n, m in current.items()}
        signal = {n: v.clone() for n, v in live_in.items()}
        for p in graph.products:
            both = live_in[p.a][p.pairs[:, 0]] & live_in[p.b][p.pairs[:, 1]]
            signal[p.a][p.pairs[:, 0][~both]] = False
            signal[p.b][p.pairs[:, 1][~both]] = False
        fed = {n: v.clone() for n, v in always_fed.items()}
        for c in graph.chains:
            fed[c.dst] |= _scatter_or(len(fed[c.dst]), c.columns, signal[c.src][c.rows])
        has_out = {n: bits.any_along(m, 0) for n, m in current.items()}
        used = {n: torch.full((shape[0],), n in graph.open_outputs) for n, shape in graph.shapes.items()}
        for c in graph.chains:
            used[c.src] |= _scatter_or(len(used[c.src]), c.rows, has_out[c.dst][c.columns])
        for d in graph.contractions:
            used[d.q] |= _scatter_or(len(used[d.q]), d.pairs[:, 0], live_in[d.k][d.pairs[:, 1]])
            used[d.k] |= _scatter_or(len(used[d.k]), d.pairs[:, 1], live_in[d.q][d.pairs[:, 0]])
        for p in graph.products:
            either = used[p.a][p.pairs[:, 0]] | used[p.b][p.pairs[:, 1]]
            used[p.a] |= _scatter_or(len(used[p.a]), p.pairs[:, 0], either)
            used[p.b] |= _scatter_or(len(used[p.b]), p.pairs[:, 1], either)
        changed = False
        for n, m in current.items():
            cols = fed[n]
            rows = _or_paired(used[n], graph.paired.get(n))
            new = m & cols[None, :] & rows[:, None]
            silent[n] |= ~cols & has_out[n]
            if bits.count(new) != bits.count(m):  # new is m with links taken away, or m
                current[n] = new
                changed = True
        if not changed:
            break
    removed = {n: masks[n].detach().cpu() & ~current[n] for n in graph.shapes}
    return Percolation({n: current[n].to(masks[n].device) for n in graph.shapes}, removed, silent, iterations)
