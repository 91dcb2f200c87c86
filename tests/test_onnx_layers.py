"""Storage layers for export: the gathered product equals the dense one, and the bins are optimal."""
import itertools

import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from sparsify.onnx_layers import CompactLinear, GatherLinear, bins


def sparse_linear(out_features, in_features, density, bias, seed):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g))
        linear.weight.mul_(torch.rand(out_features, in_features, generator=g) < density)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=g))
    return linear


@settings(max_examples=150, deadline=None)
@given(out_features=st.integers(1, 40), in_features=st.integers(1, 40), density=st.floats(0.0, 1.0),
       bias=st.booleans(), seed=st.integers(0, 2**16), lead=st.sampled_from([(), (3,), (2, 5)]),
       bin_cost=st.sampled_from([0, 8, 1024]))
def test_gathered_product_equals_the_dense_one(out_features, in_features, density, bias, seed, lead, bin_cost):
    linear = sparse_linear(out_features, in_features, density, bias, seed)
    gathered, compact = GatherLinear(linear, bin_cost), CompactLinear(linear)
    x = torch.randn(*lead, in_features, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        expected = linear(x)
        assert gathered(x).shape == expected.shape
        assert (gathered(x) - expected).abs().max() <= 1e-5
        assert (compact(x) - expected).abs().max() <= 1e-5
    links = int(linear.weight.ne(0).sum())
    assert gathered.links() >= links  # every link is gathered once; padding adds, never loses
    stored = sum(int(getattr(gathered, f"values{b}").ne(0).sum()) for b in range(len(gathered.shapes)))
    assert stored == links


def padded_cost(ordered, cuts, bin_cost):
    starts = [0] + cuts[:-1]
    return sum((e - s) * max(ordered[e - 1], 1) + bin_cost for s, e in zip(starts, cuts))


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(0, 12), min_size=1, max_size=9), bin_cost=st.integers(0, 20))
def test_bins_are_the_cheapest_cuts(counts, bin_cost):
    ordered = sorted(counts)
    cuts = bins(torch.tensor(counts), bin_cost)
    assert cuts[-1] == len(counts) and cuts == sorted(set(cuts))
    # brute force over every set of cut points (a cut inside a run of equal counts never helps)
    best = min(padded_cost(ordered, list(inner) + [len(counts)], bin_cost)
               for k in range(len(counts))
               for inner in itertools.combinations(range(1, len(counts)), k))
    assert padded_cost(ordered, cuts, bin_cost) == best


def test_bins_group_rows_of_similar_counts():
    counts = torch.tensor([2] * 100 + [3] * 100 + [40] * 2)
    assert bins(counts, 16) == [100, 200, 202]  # a bin saves 100 padded elements for a cost of 16
    assert bins(counts, 200) == [200, 202]  # not for a cost of 200; the two hubs still get their own
    assert bins(counts, 10**9) == [202]  # one bin when bins are expensive
