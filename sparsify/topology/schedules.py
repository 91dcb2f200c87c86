"""Schedules: pure functions of the optimizer step.

- ζ_t, the fraction of active links replaced at an update (constant, cosine, elastic);
- δ_t, soft removal's ramp (δ linear, or its exponent T = δ/(1−δ) linear), T applied in :mod:`removal`;
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


def temperature_ramp(t: float, t_end: float, start: float, end: float) -> float:
    """δ_t such that soft removal's T = δ/(1−δ) ramps linearly from T(start) at 0 to T(end) at
    ``t_end``, held after: the official code's T = 1 + 2t/T_end for δ 0.5 → 0.75 (T 1 → 3).

    >>> round(temperature_ramp(50, 100, 0.5, 0.75), 6), temperature_ramp(100, 100, 0.5, 0.75)
    (0.666667, 0.75)
    """
    if t_end <= 0 or t >= t_end:
        return end
    t_start, t_stop = start / (1.0 - start), end / (1.0 - end)
    temperature = t_start + (t_stop - t_start) * max(t, 0.0) / t_end
    return temperature / (1.0 + temperature)


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


def density_ems(t: float, *, d_f: float, t_end: float, last: float, extra: tuple = (0.05, 0.025),
                **_: object) -> float:
    """The official EM&S (extended mutation and shrink): after an update at ``t`` a layer holds its
    target density plus ``extra[0]`` until 60% of T_end, plus ``extra[1]`` after, and exactly the
    target from its ``last`` update on (the final cut).

    >>> [density_ems(t, d_f=0.01, t_end=100, last=99) for t in (10, 70, 99)]
    [0.060000000000000005, 0.035, 0.01]
    """
    if t >= last:
        return d_f
    return min(1.0, d_f + extra[0 if t <= 0.6 * t_end else 1])


ZETA_SCHEDULES = {
    "constant": zeta_constant,
    "cosine": zeta_cosine,
    "elastic": zeta_elastic,
}

# How soft removal's δ moves from its start to its end over [0, T_end] (removal.ramp).
SOFT_RAMPS = {
    "delta": ramp,
    "temperature": temperature_ramp,
}

DENSITY_DECAYS = {
    "none": density_constant,
    "cubic": density_cubic,
    "sigmoid": density_sigmoid,
    "linear": density_linear,
    "mest": density_linear,  # the soft memory bound: from target + 5% down to the target
    "ems": density_ems,
}
