import math

import pytest
import torch

from sparsify.topology.removal import REMOVAL_SCORES, magnitude, mest, relative_importance, remove, temperature


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def layer(seed=0, shape=(12, 9), density=0.4):
    g = gen(seed)
    mask = torch.rand(shape, generator=g) < density
    weight = torch.randn(shape, generator=g, dtype=torch.float64) * mask
    return weight, mask


def ri_by_definition(weight, mask):
    """RI_ij = |W_ij| / Σ_k |W_kj| + |W_ij| / Σ_k |W_ik|, loops over active links."""
    out, inp = weight.shape
    s = torch.zeros(out, inp, dtype=torch.float64)
    for i in range(out):
        for j in range(inp):
            if not mask[i, j]:
                continue
            col = sum(abs(float(weight[k, j])) for k in range(out) if mask[k, j])
            row = sum(abs(float(weight[i, k])) for k in range(inp) if mask[i, k])
            w = abs(float(weight[i, j]))
            s[i, j] = (w / col if col else 0.0) + (w / row if row else 0.0)
    return s


@pytest.mark.parametrize("seed", range(3))
def test_relative_importance_alpha_zero_is_half_ri_and_alpha_one_is_wm(seed):
    weight, mask = layer(seed)
    assert torch.allclose(relative_importance(weight, mask, alpha=0.0), ri_by_definition(weight, mask) / 2, atol=1e-12)
    assert torch.allclose(relative_importance(weight, mask, alpha=1.0), magnitude(weight, mask), atol=1e-12)


def test_empty_rows_and_columns_give_zero_not_nan():
    weight = torch.zeros(3, 3, dtype=torch.float64)
    weight[0, 0] = 2.0
    scores = relative_importance(weight, weight != 0)
    assert torch.isfinite(scores).all() and float(scores[0, 0]) == pytest.approx(1.0)  # 1/2 + 1/2


def test_mest_needs_the_gradient():
    weight, mask = layer()
    grad = torch.randn(weight.shape, dtype=torch.float64)
    assert torch.allclose(mest(weight, mask, grad=grad, gamma=0.01), (weight.abs() + 0.01 * grad.abs()) * mask)
    with pytest.raises(ValueError, match="gradient"):
        mest(weight, mask)


def test_registry_names_are_the_policy_names():
    assert set(REMOVAL_SCORES) == {"WM", "RI", "MEST"}


def test_temperature():
    assert temperature(0.0) == 0.0 and temperature(0.5) == 1.0 and temperature(0.75) == pytest.approx(3.0)
    assert temperature(1.0) == math.inf
    with pytest.raises(ValueError):
        temperature(1.5)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_remove_exact_count_only_active(mode):
    weight, mask = layer(1, (40, 30), 0.3)
    scores = magnitude(weight, mask)
    for count in (0, 1, 17, int(mask.sum())):
        new = remove(mask, scores, count, gen(), mode=mode, delta=0.6)
        assert int(mask.sum()) - int(new.sum()) == count
        assert not bool((new & ~mask).any())


def test_hard_removes_the_lowest():
    weight, mask = layer(2, (30, 30), 0.5)
    scores = magnitude(weight, mask)
    new = remove(mask, scores, 50, gen())
    gone = mask & ~new
    assert float(scores[gone].max()) <= float(scores[new].min())


def test_soft_keeps_proportionally_to_score_to_the_temperature():
    mask = torch.ones(1, 4, dtype=torch.bool)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    g, kept = gen(3), torch.zeros(1, 4)
    for _ in range(4000):
        kept += remove(mask, scores, 3, g, mode="soft", delta=0.75).float()  # keep one, T = 3
    w = scores ** 3
    assert torch.allclose(kept / 4000, w / w.sum(), atol=0.03)


def test_delta_zero_is_uniform_and_delta_one_is_hard():
    mask = torch.ones(1, 4, dtype=torch.bool)
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    g, kept = gen(4), torch.zeros(1, 4)
    for _ in range(4000):
        kept += remove(mask, scores, 2, g, mode="soft", delta=0.0).float()
    assert torch.allclose(kept / 4000, torch.full((1, 4), 0.5), atol=0.04)
    assert remove(mask, scores, 2, g, mode="soft", delta=1.0).tolist() == [[False, False, True, True]]
