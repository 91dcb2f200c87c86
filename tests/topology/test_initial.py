import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsify.topology import initial
from sparsify.topology.initial import (INIT_TOPOLOGIES, bipartite_receptive_field, bipartite_scale_free,
                                    bipartite_small_world, correlated_sparse, erdos_renyi, link_count, spread)

SEEDED = ["ER", "BSW", "BRF", "BSF"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=80, deadline=None)
@given(model=st.sampled_from(SEEDED), out=st.integers(1, 40), inp=st.integers(1, 40),
       density=st.floats(0.001, 1.0), seed=st.integers(0, 1000))
def test_exact_link_count_any_shape(model, out, inp, density, seed):
    mask = INIT_TOPOLOGIES[model](out, inp, density, gen(seed))
    assert mask.dtype == torch.bool and mask.shape == (out, inp)
    assert int(mask.sum()) == link_count(out, inp, density)


@pytest.mark.parametrize("model", SEEDED)
@pytest.mark.parametrize("shape", [(1568, 784), (64, 200), (3, 500)])
def test_counts_on_real_shapes_and_isolated_neurons(model, shape):
    mask = INIT_TOPOLOGIES[model](*shape, 0.01, gen())
    assert int(mask.sum()) == link_count(*shape, 0.01)
    if shape == (3, 500):  # 15 links for 500 inputs: most inputs get none
        assert int((mask.sum(0) == 0).sum()) >= 485


@pytest.mark.parametrize("model", SEEDED)
def test_same_seed_same_mask(model):
    a = INIT_TOPOLOGIES[model](120, 90, 0.05, gen(7))
    b = INIT_TOPOLOGIES[model](120, 90, 0.05, gen(7))
    assert torch.equal(a, b)
    if model != "BRF":  # BRF's default r keeps most of the receptive field; still random:
        assert not torch.equal(a, INIT_TOPOLOGIES[model](120, 90, 0.05, gen(8)))
    else:
        assert not torch.equal(a, bipartite_receptive_field(120, 90, 0.05, gen(8), r=0.9))


def test_spread_is_floor_ceil_with_exact_sum():
    parts = spread(1000, 7)
    assert int(parts.sum()) == 1000 and set(parts.tolist()) <= {142, 143}


def wrapped_runs(row: torch.Tensor) -> int:
    """Number of contiguous runs of True on a ring."""
    changes = (row != torch.roll(row, 1)).sum()
    return int(changes) // 2 if bool(row.any()) and not bool(row.all()) else int(bool(row.any()))


@pytest.mark.parametrize("shape", [(40, 40), (60, 25), (25, 60)])
def test_bsw_beta_zero_is_a_wrapped_band(shape):
    out, inp = shape
    mask = bipartite_small_world(out, inp, 0.2, gen(), beta=0.0)
    band = mask if out >= inp else mask.t()  # rows: the larger side
    large, small = band.shape
    degrees = band.sum(1)
    assert set(degrees.tolist()) <= {int(0.2 * small), int(0.2 * small) + 1}
    for i, row in enumerate(band):
        assert wrapped_runs(row) == 1  # one contiguous run on the ring
        centre = i * small / large
        cols = torch.nonzero(row).squeeze(1).double()
        dist = torch.minimum((cols - centre).abs(), small - (cols - centre).abs())
        assert float(dist.max()) <= degrees[i] / 2 + 1  # the nearest ones
    # no seed dependence at beta = 0
    assert torch.equal(mask, bipartite_small_world(out, inp, 0.2, gen(5), beta=0.0))


def test_bsw_rewiring_probability():
    band = bipartite_small_world(200, 200, 0.05, gen(), beta=0.0)
    for beta in (0.25, 0.75):
        mask = bipartite_small_world(200, 200, 0.05, gen(1), beta=beta)
        moved = int((band & ~mask).sum()) / int(band.sum())
        assert abs(moved - beta) < 0.05
    # beta = 1: no band left beyond chance (ER keeps ~density of the band)
    mask = bipartite_small_world(200, 200, 0.05, gen(2), beta=1.0)
    assert int((band & mask).sum()) / int(band.sum()) < 0.12


def test_brf_r_zero_is_deterministic_and_nearest():
    a = bipartite_receptive_field(50, 80, 0.1, gen(1), r=0.0)
    assert torch.equal(a, bipartite_receptive_field(50, 80, 0.1, gen(2), r=0.0))
    assert all(wrapped_runs(row) == 1 for row in a)


def test_brf_fixed_and_uniform_degrees():
    fixed = bipartite_receptive_field(100, 60, 0.1, gen(), r=0.3, degrees="fixed")
    assert set(fixed.sum(1).tolist()) == {6}
    uniform = bipartite_receptive_field(100, 60, 0.1, gen(), r=0.3, degrees="uniform")
    assert int(uniform.sum()) == 600 and len(set(uniform.sum(1).tolist())) > 3
    with pytest.raises(ValueError, match="degrees"):
        bipartite_receptive_field(10, 10, 0.1, gen(), degrees="powerlaw")


def test_brf_r_controls_locality():
    def mean_distance(mask):
        out, inp = mask.shape
        rows, cols = torch.nonzero(mask, as_tuple=True)
        d = (cols.double() - rows.double() * inp / out).abs()
        return float(torch.minimum(d, inp - d).mean())
    near, mid, far = (mean_distance(bipartite_receptive_field(200, 200, 0.05, gen(), r=r)) for r in (0.0, 0.3, 1.0))
    assert near < mid < far
    assert far == pytest.approx(50, rel=0.15)  # uniform on a ring of 200: mean distance ~50


def test_bsf_degrees_are_heavy_tailed():
    bsf = bipartite_scale_free(1000, 1000, 0.01, gen())
    er = erdos_renyi(1000, 1000, 0.01, gen())
    deg_bsf = torch.cat([bsf.sum(0), bsf.sum(1)]).double()
    deg_er = torch.cat([er.sum(0), er.sum(1)]).double()
    assert deg_bsf.mean() == pytest.approx(deg_er.mean())
    assert deg_bsf.max() > 5 * deg_bsf.mean() and deg_er.max() < 3 * deg_er.mean()
    assert float(((deg_bsf - deg_bsf.mean()) ** 3).mean() / deg_bsf.std() ** 3) > 3  # right-skewed


def test_bsf_options():
    equal = bipartite_scale_free(300, 300, 0.02, gen(), partition="equal")
    hubs_in, hubs_out = equal.sum(0).double(), equal.sum(1).double()
    assert abs(float(hubs_in.max() - hubs_out.max())) / float(hubs_in.max()) < 0.6
    resorted = bipartite_scale_free(300, 200, 0.02, gen(), resort=True)
    assert torch.all(resorted.sum(1)[:-1] >= resorted.sum(1)[1:])
    assert torch.all(resorted.sum(0)[:-1] >= resorted.sum(0)[1:])
    with pytest.raises(ValueError, match="partition"):
        bipartite_scale_free(10, 10, 0.1, gen(), partition="halves")


def test_csti_links_correlated_features():
    g = gen()
    base = torch.randn(500, 4, generator=g)
    # features 0..3 random; 4..7 copies of them with noise: strong pairs (i, i+4)
    x = torch.cat([base, base + 0.1 * torch.randn(500, 4, generator=g), torch.randn(500, 2, generator=g)], 1)
    mask = correlated_sparse(10, 10, 0.08, gen(), inputs=x)
    assert int(mask.sum()) == 8
    expected = {(i, i + 4) for i in range(4)} | {(i + 4, i) for i in range(4)}
    assert {tuple(p) for p in torch.nonzero(mask).tolist()} == expected
    wide = correlated_sparse(20, 10, 0.04, gen(), inputs=x)  # a wider layer tiles the matrix
    assert int(wide.sum()) == 8 and torch.equal(wide[:10], wide[10:])
    # a hidden layer 20 x 20 scores (u, j) by features (u mod 10, j mod 10): every strong pair, 4 times
    hidden = correlated_sparse(20, 20, 32 / 400, gen(), inputs=x)
    assert int(hidden.sum()) == 32
    assert {(u % 10, j % 10) for u, j in torch.nonzero(hidden).tolist()} == expected
    assert torch.equal(hidden[:10, :10], hidden[10:, 10:]) and torch.equal(hidden[:10, :10], hidden[:10, 10:])
    with pytest.raises(ValueError, match="2 calibration samples"):
        correlated_sparse(10, 10, 0.1, gen(), inputs=x[:1])


def test_brf_ranked_a_block_of_rows_at_a_time_is_the_layer_ranked_whole(monkeypatch):
    """The race's temporaries are bounded by ranking rows in blocks; the random stream, and so every
    mask, is the same as ranking the whole layer at once."""
    whole = {}
    for degrees in ("fixed", "uniform"):
        monkeypatch.setattr(initial, "RACE_POSITIONS", 10**12)
        whole[degrees] = initial.bipartite_receptive_field(300, 200, 0.1, torch.Generator().manual_seed(1), r=0.4,
                                                           degrees=degrees)
        monkeypatch.setattr(initial, "RACE_POSITIONS", 1000)  # 5 rows a block
        blocks = initial.bipartite_receptive_field(300, 200, 0.1, torch.Generator().manual_seed(1), r=0.4,
                                                   degrees=degrees)
        assert torch.equal(blocks, whole[degrees]) and int(blocks.sum()) == 6000
