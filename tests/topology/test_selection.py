import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsify.topology.selection import select, top_k


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data(), soft=st.booleans(), chunk=st.sampled_from([7, 64, 1 << 22]))
def test_exact_count_and_only_eligible(n, data, soft, chunk):
    scores = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]), min_size=n, max_size=n)))
    eligible = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    k = data.draw(st.integers(0, int(eligible.sum())))
    chosen = select(scores, k, gen(data.draw(st.integers(0, 99))), eligible=eligible,
                    temperature=1.0 if soft else math.inf, chunk=chunk)
    assert int(chosen.sum()) == k
    assert not bool((chosen & ~eligible).any())


def test_hard_takes_the_largest_and_does_not_depend_on_chunking():
    scores = torch.randperm(10_000, generator=gen()).float()
    a = select(scores, 300, gen(1))
    b = select(scores, 300, gen(2), chunk=97)
    assert torch.equal(a, b)
    assert torch.equal(a, scores >= 10_000 - 300)


def test_smallest():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5])
    assert select(scores, 2, gen(), largest=False).tolist() == [False, True, False, True]


def test_ties_at_the_threshold_are_broken_uniformly():
    scores = torch.tensor([9.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    counts = torch.zeros(6)
    g = gen()
    for _ in range(2000):
        chosen = select(scores, 3, g, chunk=2)
        assert chosen[0] and not chosen[5]
        counts += chosen.float()
    assert counts[1:5].sum() == 4000
    assert torch.allclose(counts[1:5] / 2000, torch.full((4,), 0.5), atol=0.05)


def exact_inclusion(weights, k):
    """Inclusion probabilities of successive sampling without replacement, by enumeration."""
    n = len(weights)
    incl = [0.0] * n

    def walk(chosen, p):
        if len(chosen) == k:
            for i in chosen:
                incl[i] += p
            return
        rest = sum(w for i, w in enumerate(weights) if i not in chosen)
        for i, w in enumerate(weights):
            if i not in chosen and w > 0:
                walk(chosen + [i], p * w / rest)
    walk([], 1.0)
    return torch.tensor(incl)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_soft_matches_sampling_without_replacement(temperature):
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = exact_inclusion((scores ** temperature).tolist(), 2)
    g, counts, trials = gen(3), torch.zeros(4), 6000
    for _ in range(trials):
        counts += select(scores, 2, g, temperature=temperature, chunk=3).float()
    assert torch.allclose(counts / trials, expected, atol=0.025), (counts / trials, expected)


def test_soft_zero_scores_only_fill_and_temperature_zero_is_uniform():
    scores = torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0])
    g, counts = gen(4), torch.zeros(5)
    for _ in range(3000):
        chosen = select(scores, 3, g, temperature=1.0)
        assert chosen[0] and chosen[4]
        counts += chosen.float()
    assert torch.allclose(counts[1:4] / 3000, torch.full((3,), 1 / 3), atol=0.04)
    counts = torch.zeros(5)
    for _ in range(3000):
        counts += select(scores, 2, g, temperature=0.0).float()
    assert torch.allclose(counts / 3000, torch.full((5,), 0.4), atol=0.04)


def test_refuses_impossible_and_negative():
    with pytest.raises(ValueError, match="only 2 are eligible"):
        select(torch.ones(4), 3, gen(), eligible=torch.tensor([True, False, True, False]))
    with pytest.raises(ValueError, match=">= 0"):
        select(torch.tensor([1.0, -1.0]), 1, gen(), temperature=1.0)


def test_same_generator_state_same_choice():
    scores = torch.rand(5000, generator=gen(9))
    assert torch.equal(select(scores, 100, gen(5), temperature=1.0), select(scores, 100, gen(5), temperature=1.0))
    assert not torch.equal(select(scores, 100, gen(5), temperature=1.0), select(scores, 100, gen(6), temperature=1.0))


def test_beyond_multinomial_category_limit_in_chunks():
    # more categories than torch.multinomial accepts (2^24), sampled in 2^22 chunks
    n = (1 << 24) + 5
    scores = torch.ones(n)
    scores[-5:] = 1e6  # heavy items must almost surely be in the sample
    chosen = select(scores, 1000, gen(), temperature=1.0)
    assert int(chosen.sum()) == 1000 and bool(chosen[-5:].all())


@pytest.mark.parametrize("k,passes", [(50, 1), (3000, 3)])
def test_keys_are_made_once_when_each_chunks_best_fit(k, passes):
    # 10 chunks of 1,000: the chunks' 50 best fit in 2 chunks and are all the later passes need;
    # their 3,000 best do not, and the keys are made again for the keys above the k-th and for the
    # k-th itself (the tie pass)
    made: dict[int, torch.Tensor] = {}
    calls = []

    def keys_of(start, end, gen):
        calls.append(start)
        keys = torch.rand(end - start, generator=gen, dtype=torch.float64)
        assert start not in made or torch.equal(made[start], keys)  # made again, the same
        made[start] = keys
        return keys, torch.arange(start, end)

    chosen = top_k(keys_of, 10_000, k, torch.Generator().manual_seed(0), chunk=1000)
    assert len(calls) == 10 * passes
    every = torch.cat([made[s] for s in sorted(made)])
    assert torch.equal(chosen, torch.topk(every, k).indices.sort().values)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0, math.inf])
@pytest.mark.parametrize("eligible", [None, "most", "few"])
def test_the_scores_are_not_changed(temperature, eligible):
    scores = torch.rand(300, 200, generator=gen(1), dtype=torch.float64)
    before = scores.clone()
    mask = None if eligible is None else torch.rand(300, 200, generator=gen(2)) < (0.9 if eligible == "most" else 0.1)
    select(scores, 40, gen(3), eligible=mask, temperature=temperature, chunk=7000)
    select(scores, 40, gen(3), eligible=mask, temperature=temperature, largest=False, chunk=7000)
    assert torch.equal(scores, before)


@pytest.mark.parametrize("soft", [False, True])
def test_a_mostly_eligible_chunk_never_yields_an_ineligible_position(soft):
    # most positions eligible: the keys of every position are made, -inf at the ineligible ones;
    # k takes every eligible position, so any slip would show
    scores = torch.rand(200_000, generator=gen(5))
    scores[::3] = 0.0
    eligible = torch.rand(200_000, generator=gen(6)) < 0.8
    k = int(eligible.sum())
    chosen = select(scores, k, gen(7), eligible=eligible, temperature=1.0 if soft else math.inf, chunk=1 << 16)
    assert torch.equal(chosen, eligible)
    few = select(scores, 500, gen(7), eligible=eligible, temperature=1.0 if soft else math.inf, chunk=1 << 16)
    assert int(few.sum()) == 500 and not bool((few & ~eligible).any())
    assert bool((scores[few] > 0).all())  # positive scores first


@pytest.mark.parametrize("kind", ["random", "sorted", "reversed", "spike"])
def test_the_sampled_threshold_keeps_the_exact_top_k(kind):
    # over 4 x 65,536 keys and k under 1/16 of them, a threshold read from a sample filters the
    # keys first; the choice must still be the exact top k, whatever the keys' order
    n, k = 600_000, 5_000
    scores = {"random": torch.rand(n, generator=gen(8)), "sorted": torch.arange(n, dtype=torch.float32),
              "reversed": torch.arange(n, 0, -1, dtype=torch.float32),
              "spike": torch.cat([torch.zeros(n - 10), torch.arange(1.0, 11.0)])}[kind]
    chosen = select(scores, k, gen(9))
    assert int(chosen.sum()) == k
    kth = torch.topk(scores, k).values.min()
    assert bool((scores[chosen] >= kth).all()) and bool(chosen[scores > kth].all())


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_few_of_many_are_drawn_as_sampling_without_replacement(temperature):
    # k at most 1/8 of the positions: drawn with replacement from the cumulative weights, repeats
    # rejected; the inclusion probabilities must be those of drawing one at a time without replacement
    scores = torch.tensor([5.0, 1.0, 0.0, 2.0, 9.0, 3.0, 0.5, 4.0, 1.5, 6.0, 2.5, 0.0, 7.0, 1.0, 8.0, 3.5])
    eligible = torch.ones(16, dtype=torch.bool)
    eligible[[3, 9]] = False
    weights = torch.where(eligible, scores ** temperature, 0.0)
    expected = exact_inclusion(weights.tolist(), 2)
    g, counts, trials = gen(11), torch.zeros(16), 6000
    for _ in range(trials):
        counts += select(scores, 2, g, eligible=eligible, temperature=temperature).float()
    assert torch.allclose(counts / trials, expected, atol=0.02), (counts / trials, expected)


def test_draws_that_keep_repeating_are_finished_by_keys(monkeypatch):
    # one position holds almost all the weight: with a single round of draws most are repeats of
    # it, and the rest of the sample comes from the keys among the positions not drawn yet; the
    # distribution must be the same
    from sparsify.topology import selection

    scores = torch.tensor([1000.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0,
                           1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0])
    one_round = selection._draws
    monkeypatch.setattr(selection, "_draws", lambda w, k, g: one_round(w, k, g, rounds=1))
    expected = exact_inclusion(scores.tolist(), 3)
    g, counts, trials = gen(12), torch.zeros(24), 6000
    for _ in range(trials):
        chosen = select(scores, 3, g, temperature=1.0)
        assert int(chosen.sum()) == 3
        counts += chosen.float()
    assert one_round(scores.double(), 3, gen(0), rounds=1).numel() < 3  # one round leaves some to the keys
    assert torch.allclose(counts / trials, expected, atol=0.02), (counts / trials, expected)


def test_weights_too_large_to_sum_are_left_to_the_keys():
    scores = torch.full((1000,), 1e300, dtype=torch.float64)
    scores[:10] = 0.0
    chosen = select(scores, 20, gen(13), temperature=3.0)  # 1e900 overflows: keys in logarithms
    assert int(chosen.sum()) == 20 and not bool(chosen[:10].any())


def test_hard_selection_among_equal_scores_is_uniform():
    # every eligible score the same (SET's regrowth): the k are a uniform sample of the eligible
    scores = torch.tensor([1.0] * 12 + [0.0] * 4)
    eligible = scores > 0
    g, counts, trials = gen(14), torch.zeros(16), 4000
    for _ in range(trials):
        chosen = select(scores, 1, g, eligible=eligible)
        assert int(chosen.sum()) == 1 and not bool((chosen & ~eligible).any())
        counts += chosen.float()
    assert torch.allclose(counts[:12] / trials, torch.full((12,), 1 / 12), atol=0.02)
    top = select(torch.tensor([2.0] + [1.0] * 15), 1, g)  # not tied: the largest, as before
    assert bool(top[0]) and int(top.sum()) == 1


@pytest.mark.parametrize("temperature", [math.inf, 1.0, 0.5])
def test_scores_on_the_device_give_the_cpus_choice_there(temperature, device):
    """The choice runs on the CPU from the CPU generator: scores held on a GPU give the same mask, on the GPU."""
    scores = torch.rand(40, 50, generator=gen(1)).mul_(4).round_()  # many ties, broken by the generator
    eligible = torch.rand(40, 50, generator=gen(2)) < 0.7
    expected = select(scores, 300, gen(3), eligible=eligible, temperature=temperature)
    chosen = select(scores.to(device), 300, gen(3), eligible=eligible.to(device), temperature=temperature)
    assert chosen.device == torch.device(device) and torch.equal(chosen.cpu(), expected)
    assert int(expected.sum()) == 300 and not expected[~eligible].any()
