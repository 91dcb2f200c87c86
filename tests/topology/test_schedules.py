import pytest

from sparsify.topology.initial import link_count
from sparsify.topology.schedules import (DENSITY_DECAYS, ZETA_SCHEDULES, density_cubic, density_sigmoid, ramp,
                                         zeta_cosine, zeta_elastic)

WINDOW = {"t0": 100, "tf": 900}


@pytest.mark.parametrize("kind", ["cubic", "sigmoid", "linear", "mest"])
@pytest.mark.parametrize("d_i,d_f", [(1.0, 0.1), (0.5, 0.01), (0.3, 0.3 - 0.2)])
def test_density_endpoints_monotone_and_exact(kind, d_i, d_f):
    f = DENSITY_DECAYS[kind]
    values = [f(t, d_i=d_i, d_f=d_f, **WINDOW) for t in range(0, 1001)]
    assert values[0] == values[100] == pytest.approx(d_i, abs=1e-12)
    assert all(v == d_f for v in values[900:])  # the value given, exactly
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert link_count(4096, 11008, values[-1]) == link_count(4096, 11008, d_f)


def test_sigmoid_prunes_little_early_and_hits_both_ends():
    early_sigmoid = 1 - density_sigmoid(200, d_i=1.0, d_f=0.1, **WINDOW)
    early_cubic = 1 - density_cubic(200, d_i=1.0, d_f=0.1, **WINDOW)
    assert early_sigmoid < early_cubic / 3
    steep = [density_sigmoid(t, d_i=1.0, d_f=0.1, steepness=12.0, **WINDOW) for t in (100, 500, 900)]
    assert steep == [pytest.approx(1.0), pytest.approx(0.55), 0.1]


def test_halved_sigmoid_window_matches_the_cubic_density_integral():
    def integral(f, **kw):
        return sum(f(t + 0.5, d_i=1.0, d_f=0.1, t0=0, tf=10_000, **kw) for t in range(10_000)) / 10_000
    assert integral(density_sigmoid, halved_window=True) == pytest.approx(integral(density_cubic), abs=1e-4)
    assert density_sigmoid(5_000, d_i=1.0, d_f=0.1, t0=0, tf=10_000, halved_window=True) == 0.1


def test_none_is_the_final_density():
    assert DENSITY_DECAYS["none"](0, d_i=0.5, d_f=0.1, **WINDOW) == 0.1


def test_zeta_schedules():
    assert set(ZETA_SCHEDULES) == {"constant", "cosine", "elastic"}
    assert zeta_cosine(0, 1000, 0.3) == pytest.approx(0.3)
    assert zeta_cosine(500, 1000, 0.3) == pytest.approx(0.15)
    values = [zeta_cosine(t, 1000, 0.3) for t in range(0, 1200, 10)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == 0.0
    assert [zeta_elastic(t, 1000, 0.05) for t in (0, 499, 500, 999, 1000)] == [0.05, 0.05, 0.025, 0.025, 0.0]
    assert ZETA_SCHEDULES["constant"](999, 1000, 0.3) == 0.3 and ZETA_SCHEDULES["constant"](1000, 1000, 0.3) == 0.0


def test_delta_ramp():
    assert [ramp(t, 100, 0.5, 0.9) for t in (0, 25, 100, 1000)] == [0.5, pytest.approx(0.6), 0.9, 0.9]
