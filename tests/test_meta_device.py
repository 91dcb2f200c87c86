"""Models built on the meta device (weights without storage): captured, coupled and planned as the
same model with real weights is, and refused where real weights are needed (docs/capture.md)."""
import pytest
import torch

import sparsify
from sparsify.errors import CaptureError, PlanError
from sparsify.passes.capture import EXPORT, capture, on_meta
from sparsify.passes.pipeline import analyze

from model_zoo import load_example

POLICY = {"version": 1, "seed": 0, "rules": [
    {"match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"}, "sparsity": 0.7, "method": "CHTss"}]}


def on_meta_device(name):
    m = load_example(name)
    with torch.device("meta"):
        model = m.build_model()
    return m, model


def body(coupling):
    """The coupling dump without its first line, which names the capture and why."""
    return coupling.dump().split("\n", 1)[1]


@pytest.fixture(scope="module")
def hf_llama_plans():
    """sparsify.plan's reports on the small Hugging Face Llama: real weights, then on meta."""
    m, meta = on_meta_device("hf_llama")
    return sparsify.plan(m.build_model(), POLICY, m.example_inputs()), sparsify.plan(meta, POLICY, m.example_inputs()), meta


def test_hf_llama_on_meta_has_the_real_models_groups_and_plan(hf_llama_plans):
    real, planned, meta = hf_llama_plans
    assert planned.analysis.capture.kind == EXPORT and "meta device" in planned.analysis.capture.describe()
    assert len(planned.analysis.coupling.groups) == len(real.analysis.coupling.groups) == 10
    assert body(planned.analysis.coupling) == body(real.analysis.coupling)
    assert planned.rows() == real.rows()
    assert sum(r["density"] is not None for r in planned.rows()) == 14  # 2 layers x 7 projections
    assert all(p.is_meta for p in meta.parameters())  # planning allocated nothing


def test_meta_llama_on_meta_has_the_real_models_groups():
    """Meta's LLaMA: rotary embeddings through complex numbers, followed on meta as on the CPU."""
    m, meta = on_meta_device("meta_llama")
    assert on_meta(meta) and not on_meta(m.build_model())
    real = analyze(m.build_model(), m.example_inputs())
    planned = analyze(meta, m.example_inputs())  # CPU inputs: moved to meta by the capture
    assert len(planned.coupling.groups) == len(real.coupling.groups) > 0
    assert body(planned.coupling) == body(real.coupling)


def test_falcon_on_meta_is_linearized_and_coupled_as_the_real_model():
    """Falcon writes its linear product by hand: linearize checks it on a CPU copy with random weights."""
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    real = FalconForCausalLM(config).eval()
    with torch.device("meta"):
        meta = FalconForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 128, (1, 8))}
    a, b = analyze(real, inputs), analyze(meta, inputs)
    assert b.linearized == a.linearized and len(b.linearized) == 4
    assert body(b.coupling) == body(a.coupling)


def test_sparsify_refuses_meta_weights_and_says_what_to_do():
    m, meta = on_meta_device("hf_llama")
    with pytest.raises(PlanError, match=r"14 planned layer\(s\), the first model.layers.0.self_attn.q_proj, hold "
                                        r"their weights on the meta device.*sparsify.plan"):
        sparsify.sparsify(meta, POLICY, m.example_inputs())


def test_a_tensor_made_on_the_cpu_in_forward_is_named_with_the_fix():
    """A known limit: forward() that makes a tensor without a device (torch.arange(T)) mixes it with
    meta activations; the error names the line and the fix."""
    m, meta = on_meta_device("llama")
    with pytest.raises(CaptureError, match=r"meta device.*llama.py:\d+.*device=x.device"):
        capture(meta, m.example_inputs())
