"""Choosing exactly k positions of a mask: hard (top-k of a score) or soft (sampled ∝ score^T).

Both are one primitive: the k largest *keys* among eligible positions, ties at the threshold
broken uniformly at random. Hard selection uses the score as the key. Soft selection uses
``T·log(score) − log(E)``, ``E ~ Exp(1)`` (the exponential race, i.e. Gumbel top-k): its top k is
a sample of k positions without replacement with probability ∝ score^T, exactly as drawing one
by one from ``torch.multinomial`` would give, but with no 2^24 limit on the number of categories.
E is made as ``−log(1 − U)`` from a uniform draw, which is four times faster on the CPU than
``Tensor.exponential_``.

Keys are made chunk by chunk (``CHUNK`` positions at a time) and the running selection keeps at
most k + CHUNK keys, so a 4096x11008 layer (45M positions) needs no key tensor of its full size;
the first pass keeps each chunk's k largest keys (and their ties), the only ones the later passes
need, and makes the keys again from the chunk's own generator only when those exceed 2 chunks.

A small sample from many positions (k at most 1/8 of them, all fitting in one chunk, as when a
1568x1568 layer regrows 30% of its 1% of links) is drawn without keys: k draws with replacement
from the cumulative weights, repeats and already drawn positions rejected, until k distinct are
drawn. Rejecting repeats of draws ∝ w is drawing ∝ w among the positions not drawn yet, so this
is the same sampling without replacement, at the cost of one cumulative sum instead of a random
key per position.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from sparsify.topology import bits

CHUNK = 1 << 22

# keys_of(start, end, gen) -> (keys, positions): positions is a tensor, or an int ``p`` when the
# keys are those of positions p, p+1, ... with -inf at the ineligible ones (no eligible key is -inf)
KeysOf = Callable[[int, int, torch.Generator | None], tuple[torch.Tensor, "torch.Tensor | int"]]


def top_k(keys_of: KeysOf, n: int, k: int, generator: torch.Generator, chunk: int = CHUNK) -> torch.Tensor:
    """Flat indices of exactly ``k`` eligible positions with the largest keys, sorted ascending.

    ``keys_of(start, end, gen)`` returns ``(keys, indices)`` of the eligible positions in
    ``[start, end)``, or ``(keys, start)`` with the keys of every position and -inf at the
    ineligible ones; ``gen`` is a generator private to the chunk (for noise), so calling it again
    gives the same keys. Ties at the k-th key are broken uniformly at random.
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
        eligible += keys.numel() if torch.is_tensor(idx) else bits.count(keys > -math.inf)
        keys, idx, top = _best(keys.double(), idx, k)
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
    above = [_where(idx, keys.double() > threshold) for keys, idx in again()]
    chosen = torch.cat(above)
    need = k - chosen.numel()
    if need == 0:
        return chosen.sort().values
    # Pass 3: ``need`` of the tied positions, uniformly (a random priority per tie).
    tie_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    pri = torch.empty(0)
    pri_idx = torch.empty(0, dtype=torch.long)
    for keys, idx in again():
        tied = _where(idx, keys.double() == threshold)
        pri = torch.cat([pri, torch.rand(tied.numel(), generator=tie_gen)])
        pri_idx = torch.cat([pri_idx, tied])
        if pri.numel() > need:
            pri, order = torch.topk(pri, need, sorted=False)
            pri_idx = pri_idx[order]
    return torch.cat([chosen, pri_idx]).sort().values


SAMPLE = 1 << 16


def _where(idx: torch.Tensor | int, chosen: torch.Tensor) -> torch.Tensor:
    """The positions of the keys ``chosen`` picks (``idx`` as ``keys_of`` returned it)."""
    if torch.is_tensor(idx):
        return idx[chosen]
    return bits.flat_indices(chosen).add_(idx)


def _best(keys: torch.Tensor, idx: torch.Tensor | int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest of ``keys`` (float64) and every key tied with the k-th, their indices, and
    the k largest alone (all of them if there are at most k).

    When k is a small part of many keys, a threshold read from a sample of ``SAMPLE`` keys (at
    about 2k expected keys above it) filters them first, and the exact top k is taken among
    those: one comparison per key instead of a partial sort. The sample only decides how much
    is filtered; if fewer than k keys pass, all of them are sorted as before.
    """
    n = keys.numel()
    if n <= k:
        return keys, _where(idx, torch.ones(n, dtype=torch.bool)), keys
    if n > 4 * SAMPLE and k * 16 < n:
        picks = torch.randint(0, n, (SAMPLE,), generator=torch.Generator().manual_seed(n))
        above = max(1, int(SAMPLE * 2 * k / n))  # sample keys above the threshold
        threshold = torch.topk(keys[picks], above, sorted=False).values.min()
        passed = keys >= threshold
        if bits.count(passed) >= k:
            idx = _where(idx, passed)
            keys = keys[passed]
    top = torch.topk(keys, k, sorted=False).values
    keep = keys >= top.min()
    return keys[keep], _where(idx, keep), top


def _exponential(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` draws of Exp(1) in float64, as ``−log(1 − U)`` (never 0, so ``w / E`` is defined)."""
    draws = torch.rand(n, dtype=torch.float64, generator=gen).neg_().log1p_().neg_()
    return draws.clamp_min_(torch.finfo(torch.float64).tiny)


def _race(keys: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """Keys ranked as ``T·log(w) − log(E)`` for weights ``keys`` (w = 0 ranks last unless T = 0:
    uniform). At T = 1 the key is ``w / E``, the same ranking without a logarithm."""
    race = _exponential(keys.numel(), gen)  # ``keys`` may be a view of the caller's scores: not changed
    if temperature == 0:
        return race.reciprocal_()
    if temperature == 1:
        return race.reciprocal_().mul_(keys)
    return keys.double().log().mul_(temperature).sub_(race.log_())


def _draws(weights: torch.Tensor, k: int, generator: torch.Generator, rounds: int = 16) -> torch.Tensor | None:
    """Up to ``k`` distinct positions drawn one at a time ∝ ``weights`` (float64, zeroed here as
    they are drawn) among those not drawn yet. The draws are made with replacement, ``need`` at a
    time, from the cumulative weights; a repeat is rejected, which is the same as drawing from the
    weights not drawn yet. Fewer than k only when ``rounds`` rounds did not reach k; None when the
    weights do not sum to a finite number."""
    n = weights.numel()
    cum = torch.cumsum(weights, 0)
    if not math.isfinite(float(cum[-1])):
        return None
    drawn, need = [], k
    for _ in range(rounds):
        u = torch.rand(need, dtype=torch.float64, generator=generator).mul_(cum[-1])
        at = torch.searchsorted(cum, u, right=True).clamp_max_(n - 1)
        new = torch.unique(at[weights[at] > 0])  # repeats of earlier rounds (zeroed by now) rejected
        weights[new] = 0
        drawn.append(new)
        if 2 * new.numel() < need:  # most draws were repeats: sum again without the drawn weights
            cum = torch.cumsum(weights, 0)
        need -= new.numel()
        if need == 0:
            break
    return torch.cat(drawn)


def _all_tied(flat: torch.Tensor, elig: torch.Tensor | None) -> bool:
    """Whether every eligible score is the same finite number (SET's regrowth scores)."""
    if elig is None:
        low, high = torch.aminmax(flat)
    else:
        low, high = flat.masked_fill(~elig, math.inf).min(), flat.masked_fill(~elig, -math.inf).max()
    return math.isfinite(float(low)) and float(low) == float(high)


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
    if soft and flat.numel() and float(flat.min()) < 0:
        raise ValueError("soft selection needs scores >= 0")

    def keys_of(start: int, end: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | int]:
        here = None if elig is None else elig[start:end]
        whole = here is None or (finite_keys and 2 * bits.count(here) >= end - start)
        if whole:
            idx, keys = start, flat[start:end]
        else:
            idx = bits.flat_indices(here).add_(start)
            keys = flat[idx]
        if soft:
            keys = _race(keys, temperature, gen)
        keys = keys.double()
        keys = keys if largest else keys.neg()
        if whole and here is not None:
            keys = keys.masked_fill(~here, -math.inf)
        return keys, idx

    n = flat.numel()
    out = torch.zeros(n, dtype=torch.bool)
    if not soft and largest and 0 < 8 * k <= n <= chunk and _all_tied(flat, elig):
        soft, temperature = True, 0.0  # every eligible score ties: the k are a uniform sample
    if soft and largest and 0 < 8 * k <= n <= chunk:
        weights = flat.to(torch.float64, copy=True)
        if temperature != 1:
            weights.pow_(temperature)
        if elig is not None:
            weights.masked_fill_(~elig, 0)
        # otherwise zero scores must fill in, or the weights overflow: the keys below do that
        drawn = _draws(weights, k, generator) if bits.count(weights > 0) > k else None
        if drawn is not None:
            out[drawn] = True
            k -= drawn.numel()
            if k == 0:
                return out.view(scores.shape).to(scores.device)
            # the draws kept repeating: the rest by keys, ∝ weight among the positions not drawn
            flat, elig, temperature = weights, weights > 0, 1.0
    # keys that are never -inf: a chunk mostly eligible gives every position's key, -inf at the
    # ineligible ones, instead of listing and gathering the eligible ones (read by keys_of)
    finite_keys = temperature in (0.0, 1.0) or (not soft and bool(torch.isfinite(flat).all()))
    out[top_k(keys_of, n, k, generator, chunk)] = True
    return out.view(scores.shape).to(scores.device)
