"""Initial sparse topologies: boolean masks ``[out, in]`` with an exact number of active links."""
from __future__ import annotations

import torch


def link_count(out_features: int, in_features: int, density: float) -> int:
    """The number of active links a layer of this shape gets at ``density``: round(density·out·in)."""
    return int(round(density * out_features * in_features))


def erdos_renyi(out_features: int, in_features: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """ER: ``round(density·out·in)`` links at uniformly random positions, without repeats.

    >>> g = torch.Generator().manual_seed(0)
    >>> int(erdos_renyi(3, 4, 0.5, g).sum())
    6
    """
    total = out_features * in_features
    k = link_count(out_features, in_features, density)
    mask = torch.zeros(total, dtype=torch.bool)
    if k >= total:
        return mask.fill_(True).view(out_features, in_features)
    mask[torch.randperm(total, generator=generator)[:k]] = True
    return mask.view(out_features, in_features)


INIT_TOPOLOGIES = {
    "ER": erdos_renyi,
}
