import ch_definitions as brute
import pytest
import torch

from sparsify.topology import regrowth
from sparsify.topology.regrowth import (REGROWTH_PREDICTORS, ch2_l3n, ch3_l3n, ch3_l3p, gradient_scores,
                                        random_scores, regrow)

CH = {"CH2_L3n": (ch2_l3n, brute.ch2_l3n), "CH3_L3n": (ch3_l3n, brute.ch3_l3n), "CH3_L3p": (ch3_l3p, brute.ch3_l3p)}
GRAPHS = [(shape, density, seed) for shape in [(6, 6), (7, 11), (13, 5), (20, 20)]
          for density in (0.1, 0.3, 0.6) for seed in (0, 1)]


def random_mask(shape, density, seed):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize("name", list(CH))
@pytest.mark.parametrize("shape,density,seed", GRAPHS)
def test_matrix_forms_equal_the_definition(name, shape, density, seed):
    fast, slow = CH[name]
    mask = random_mask(shape, density, seed)
    expected = torch.tensor(slow(mask.tolist()), dtype=torch.float64)
    got = fast(mask, dtype=torch.float64)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert torch.allclose(fast(mask).double(), expected, atol=1e-5, rtol=1e-6)  # the default fp32
    assert float(got[mask].abs().sum()) == 0.0  # never scores an active position


@pytest.mark.parametrize("name", list(CH))
@pytest.mark.parametrize("shape,density,seed", GRAPHS[::3] + [((60, 70), 0.03, 0), ((90, 40), 0.02, 1)])
def test_products_on_csr_equal_the_definition(name, shape, density, seed, monkeypatch):
    # every graph through the CSR products (by default only large sparse layers take them)
    monkeypatch.setattr(regrowth, "SPARSE_PRODUCTS", 1.0)
    monkeypatch.setattr(regrowth, "SPARSE_PRODUCTS_SIZE", 0)
    fast, slow = CH[name]
    mask = random_mask(shape, density, seed)
    assert regrowth._sparse_products(mask)
    expected = torch.tensor(slow(mask.tolist()), dtype=torch.float64)
    assert torch.allclose(fast(mask, dtype=torch.float64), expected, atol=1e-6, rtol=0)
    assert torch.allclose(fast(mask).double(), expected, atol=1e-5, rtol=1e-6)
    monkeypatch.setattr(regrowth, "SPARSE_PRODUCTS", 0.0)
    assert not regrowth._sparse_products(mask)
    assert torch.allclose(fast(mask, dtype=torch.float64), expected, atol=1e-6, rtol=0)


def test_path_enumeration_in_small_chunks_gives_the_same_scores():
    mask = random_mask((30, 40), 0.2, 3)
    assert torch.allclose(ch3_l3p(mask, chunk=5, dtype=torch.float64), ch3_l3p(mask, dtype=torch.float64))


def test_node_and_path_based_agree_where_no_node_repeats():
    # a single L3 path per missing link: the node sums and the path sum coincide for CH3
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    assert torch.allclose(ch3_l3p(mask) > 0, ch3_l3n(mask) > 0)


def test_random_and_gradient_scores():
    mask = random_mask((5, 6), 0.5, 0)
    assert torch.equal(random_scores(mask), (~mask).float())
    grad = torch.randn(5, 6)
    assert torch.equal(gradient_scores(mask, grad=grad), grad.abs() * ~mask)
    with pytest.raises(ValueError, match="gradient"):
        gradient_scores(mask)
    assert set(REGROWTH_PREDICTORS) == {"random", "gradient", "CH3_L3p", "CH2_L3n", "CH3_L3n"}


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("predictor", list(REGROWTH_PREDICTORS))
def test_regrow_exact_count_never_active(mode, predictor):
    mask = random_mask((30, 25), 0.1, 5)
    grad = torch.randn(30, 25)
    scores = REGROWTH_PREDICTORS[predictor](mask, grad=grad)
    for count in (1, 40, 200):
        new = regrow(mask, scores, count, torch.Generator().manual_seed(count), mode=mode)
        assert int(new.sum()) - int(mask.sum()) == count
        assert bool(new[mask].all())


def test_hard_regrowth_takes_top_scores_then_fills_uniformly():
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 0] = True
    scores = torch.tensor([[0.0, 5.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    g, counts = torch.Generator().manual_seed(0), torch.zeros(1, 8)
    for _ in range(2000):
        new = regrow(mask, scores, 4, g)
        assert new[0, 1] and new[0, 2]
        counts += (new & ~mask).float()
    assert torch.allclose(counts[0, 3:] / 2000, torch.full((5,), 2 / 5), atol=0.05)


def test_soft_regrowth_is_proportional_to_the_score():
    mask = torch.zeros(1, 4, dtype=torch.bool)
    scores = torch.tensor([[1.0, 3.0, 0.0, 6.0]])
    g, counts = torch.Generator().manual_seed(1), torch.zeros(1, 4)
    for _ in range(4000):
        counts += regrow(mask, scores, 1, g, mode="soft").float()
    assert torch.allclose(counts / 4000, torch.tensor([[0.1, 0.3, 0.0, 0.6]]), atol=0.03)


def test_regrow_refuses_more_than_free():
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[0, 0] = False
    with pytest.raises(ValueError, match="only 1 positions are inactive"):
        regrow(mask, torch.ones(2, 2), 2, torch.Generator())


@pytest.mark.parametrize("shape", [(16, 16), (16, 300), (300, 16), (257, 129), (64, 1568)])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
def test_integer_counts_equal_the_float_products(shape, density):
    mask = random_mask(shape, density, 4)
    a = mask.double()
    counted = regrowth._integer_products(mask)
    assert counted is not None  # torch has _int_mm on the CPU
    assert torch.equal(counted[0].double(), a @ a.t()) and torch.equal(counted[1].double(), a.t() @ a)


@pytest.mark.parametrize("shape", [(40, 1), (1, 40), (40, 15), (33, 40)])
def test_scores_of_narrow_and_wide_layers_with_and_without_integer_counts(shape, monkeypatch):
    # a layer narrower than 16 keeps the float products (torch's CPU _int_mm miscounts an [n, 1]
    # operand); wider ones use the integer counts: the scores are the same either way
    mask = random_mask(shape, 0.3, 5)
    expected = torch.tensor(brute.ch2_l3n(mask.tolist()), dtype=torch.float64)
    assert torch.allclose(ch2_l3n(mask, dtype=torch.float64), expected, atol=1e-6, rtol=0)
    monkeypatch.setattr(regrowth, "_integer_products", lambda mask: None)
    assert torch.allclose(ch2_l3n(mask, dtype=torch.float64), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(CH))
def test_scores_on_the_device_equal_the_definition_and_repeat_exactly(name, device):
    """On a GPU the CH products run there (dense, without TF32) and CH3-L3p sums its paths in a sorted
    order, not in the arrival order of atomic adds: the same mask gives the same float32 scores every time."""
    fast, slow = CH[name]
    for shape, density, seed in [((20, 20), 0.3, 0), ((30, 40), 0.2, 3)]:
        mask = random_mask(shape, density, seed)
        expected = torch.tensor(slow(mask.tolist()), dtype=torch.float64)
        got = fast(mask.to(device), dtype=torch.float64)
        assert got.device == torch.device(device)
        assert torch.allclose(got.cpu(), expected, atol=1e-6, rtol=0)
        first = fast(mask.to(device))
        assert all(torch.equal(first, fast(mask.to(device))) for _ in range(3))
