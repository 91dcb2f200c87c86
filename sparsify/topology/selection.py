"""Choosing exactly k positions of a mask: hard (top-k of a score) or soft (sampled ∝ score^T).

Both are one primitive: the k largest *keys* among eligible positions, ties at the threshold
broken uniformly at random. Hard selection uses the score as the key. Soft selection uses
``T·log(score) − log(E)``, ``E ~ Exp(1)`` (the exponential race, i.e. Gumbel top-k): its top k is
a sample of k positions without replacement with probability ∝ score^T, exactly as drawing one
by one from ``torch.multinomial`` would give, but with no 2^24 limit on the number of categories.

Keys are made chunk by chunk (``CHUNK`` positions at a time) and the running selection keeps at
most k + CHUNK keys, so a 4096x11008 layer (45M positions) needs no key tensor of its full size;
the first pass keeps each chunk's k largest keys (and their ties), the only ones the later passes
need, and makes the keys again from the chunk's own generator only when those exceed 2 chunks.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

CHUNK = 1 << 22

KeysOf = Callable[[int, int, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]]


def top_k(keys_of: KeysOf, n: int, k: int, generator: torch.Generator, chunk: int = CHUNK) -> torch.Tensor:
    """Flat indices of exactly ``k`` eligible positions with the largest keys, sorted ascending.

    ``keys_of(start, end, gen)`` returns ``(keys, indices)`` of the eligible positions in
    ``[start, end)``; ``gen`` is a generator private to the chunk (for noise), so calling it
    again gives the same keys. Ties at the k-th key are broken uniformly at random.
    """
    spans = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    seeds = torch.randint(0, 2**62, (len(spans),), generator=generator).tolist()

    def chunks():
        for (start, end), seed in zip(spans, seeds):
            yield keys_of(start, end, torch.Generator().manual_seed(seed))

    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    # Pass 1: the k-th largest key (the threshold). Every position the later passes look at (above
    # the threshold or tied with it) is among its chunk's k largest keys and their ties: these
    # candidates are kept while they fit in 2 chunks, so the keys (an exponential draw and a log
    # per position in soft selection) are made once instead of once per pass.
    best = torch.empty(0, dtype=torch.float64)
    eligible = 0
    candidates: list | None = []
    held = 0
    for keys, idx in chunks():
        eligible += keys.numel()
        keys = keys.double()
        if keys.numel() > k:
            top = torch.topk(keys, k, sorted=False).values
            keep = keys >= top.min()
            keys, idx = keys[keep], idx[keep]
        else:
            top = keys
        best = torch.cat([best, top])
        if best.numel() > k:
            best = torch.topk(best, k, sorted=False).values
        held += keys.numel()
        if candidates is not None and held <= 2 * chunk:
            candidates.append((keys, idx))
        else:
            candidates = None  # too many to keep: the later passes make the keys again
    if eligible < k:
        raise ValueError(f"cannot choose {k} positions: only {eligible} are eligible")
    threshold = best.min()
    again = (lambda: candidates) if candidates is not None else chunks  # noqa: E731
    # Pass 2: everything strictly above the threshold is chosen.
    above = [idx[keys.double() > threshold] for keys, idx in again()]
    chosen = torch.cat(above)
    need = k - chosen.numel()
    if need == 0:
        return chosen.sort().values
    # Pass 3: ``need`` of the tied positions, uniformly (a random priority per tie).
    tie_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    pri = torch.empty(0)
    pri_idx = torch.empty(0, dtype=torch.long)
    for keys, idx in again():
        tied = idx[keys.double() == threshold]
        pri = torch.cat([pri, torch.rand(tied.numel(), generator=tie_gen)])
        pri_idx = torch.cat([pri_idx, tied])
        if pri.numel() > need:
            pri, order = torch.topk(pri, need, sorted=False)
            pri_idx = pri_idx[order]
    return torch.cat([chosen, pri_idx]).sort().values


def _gumbel(keys: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """``T·log(w) − log(E)`` for weights ``keys`` (w = 0 gives −inf unless T = 0: uniform)."""
    race = -torch.empty(keys.numel(), dtype=torch.float64).exponential_(generator=gen).log_()
    if temperature == 0:
        return race
    return keys.double().log_().mul_(temperature).add_(race)


def select(scores: torch.Tensor, k: int, generator: torch.Generator, *, eligible: torch.Tensor | None = None,
           temperature: float = math.inf, largest: bool = True, chunk: int = CHUNK) -> torch.Tensor:
    """A bool mask (shape of ``scores``) with exactly ``k`` eligible positions chosen.

    ``temperature=inf``: the k largest scores (``largest=False``: smallest); ties at random.
    Finite ``T``: a sample without replacement with probability ∝ score^T; with ``largest=False``
    the complement of such a sample of the other ``n−k`` (used by soft removal: the kept set is the
    sample, the removed set is the rest). Zero scores come last, chosen uniformly if needed;
    ``T=0`` is uniform. Scores must be finite and ≥ 0 when ``T`` is finite.

    >>> g = torch.Generator().manual_seed(0)
    >>> select(torch.tensor([3., 1., 2., 0.]), 2, g).tolist()
    [True, False, True, False]
    """
    flat = scores.detach().reshape(-1).cpu()  # the selection itself runs on the CPU
    elig = None if eligible is None else eligible.reshape(-1).cpu()
    soft = math.isfinite(temperature)
    if soft and bool((flat < 0).any()):
        raise ValueError("soft selection needs scores >= 0")
    sign = 1.0 if largest else -1.0

    def keys_of(start: int, end: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if elig is None:
            idx = torch.arange(start, end)
            keys = flat[start:end]
        else:
            idx = elig[start:end].nonzero().squeeze(1).add_(start)
            keys = flat[idx]
        if soft:
            keys = _gumbel(keys, temperature, gen)
        return keys.double() * sign, idx

    n = flat.numel()
    out = torch.zeros(n, dtype=torch.bool)
    out[top_k(keys_of, n, k, generator, chunk)] = True
    return out.view(scores.shape).to(scores.device)
