"""Link removal: scores of active links and the removal of an exact number of them.

Scores are ``[out, in]`` tensors ≥ 0 (meaningful on active positions only). Removal drops the
lowest (hard) or samples the links to *keep* with probability ∝ score^T, T = δ/(1−δ) (soft).
"""
from __future__ import annotations

import math

import torch

from sparsify.topology.selection import select


def magnitude(weight: torch.Tensor, mask: torch.Tensor, *, grad: torch.Tensor | None = None,
              alpha: float = 1.0, gamma: float = 0.0) -> torch.Tensor:
    """WM: ``|W|`` on active links (``grad``, ``alpha``, ``gamma`` are not used).

    >>> magnitude(torch.tensor([[-2., 1.], [0.5, 3.]]), torch.tensor([[True, True], [False, True]])).tolist()
    [[2.0, 1.0], [0.0, 3.0]]
    """
    return torch.where(mask, weight.detach().abs(), 0.0)


def relative_importance(weight: torch.Tensor, mask: torch.Tensor, *, grad: torch.Tensor | None = None,
                        alpha: float = 0.0, gamma: float = 0.0) -> torch.Tensor:
    """The general α form: ``|W_ij|/2 / (α + (1−α)·Σ_k|W_ik|) + |W_ij|/2 / (α + (1−α)·Σ_k|W_kj|)``.

    Row i is output neuron i, column j input neuron j, and the sums run over active links.
    α = 1 is WM (|W|); α = 0 is relative importance RI_ij = |W_ij|/Σ_k|W_kj| + |W_ij|/Σ_k|W_ik|,
    halved (the factor does not change a ranking or a sample ∝ score^T). A zero sum gives 0.
    Raising to T = δ/(1−δ) is the soft removal's job, not the score's.

    >>> w = torch.tensor([[1., 3.], [0., 2.]], dtype=torch.float64)
    >>> relative_importance(w, w != 0).tolist()   # row sums 4, 2; column sums 1, 5
    [[0.625, 0.675], [0.0, 0.7]]
    """
    w = weight.detach().abs() * mask
    rows = alpha + (1.0 - alpha) * w.sum(1, keepdim=True)  # [out, 1]
    cols = alpha + (1.0 - alpha) * w.sum(0, keepdim=True)  # [1, in]
    half = w / 2
    return half / rows.clamp_min(torch.finfo(w.dtype).tiny) + half / cols.clamp_min(torch.finfo(w.dtype).tiny)


def mest(weight: torch.Tensor, mask: torch.Tensor, *, grad: torch.Tensor | None = None,
         alpha: float = 1.0, gamma: float = 0.01) -> torch.Tensor:
    """MEST: ``|W| + γ·|dense gradient|`` on active links (the gradient is required).

    >>> mest(torch.tensor([[1., -1.]]), torch.tensor([[True, True]]), grad=torch.tensor([[10., -30.]]), gamma=0.5).tolist()
    [[6.0, 16.0]]
    """
    if grad is None:
        raise ValueError("the MEST removal score needs the dense gradient of the weight")
    return (weight.detach().abs() + gamma * grad.detach().abs()) * mask


def temperature(delta: float) -> float:
    """Soft removal's exponent ``T = δ/(1−δ)``: δ = 0 is uniform (T = 0), δ → 1 is hard top-k."""
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    return math.inf if delta == 1.0 else delta / (1.0 - delta)


def remove(mask: torch.Tensor, scores: torch.Tensor, count: int, generator: torch.Generator, *,
           mode: str = "hard", delta: float = 1.0) -> torch.Tensor:
    """The mask with exactly ``count`` active links removed.

    ``hard``: the lowest scores go (ties at random). ``soft``: the ``active − count`` links kept
    are a sample without replacement ∝ score^T, T = δ/(1−δ); zero-score links go first.

    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.tensor([[True, True, False], [True, False, True]])
    >>> remove(m, torch.tensor([[5., 1., 9.], [3., 9., 2.]]), 2, g).int().tolist()
    [[1, 0, 0], [1, 0, 0]]
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"removal mode must be 'hard' or 'soft', got {mode!r}")
    if count <= 0:
        return mask.clone()
    t = math.inf if mode == "hard" else temperature(delta)
    gone = select(scores, count, generator, eligible=mask, temperature=t, largest=False)
    return mask & ~gone


REMOVAL_SCORES = {
    "WM": magnitude,
    "RI": relative_importance,
    "MEST": mest,
}
