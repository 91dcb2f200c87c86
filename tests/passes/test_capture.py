import pytest
import torch
from torch import fx, nn

from sparsify.errors import CaptureError
from sparsify.passes.capture import EXPORT, GIVEN, SYMBOLIC, capture

from model_zoo import load_example


def test_mlp_traces_symbolically():
    m = load_example("mlp")
    cap = capture(m.build_model(), m.example_inputs())
    assert cap.kind == SYMBOLIC and cap.fallback_reason is None
    assert sum(n.op == "call_module" for n in cap.graph_module.graph.nodes) == 4


def test_assert_on_sequence_length_falls_back_to_export():
    m = load_example("nanogpt")
    cap = capture(m.build_model(), m.example_inputs())
    assert cap.kind == EXPORT
    assert "nanogpt.py:72" in cap.fallback_reason and "assert t <= self.block_size" in cap.fallback_reason
    assert "symbolic_trace failed" in cap.describe()


def test_graph_module_is_used_as_given():
    m = load_example("mlp")
    gm = fx.symbolic_trace(m.build_model())
    assert capture(gm, m.example_inputs()).kind == GIVEN


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a value: neither capture can keep it
            return self.fc(x)
        return x.nonzero()


def test_both_captures_failing_names_both_and_the_line():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.ones(2, 4),))
    text = str(info.value)
    assert "torch.fx.symbolic_trace:" in text and "torch.export.export(strict=False):" in text
    assert "test_capture.py" in text and "if x.sum() > 0" in text
    assert "What to do" in text


def test_model_failing_on_its_own_inputs():
    with pytest.raises(CaptureError, match="fails on its own example inputs"):
        capture(nn.Linear(4, 4), (torch.ones(2, 5),))


def test_capture_leaves_training_mode_as_it_was():
    model = load_example("mlp").build_model().train()
    capture(model, (torch.zeros(2, 784),))
    assert model.training


def test_an_encoder_decoder_whose_decoder_has_its_own_cache_config_is_captured():
    """T5's decoder holds a copy of the config: its cache is off during capture too, then back on."""
    from transformers import T5Config, T5ForConditionalGeneration

    from sparsify.passes.find_linears import find_linears

    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0)).eval()
    configs = {id(m.config): m.config for m in model.modules() if getattr(m, "config", None) is not None}
    before = {k: c.use_cache for k, c in configs.items()}
    assert list(before.values()).count(True) == 2  # the model's and its decoder's (the encoder's is off)
    x = {"input_ids": torch.randint(0, 128, (2, 8)), "decoder_input_ids": torch.randint(0, 128, (2, 5))}
    cap = capture(model, x)
    assert cap.kind == EXPORT
    assert len(find_linears(model, cap).sites) == 32  # q, k, v, o and two MLP layers per block, cross-attention too
    assert {k: c.use_cache for k, c in configs.items()} == before
