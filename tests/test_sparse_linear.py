"""SparseLinear (the masked backend) on every device: the numbers of a dense layer whose weight is masked."""
import torch
from torch import nn

from sparsify.sparse_linear import SparseLinear


def test_forward_and_both_gradients_equal_a_dense_layer_with_the_masked_weight(device):
    generator = torch.Generator().manual_seed(0)
    dense = nn.Linear(24, 12)
    mask = torch.rand(12, 24, generator=generator) < 0.3
    with torch.no_grad():
        dense.weight.copy_(torch.randn(12, 24, generator=generator))  # active and inactive weights nonzero
    reference = nn.Linear(24, 12).to(device)
    with torch.no_grad():
        reference.weight.copy_(dense.weight * mask)
        reference.bias.copy_(dense.bias)
    layer = SparseLinear.from_linear(dense.to(device), mask=mask)  # a CPU mask goes to the weight's device
    assert layer.mask.device == layer.weight.device == torch.device(device)
    x = torch.randn(5, 3, 24, generator=generator).to(device)
    x_layer, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = layer(x_layer), reference(x_reference)
    grad = torch.randn(y.shape, generator=generator).to(device)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(x_layer.grad, x_reference.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad * mask.to(device))
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad)
    assert not layer.weight[~layer.mask].any() and not layer.weight.grad[~layer.mask].any()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)  # the no-grad forward too
    torch.testing.assert_close(layer.to_linear()(x), expected)


def test_a_layer_made_on_a_device_holds_a_given_cpu_mask_there(device):
    mask = torch.eye(3, 4, dtype=torch.bool)
    layer = SparseLinear(4, 3, mask=mask, device=device)
    assert layer.mask.device == torch.device(device) and torch.equal(layer.mask.cpu(), mask)
    assert layer(torch.ones(2, 4, device=device)).shape == (2, 3)
    assert layer.active_links == 3 and not layer.weight[~layer.mask].any()
