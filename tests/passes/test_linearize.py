"""Linearize pass: transformers Conv1D layers (weight [in, out]) become nn.Linear, outputs unchanged."""
import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparsify.passes.linearize import TRANSPOSED, SplitMultiheadAttention, linearize, transposed_back

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
    transposed_back(back, found)
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


class HandWritten(nn.Linear):
    """Falcon's FalconLinear: the linear product written by hand (a matmul in the graph)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Shifted(nn.Linear):
    """A subclass that is not a plain linear product."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_linear_subclasses_with_their_own_forward_are_swapped_only_when_they_compute_the_product():
    torch.manual_seed(0)
    model = nn.Sequential(HandWritten(6, 5), nn.ReLU(), HandWritten(5, 4, bias=False), nn.ReLU(), Shifted(4, 3))
    first, second = model[0].weight, model[2].weight
    x = torch.randn(2, 6)
    before = model(x).detach()
    found = linearize(model)
    assert sorted(found) == ["0", "2"] and "HandWritten" in found["0"]
    assert type(model[0]) is nn.Linear and model[0].weight is first and model[2].weight is second
    assert model[2].bias is None and type(model[4]) is Shifted
    assert torch.equal(model(x), before)
    transposed_back(model, found)  # only Conv1D-made layers go back
    assert type(model[0]) is nn.Linear


def test_falcon_gets_its_linear_sites_and_a_subclass_doing_more_is_left_dense_with_the_reason():
    from transformers import FalconConfig, FalconForCausalLM

    import sparsify

    model = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           new_decoder_architecture=False)).eval()
    model.transformer.h[1].mlp.dense_4h_to_h.__class__ = Shifted
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {"version": 1, "unmatched": "sparsify", "defaults": {"density": 0.5}}, x)
    assert len(handle.sites) == 7
    why = handle.analysis.sites.excluded["transformer.h.1.mlp.dense_4h_to_h"]
    assert why == ("Shifted overrides nn.Linear.forward with more than the linear product; a sparse layer in its "
                   "place would drop the rest")
    assert type(model.transformer.h[1].mlp.dense_4h_to_h) is Shifted
    assert "linearized: 7 module(s): FalconLinear (an nn.Linear subclass" in handle.summary()


def test_a_graph_module_is_left_as_given():
    """A GraphModule's graph may read a layer's [in, out] weight directly, so none of its layers is swapped."""
    from torch import fx

    class KeepConv1D(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, Conv1D) or super().is_leaf_module(m, qualname)

    root = nn.Sequential(Conv1D(3, 4))
    graph_module = fx.GraphModule(root, KeepConv1D().trace(root))
    x = torch.randn(2, 4)
    before = graph_module(x)
    assert linearize(graph_module) == {}
    assert isinstance(graph_module.get_submodule("0"), Conv1D) and torch.equal(graph_module(x), before)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["packed", "kdim", "no bias"])
def test_split_attention_gives_multihead_attention_s_outputs_and_weights(batch_first, kind):
    torch.manual_seed(0)
    kdim = 24 if kind == "kdim" else None
    mha = nn.MultiheadAttention(32, 4, bias=kind != "no bias", kdim=kdim, vdim=kdim, batch_first=batch_first).eval()
    split = SplitMultiheadAttention(mha).eval()
    b, t, s = 3, 5, 7
    def layout(x):
        return x if batch_first else x.transpose(0, 1)
    q, k = layout(torch.randn(b, t, 32)), layout(torch.randn(b, s, kdim or 32))
    v = layout(torch.randn(b, s, kdim or 32))
    causal = torch.triu(torch.ones(t, s, dtype=torch.bool), 1)
    padding = torch.zeros(b, s, dtype=torch.bool)
    padding[0, -2:] = True
    cases = [{}, {"attn_mask": causal}, {"key_padding_mask": padding},
             {"attn_mask": torch.randn(b * 4, t, s), "key_padding_mask": padding},
             {"need_weights": False, "attn_mask": causal, "key_padding_mask": padding},
             {"average_attn_weights": False, "key_padding_mask": padding}]
    with torch.no_grad():
        for case in cases:
            expected, expected_weights = mha(q, k, v, **case)
            got, weights = split(q, k, v, **case)
            assert (got - expected).abs().max() <= 1e-5, case
            assert (weights is None) == (expected_weights is None), case
            if weights is not None:
                assert (weights - expected_weights).abs().max() <= 1e-6, case
        single = split(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0],
                       v[0] if batch_first else v[:, 0])  # unbatched
        reference = mha(q[0] if batch_first else q[:, 0], k[0] if batch_first else k[:, 0],
                        v[0] if batch_first else v[:, 0])
        assert (single[0] - reference[0]).abs().max() <= 1e-5 and (single[1] - reference[1]).abs().max() <= 1e-6


def test_a_transformer_encoder_gets_its_linear_layers_and_attention_coupling():
    import sparsify

    module = load_example("torch_transformer")
    model, (x,) = module.build_model(), module.example_inputs()
    with torch.no_grad():
        before = model(x)
    model, handle = sparsify.sparsify(model, {"version": 1, "unmatched": "sparsify", "defaults": {"density": 0.5}}, x)
    assert len(handle.sites) == 13  # q, k, v, out, linear1, linear2 per layer, and the head
    assert len(handle.coupling.attentions) == 2
    assert isinstance(model.encoder.layers[0].self_attn, SplitMultiheadAttention)
    assert not model.encoder.use_nested_tensor
    full, _ = sparsify.sparsify(module.build_model(), {"version": 1, "unmatched": "sparsify",
                                                        "defaults": {"density": 1.0}}, x)
    with torch.no_grad():
        assert (full(x) - before).abs().max() <= 1e-5  # split attention at full density: the original outputs
