"""Schedules: pure functions of the optimizer step.

- ζ_t, the fraction of active links replaced at an update (constant, cosine, elastic);
- δ_t, soft removal's ramp, and its exponent T = δ/(1−δ) (in :mod:`removal`);
- the density of a gradually pruned layer (cubic, sigmoid, linear, MEST's soft memory bound).

Steps are plain numbers; the caller turns fractions of training into steps. Density schedules
return the final density exactly (the value given, not 1 − (1 − d)) from ``t_final`` on.
"""
from __future__ import annotations

import math


def zeta_constant(t: float, t_end: float, zeta: float) -> float:
    """ζ until T_end, then 0 (no more updates).

    >>> zeta_constant(10, 100, 0.3), zeta_constant(100, 100, 0.3)
    (0.3, 0.0)
    """
    return zeta if t < t_end else 0.0


def zeta_cosine(t: float, t_end: float, zeta: float) -> float:
    """RigL's cosine decay: ζ/2·(1 + cos(π t / T_end)) until T_end, then 0.

    >>> zeta_cosine(0, 100, 0.3), zeta_cosine(50, 100, 0.3)
    (0.3, 0.15)
    """
    if t >= t_end:
        return 0.0
    return zeta / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


def zeta_elastic(t: float, t_end: float, zeta: float) -> float:
    """MEST's elastic mutation: ζ in the first half of [0, T_end], ζ/2 in the second, then 0.

    >>> zeta_elastic(10, 100, 0.05), zeta_elastic(60, 100, 0.05)
    (0.05, 0.025)
    """
    if t >= t_end:
        return 0.0
    return zeta if t < t_end / 2.0 else zeta / 2.0


def ramp(t: float, t_end: float, start: float, end: float) -> float:
    """A linear ramp from ``start`` at 0 to ``end`` at ``t_end``, held after (soft removal's δ).

    >>> ramp(0, 100, 0.5, 0.75), ramp(50, 100, 0.5, 0.75), ramp(500, 100, 0.5, 0.75)
    (0.5, 0.625, 0.75)
    """
    if t_end <= 0 or t >= t_end:
        return end
    return start + (end - start) * max(t, 0.0) / t_end


def _progress(t: float, t0: float, tf: float) -> float:
    if tf <= t0:
        return 1.0 if t >= t0 else 0.0
    return min(max((t - t0) / (tf - t0), 0.0), 1.0)


def density_constant(t: float, *, t0: float, tf: float, d_i: float, d_f: float, **_: object) -> float:
    """No decay: the final density all along."""
    return d_f


def density_cubic(t: float, *, t0: float, tf: float, d_i: float, d_f: float, **_: object) -> float:
    """GMP / GraNet (Zhu & Gupta 2017): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(tf − t0))³, as density.

    >>> density_cubic(0, t0=0, tf=100, d_i=1.0, d_f=0.5), density_cubic(50, t0=0, tf=100, d_i=1.0, d_f=0.5)
    (1.0, 0.5625)
    """
    x = _progress(t, t0, tf)
    if x >= 1.0:
        return d_f
    return d_f + (d_i - d_f) * (1.0 - x) ** 3


def density_linear(t: float, *, t0: float, tf: float, d_i: float, d_f: float, **_: object) -> float:
    """Linear from d_i at t0 to d_f at tf (also MEST's soft memory bound, from target + 5%).

    >>> density_linear(25, t0=0, tf=100, d_i=0.15, d_f=0.1)
    0.1375
    """
    x = _progress(t, t0, tf)
    if x >= 1.0:
        return d_f
    return d_i + (d_f - d_i) * x


def density_sigmoid(t: float, *, t0: float, tf: float, d_i: float, d_f: float, steepness: float = 6.0,
                    halved_window: bool = False, **_: object) -> float:
    """CHTss: a logistic curve of steepness k centred in the window, rescaled to hit both ends.

    With x = (t − t0)/(tf − t0) and σ(x) = 1/(1 + exp(−k(x − ½))), the progress is
    (σ(x) − σ(0)) / (σ(1) − σ(0)), so d(t0) = d_i and d(tf) = d_f exactly. It prunes little early.
    ``halved_window``: the window ends at t0 + (tf − t0)/2; the density integral then equals the
    cubic schedule's over the full window (same training FLOPs).

    >>> density_sigmoid(50, t0=0, tf=100, d_i=0.5, d_f=0.25), density_sigmoid(100, t0=0, tf=100, d_i=0.5, d_f=0.1)
    (0.375, 0.1)
    """
    if halved_window:
        tf = t0 + (tf - t0) / 2.0
    x = _progress(t, t0, tf)
    if x >= 1.0:
        return d_f

    def sigma(z: float) -> float:
        return 1.0 / (1.0 + math.exp(-steepness * (z - 0.5)))

    progress = (sigma(x) - sigma(0.0)) / (sigma(1.0) - sigma(0.0))
    return d_i + (d_f - d_i) * progress


ZETA_SCHEDULES = {
    "constant": zeta_constant,
    "cosine": zeta_cosine,
    "elastic": zeta_elastic,
}

DENSITY_DECAYS = {
    "none": density_constant,
    "cubic": density_cubic,
    "sigmoid": density_sigmoid,
    "linear": density_linear,
    "mest": density_linear,  # the soft memory bound: from target + 5% down to the target
}
