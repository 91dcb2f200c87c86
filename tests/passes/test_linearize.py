"""Linearize pass: transformers Conv1D layers (weight [in, out]) become nn.Linear, outputs unchanged."""
import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsify.passes.linearize import TRANSPOSED, linearize, transposed_back

from model_zoo import load_example


def logits(model, x):
    with torch.no_grad():
        return model(**x).logits


def test_gpt2_conv1d_layers_become_linear_with_the_same_outputs():
    module = load_example("hf_gpt2")
    model, x = module.build_model(), module.example_inputs()
    before = logits(model, x)
    conv = model.transformer.h[0].mlp.c_fc
    found = linearize(model)
    assert sorted(found) == sorted(f"transformer.h.{i}.{p}" for i in range(2)
                                   for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert set(found.values()) == {TRANSPOSED}
    linear = model.transformer.h[0].mlp.c_fc
    assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (64, 256)
    assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias)
    assert model.state_dict()["transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert (logits(model, x) - before).abs().max() <= 1e-5
    assert linearize(model) == {}  # nothing left to swap

    back = copy.deepcopy(model)
    transposed_back(back, sorted(found))
    assert type(back.transformer.h[1].attn.c_attn) is Conv1D
    assert back.transformer.h[1].attn.c_attn.weight.shape == (64, 192)
    assert (logits(back, x) - before).abs().max() <= 1e-5


def test_other_layers_named_conv1d_are_left_alone():
    class Conv1D(nn.Module):  # a user's own class of that name: not transformers'
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(Conv1D(), nn.Linear(3, 2))
    assert linearize(model) == {}
    assert isinstance(model[0], Conv1D) and type(model[1]) is nn.Linear
