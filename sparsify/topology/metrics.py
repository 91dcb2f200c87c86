"""Topology metrics: active neurons (ANP), in-time over-parameterization (ITOP), the overlap of
removed and regrown links (ELM), and degree distributions."""
from __future__ import annotations

import torch

from sparsify.topology import bits
from sparsify.topology.percolation import NeuronGraph


def active_neuron_rate(masks: dict[str, torch.Tensor], graph: NeuronGraph | None = None) -> float:
    """ANP: active neurons / all neurons of the sparse layers (a neuron is active with ≥ 1 link).

    The neurons are every layer's rows plus the columns no other sparse layer feeds; with a
    ``graph``, a column fed by a chain is the same neuron as the row feeding it and is not counted
    twice. Without one, every row and every column counts.

    >>> m = {"fc1": torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)}
    >>> active_neuron_rate(m)   # rows: 1 of 2 active; columns: 1 of 2
    0.5
    """
    active = total = 0
    for name, mask in masks.items():
        # reduced on the mask's device; the [out] and [in] flags then meet the graph's CPU indices on the CPU
        rows = bits.any_along(mask, 1).cpu()
        cols = bits.any_along(mask, 0).cpu()
        if graph is not None:
            fed = torch.zeros(mask.shape[1], dtype=torch.bool)
            for c in graph.chains:
                if c.dst == name:
                    fed[c.columns.cpu()] = True
            cols = cols[~fed]
        active += bits.count(rows) + bits.count(cols)
        total += rows.numel() + cols.numel()
    return active / total if total else 0.0


def explored(ever: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """The positions ever active, with ``mask``'s added (start with ``ever=None``), packed eight to a
    byte (:func:`bits.pack`)."""
    packed = bits.pack(mask)
    return packed if ever is None else ever.bitwise_or_(packed)


def itop_rate(ever: torch.Tensor, positions: int) -> float:
    """ITOP: the fraction of a layer's ``positions`` that were active at some point of training
    (``ever`` from :func:`explored`).

    >>> ever = explored(None, torch.tensor([[1, 0], [0, 0]], dtype=torch.bool))
    >>> itop_rate(explored(ever, torch.tensor([[0, 1], [0, 0]], dtype=torch.bool)), 4)
    0.5
    """
    return bits.count_packed(ever) / positions if positions else 0.0


def overlap_rate(removed: torch.Tensor, regrown: torch.Tensor) -> float:
    """ELM overlap: |removed ∩ regrown| / |regrown| for one update (0 when nothing regrew).

    CHT's topological early stop freezes a layer once this exceeds its threshold (0.9): the
    predictor keeps regrowing the links it just removed.

    >>> overlap_rate(torch.tensor([True, True, False]), torch.tensor([True, False, True]))
    0.5
    """
    grown = bits.count(regrown)
    return bits.count(removed & regrown) / grown if grown else 0.0


def degrees(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(in-degree of every output neuron ``[out]``, out-degree of every input neuron ``[in]``).

    >>> [d.tolist() for d in degrees(torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool))]
    [[2, 1], [1, 2, 0]]
    """
    return mask.sum(1), mask.sum(0)


def degree_summary(mask: torch.Tensor) -> dict:
    """Per side: mean, max, share of neurons with no link, and the histogram (count per degree).

    >>> degree_summary(torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool))["inputs"]["histogram"]
    [1, 1, 1]
    """
    out = {}
    for side, d in zip(("outputs", "inputs"), degrees(mask)):
        out[side] = {
            "mean": float(d.float().mean()),
            "max": int(d.max()) if d.numel() else 0,
            "isolated": float((d == 0).float().mean()),
            "histogram": torch.bincount(d).tolist(),
        }
    return out
