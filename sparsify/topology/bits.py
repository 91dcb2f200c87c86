"""Counting, reducing and listing bool masks, fast on the CPU.

PyTorch sums a bool tensor by widening each element to int64 and reduces ``any`` over bools
without vectorising. On a 1568x1568 mask at 1% (one thread): ``mask.sum()`` takes about 4 ms,
``mask.any(0)`` 3 ms and ``mask.nonzero()`` 6.5 ms, where numpy's ``count_nonzero`` takes 0.14 ms,
a uint8 ``amax`` 0.14 ms and numpy's ``flatnonzero`` 1.2 ms. A topology update counts, reduces and
lists its masks dozens of times, so these are a large part of its time. Off the CPU the helpers
fall back to the torch forms.
"""
from __future__ import annotations

import numpy as np
import torch


def _on_cpu(mask: torch.Tensor) -> bool:
    return mask.device.type == "cpu" and mask.dtype == torch.bool


def count(mask: torch.Tensor) -> int:
    """The number of True entries.

    >>> count(torch.tensor([[True, False], [True, True]]))
    3
    """
    if _on_cpu(mask):
        return int(np.count_nonzero(mask.numpy()))
    return int(mask.sum())


def any_along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``mask.any(dim)``, reduced as bytes.

    >>> any_along(torch.tensor([[True, False], [False, False]]), 0).tolist()
    [True, False]
    """
    if mask.dtype != torch.bool or mask.numel() == 0:  # amax has no identity for empty reductions
        return mask.any(dim)
    return mask.view(torch.uint8).amax(dim).bool()


def flat_indices(mask: torch.Tensor) -> torch.Tensor:
    """Row-major positions of the True entries, as int64 (``mask.reshape(-1).nonzero()``).

    >>> flat_indices(torch.tensor([[False, True], [True, False]])).tolist()
    [1, 2]
    """
    if _on_cpu(mask):
        return torch.from_numpy(np.flatnonzero(mask.numpy()).astype(np.int64, copy=False))
    return mask.reshape(-1).nonzero().squeeze(1)


def coordinates(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of a 2-D mask's True entries, row-major (``mask.nonzero(as_tuple=True)``).

    >>> [t.tolist() for t in coordinates(torch.tensor([[False, True], [True, True]]))]
    [[0, 1, 1], [1, 0, 1]]
    """
    flat = flat_indices(mask)
    width = mask.shape[1]
    return torch.div(flat, width, rounding_mode="floor"), flat % width
