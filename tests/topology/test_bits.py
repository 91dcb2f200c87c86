import pytest
import torch

from sparsify.topology import bits


@pytest.mark.parametrize("shape,density", [((0, 5), 0.5), ((7, 3), 0.0), ((7, 3), 1.0), ((300, 211), 0.01),
                                           ((211, 300), 0.6)])
@pytest.mark.parametrize("view", ["contiguous", "transposed", "sliced"])
def test_the_helpers_equal_the_torch_forms(shape, density, view):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < density
    mask = {"contiguous": mask, "transposed": mask.t(), "sliced": mask[::2]}[view]
    assert bits.count(mask) == int(mask.sum())
    for dim in (0, 1):
        assert torch.equal(bits.any_along(mask, dim), mask.any(dim))
    assert torch.equal(bits.flat_indices(mask), mask.reshape(-1).nonzero().squeeze(1))
    rows, cols = bits.coordinates(mask)
    expected = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, expected[0]) and torch.equal(cols, expected[1])
    assert rows.dtype == cols.dtype == torch.int64


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (13, 29), (64, 64)])
def test_packed_masks_count_as_the_bool_masks_on_both_paths(shape, monkeypatch):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.3
    packed = bits.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert bits.count_packed(packed) == int(mask.sum())
    monkeypatch.setattr(bits, "_on_cpu", lambda *_: False)  # the torch forms, as off the CPU
    assert torch.equal(bits.pack(mask), packed)
    assert bits.count_packed(packed) == int(mask.sum())
