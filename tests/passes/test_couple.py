"""Golden dumps of sites and coupling groups, checked by hand once, then by these tests.

Regenerate after an intended change with SPARSIFY_UPDATE_GOLDEN=1 and read the diff.
"""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsify.passes.capture import capture
from sparsify.passes.couple import DotGroup, MulGroup, ChainGroup, _collect, _Propagator, couple, unique_rows
from sparsify.passes.find_linears import find_linears
from sparsify.passes.linearize import linearize

from model_zoo import load_example

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def analyze(name):
    m = load_example(name)
    model = m.build_model()
    linearize(model)
    cap = capture(model, m.example_inputs())
    return model, couple(cap, find_linears(model, cap))


@pytest.mark.parametrize("name", ["mlp", "nanogpt", "llama", "meta_llama", "hf_llama", "hf_gpt_neox", "hf_bert", "hf_phi",
                                  "hf_phi3", "hf_deepseek_v3", "hf_gpt2", "torch_transformer", "hf_rwkv"])
def test_golden_dump(name):
    _, coupling = analyze(name)
    text = coupling.dump()
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("SPARSIFY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_mlp_chains_in_order():
    _, c = analyze("mlp")
    chains = sorted((g.src, g.dst) for g in c.groups if isinstance(g, ChainGroup))
    assert chains == [("fc1", "fc2"), ("fc2", "fc3"), ("fc3", "fc4")]
    for g in c.groups:
        assert np.array_equal(g.mapping, np.arange(1568))
        assert g.trail == ("relu",)
    assert c.boundaries == {("fc1", "in"): {"model input"}, ("fc4", "out"): {"model output"}}


def test_llama_qk_gqa_and_rope():
    _, c = analyze("llama")
    dots = [g for g in c.groups if isinstance(g, DotGroup)]
    assert len(dots) == 2
    g = next(d for d in dots if d.q == "layers.0.self_attn.q_proj")
    assert g.k == "layers.0.self_attn.k_proj" and g.head_dim == 16
    q_heads, kv_heads, share = g.heads()
    assert (q_heads, kv_heads) == (4, 2)
    assert share == {0: [0, 1], 1: [2, 3]}
    # q feature h*16+d meets k feature (h//2)*16+d, for every head h and dim d
    expected = sorted((h * 16 + d, (h // 2) * 16 + d) for h in range(4) for d in range(16))
    assert sorted(map(tuple, g.pairs.tolist())) == expected
    # RoPE pairs dims d and d+8 of every head, on both q and k
    assert sorted(map(tuple, g.rope["layers.0.self_attn.q_proj"].tolist())) == \
        sorted((h * 16 + d, h * 16 + d + 8) for h in range(4) for d in range(8))
    assert len(g.rope["layers.0.self_attn.k_proj"]) == 2 * 8


def test_llama_gate_up_and_v_o():
    _, c = analyze("llama")
    mul = next(g for g in c.groups if isinstance(g, MulGroup) and g.a.startswith("layers.0."))
    assert (mul.a, mul.b) == ("layers.0.mlp.gate_proj", "layers.0.mlp.up_proj")
    assert mul.trails[0] == ("silu",)
    assert np.array_equal(mul.pairs, np.stack([np.arange(128)] * 2, 1))
    vo = next(g for g in c.groups if isinstance(g, ChainGroup) and g.dst == "layers.0.self_attn.o_proj")
    assert vo.src == "layers.0.self_attn.v_proj"
    # o's input column (q head h, dim d) reads v feature (kv head h//2, dim d)
    assert vo.mapping.tolist() == [(h // 2) * 16 + d for h in range(4) for d in range(16)]


def test_nanogpt_fused_qkv_split():
    _, c = analyze("nanogpt")
    dot = next(g for g in c.groups if isinstance(g, DotGroup) and g.q == "h.0.attn.c_attn")
    assert dot.k == "h.0.attn.c_attn"
    assert dot.pairs.tolist() == [[i, 32 + i] for i in range(32)]
    chain = next(g for g in c.groups if isinstance(g, ChainGroup) and g.dst == "h.0.attn.c_proj")
    assert chain.mapping.tolist() == list(range(64, 96))
    assert c.sites.excluded == {"lm_head": "weight tied to wte.weight"}


def test_meaningless_names_give_the_same_groups():
    model, c = analyze("llama")
    anon, ca = analyze("llama_anon")
    names = dict(zip([n for n, _ in anon.named_modules()], [n for n, _ in model.named_modules()]))
    classes = {"Blk": "DecoderLayer", "Mixer": "Attention", "Ffn": "MLP", "Net": "Llama"}
    text = ca.dump()
    for old, new in sorted({**names, **classes}.items(), key=lambda kv: -len(kv[0])):
        if old:
            text = re.sub(rf"(?<![\w.]){re.escape(old)}(?![\w])", new, text)
    # the dump is sorted by name, so compare its lines as sets of the same size
    assert sorted(text.splitlines()) == sorted(c.dump().splitlines())
    assert len(ca.groups) == len(c.groups) == 10


def test_bloom_scores_through_baddbmm_are_attention():
    """Bloom computes its scores as baddbmm(alibi, q, kᵀ): q and k of each head (interleaved in one
    fused layer, [head, q/k/v, dim]) are dot-coupled, the probabilities times v make v -> dense an
    attention chain, and the added ALiBi bias couples nothing."""
    import transformers

    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=128, hidden_size=64, n_layer=1,
                                                                   n_head=4)).eval()
    linearize(model)
    cap = capture(model, {"input_ids": torch.randint(0, 128, (2, 8))})
    c = couple(cap, find_linears(model, cap))
    qkv = "transformer.h.0.self_attention.query_key_value"
    dot = next(g for g in c.groups if isinstance(g, DotGroup))
    assert (dot.q, dot.k, dot.head_dim) == (qkv, qkv, 16)
    assert dot.pairs.tolist() == [[h * 48 + d, h * 48 + 16 + d] for h in range(4) for d in range(16)]
    chain = next(g for g in c.groups if isinstance(g, ChainGroup) and g.src == qkv)
    assert chain.trail[-1] == "attention" and chain.mapping.tolist() == [h * 48 + 32 + d for h in range(4) for d in range(16)]
    assert [(a.q, a.k, a.v) for a in c.attentions] == [(qkv, qkv, qkv)]
    assert (qkv, "out") not in c.boundaries


class SplitKey(torch.nn.Module):
    """A key built from two layers, as DeepSeek's latent attention builds it: each head's first 8
    dimensions from its own rows of ``k_own``, the last 4 from ``k_shared``, one part for every head,
    written into an empty tensor (``copy``) or placed with ``slice_scatter``."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.q, self.k_own, self.k_shared, self.v = (torch.nn.Linear(16, n) for n in (48, 32, 4, 32))
        self.o = torch.nn.Linear(32, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 12).transpose(1, 2)
        own = self.k_own(x).view(b, t, 4, 8).transpose(1, 2)
        shared = self.k_shared(x).view(b, 1, t, 4).expand(-1, 4, -1, -1)
        if self.how == "copy":
            k = own.new_empty(b, 4, t, 12)
            k[..., :8].copy_(own)
            k[..., 8:].copy_(shared)
        else:
            k = torch.slice_scatter(torch.zeros(b, 4, t, 12), own, dim=-1, start=0, end=8)
            k = torch.slice_scatter(k, shared, dim=-1, start=8)
        v = self.v(x).view(b, t, 4, 8).transpose(1, 2)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, 32))


@pytest.mark.parametrize("how", ["copy", "slice_scatter"])
def test_a_key_written_part_by_part_couples_each_part(how):
    model = SplitKey(how).eval()
    cap = capture(model, (torch.randn(2, 5, 16),))
    c = couple(cap, find_linears(model, cap))
    dots = {g.k: g for g in c.groups if isinstance(g, DotGroup)}
    assert dots["k_own"].pairs.tolist() == [[h * 12 + d, h * 8 + d] for h in range(4) for d in range(8)]
    assert dots["k_own"].heads() == (4, 4, {h: [h] for h in range(4)})
    assert dots["k_shared"].pairs.tolist() == [[h * 12 + 8 + d, d] for h in range(4) for d in range(4)]
    assert dots["k_shared"].heads() == (4, 1, {0: [0, 1, 2, 3]})  # one part every head reads
    assert [(a.q, a.k, a.v, a.shared) for a in c.attentions] == [("q", "k_own", "v", ("k_shared",))]
    assert not c.notes and ("k_own", "out") not in c.boundaries


class ComplexRotary(torch.nn.Module):
    """Meta's LLaMA rotary embedding: each head's features in pairs (2d, 2d+1) as complex numbers,
    times a complex buffer unsqueezed over the heads; ``rope`` picks what the pairs go through."""

    def __init__(self, rope="mul"):
        super().__init__()
        self.rope = rope
        self.q, self.k, self.v = (torch.nn.Linear(16, 32) for _ in range(3))
        self.o = torch.nn.Linear(32, 16)
        angles = torch.outer(torch.arange(8), 1e4 ** (-torch.arange(0, 8, 2) / 8))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))

    def rotary(self, x, t):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        if self.rope == "mul":
            return torch.view_as_real(pairs * self.freqs_cis[:t].unsqueeze(1)).flatten(3).type_as(x)
        return torch.view_as_real(pairs.conj().resolve_conj()).flatten(3)  # an op on complex numbers it does not know

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (self.rotary(layer(x).view(b, t, 4, 8), t) if layer is not self.v else layer(x).view(b, t, 4, 8)
                   for layer in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(b, t, 32))


def test_features_go_through_complex_numbers_and_their_pairs_are_coupled():
    model = ComplexRotary().eval()
    cap = capture(model, (torch.randn(2, 5, 16),))
    c = couple(cap, find_linears(model, cap))
    dot = next(g for g in c.groups if isinstance(g, DotGroup))
    assert (dot.q, dot.k) == ("q", "k") and dot.pairs.tolist() == [[i, i] for i in range(32)]
    assert dot.heads() == (4, 4, {h: [h] for h in range(4)})
    for site in ("q", "k"):  # the product by freqs_cis mixes each complex number's two parts
        assert dot.rope[site].tolist() == [[2 * d, 2 * d + 1] for d in range(16)]
    assert [(a.q, a.k, a.v) for a in c.attentions] == [("q", "k", "v")]
    assert not c.notes and ("q", "out") not in c.boundaries


def test_an_unknown_op_on_complex_numbers_ends_the_features():
    model = ComplexRotary(rope="conj").eval()
    cap = capture(model, (torch.randn(2, 5, 16),))
    c = couple(cap, find_linears(model, cap))
    assert not [g for g in c.groups if isinstance(g, DotGroup)]
    assert any("on complex numbers" in reason for reason in c.boundaries[("q", "out")])


@pytest.mark.parametrize("loop", ["fixed", "unbind", "cumsum"])
def test_a_per_channel_recurrence_couples_receptance_key_and_value(loop):
    """RWKV-like time mixing: sigmoid(r) * state, state_t = decay * state_{t-1} + k_t * v_t channel by
    channel, whether the loop over time is unrolled by symbolic_trace (a fixed length), by torch.export
    (the input's steps) or written as a prefix sum: r, k and v are one product, feature i with
    feature i, all feeding the output layer, and the decay is cut with them."""
    m = load_example("recurrent")
    model = m.build_model(loop)
    linearize(model)
    cap = capture(model, m.example_inputs())
    c = couple(cap, find_linears(model, cap))
    assert cap.kind.startswith("torch.export") == (loop == "unbind")
    t = "blocks.0.time."
    lines = [line for line in c.group_lines() if t in line]
    assert lines == [
        f"chain  {t}key -> mul -> {t}output  (64 features, in order)",
        f"chain  {t}receptance -> sigmoid -> mul -> {t}output  (64 features, in order)",
        f"chain  {t}value -> mul -> {t}output  (64 features, in order)",
        f"mul    {t}key * {t}value  (64 rows, row i with row i)",
        f"mul    sigmoid({t}receptance) * mul({t}key)  (64 rows, row i with row i)",
        f"mul    sigmoid({t}receptance) * mul({t}value)  (64 rows, row i with row i)",
    ]
    for a, b in [("key", "value"), ("receptance", "key"), ("receptance", "value")]:
        mul = next(g for g in c.groups if isinstance(g, MulGroup) and (g.a, g.b) == (t + a, t + b))
        assert np.array_equal(mul.pairs, np.stack([np.arange(64)] * 2, 1))
    assert not [key for key in c.boundaries if key[0].startswith(t) and key[1] == "out" and key[0] != t + "output"]
    assert sorted(c.parameters) == [f"blocks.{i}.time.{s}" for i in range(2) for s in ("key", "value")]
    decay = c.parameters[t + "key"][0]
    assert (decay.name, decay.dim) == (t + "decay", 0) and np.array_equal(decay.mapping, np.arange(64))


def test_rwkv_time_mixing_is_one_product_of_receptance_key_and_value():
    """Hugging Face RWKV: sigmoid(r) times a running weighted average of v with weights exp(k) (the
    running maximum of k kept for stability), per channel: r, k and v rows go together, with the
    channel's time_decay and time_first."""
    _, c = analyze("hf_rwkv")
    a = "rwkv.blocks.0.attention."
    assert sorted((g.src, g.dst) for g in c.groups if isinstance(g, ChainGroup) and g.dst == a + "output") == [
        (a + "key", a + "output"), (a + "receptance", a + "output"), (a + "value", a + "output")]
    muls = {(g.a, g.b) for g in c.groups if isinstance(g, MulGroup) and g.a.startswith(a)}
    assert {(a + "key", a + "value"), (a + "receptance", a + "key"), (a + "receptance", a + "value")} <= muls
    assert all(np.array_equal(g.pairs, np.stack([np.arange(32)] * 2, 1)) for g in c.groups
               if isinstance(g, MulGroup) and g.a.startswith(a))
    assert [(p.name, p.dim) for p in c.parameters[a + "key"]] == [(a + "time_decay", 0), (a + "time_first", 0)]
    assert (a + "key", "out") not in c.boundaries and (a + "value", "out") not in c.boundaries


class _Held(_Propagator):
    """The propagator, measuring the index tensors it holds between two nodes."""

    peak = 0

    def run_node(self, node):
        value = super().run_node(node)
        found = []
        for tags in self.tags.values():
            _collect(tags, found)
        self.peak = max(self.peak, sum(t.idx.numel() * t.idx.element_size() for tags in found for t in tags.values()))
        return value


def held_index_bytes(depth: int, tokens: int) -> int:
    layers = [m for _ in range(depth) for m in (torch.nn.Linear(32, 32), torch.nn.ReLU())]
    model = torch.nn.Sequential(*layers).eval()
    cap = capture(model, (torch.randn(2, tokens, 32),))
    prop = _Held(cap.graph_module, find_linears(model, cap))
    prop.run(*cap.flat_inputs)
    assert len(prop.chains) == depth - 1  # the analysis itself is whole
    return prop.peak


def test_index_tensors_are_dropped_after_their_last_reader():
    """What the pass holds is one layer's working set: it does not grow with depth, and grows with
    the example inputs only as their size (2 x 8 tokens x 32 features x 4 bytes per index tensor)."""
    one = 2 * 8 * 32 * 4
    assert held_index_bytes(2, 8) == held_index_bytes(12, 8) == one  # the last node's output alone
    assert held_index_bytes(12, 32) == 4 * held_index_bytes(12, 8)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(1, 5), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_unique_rows_is_numpys_unique_rows(n, width, spread, seed):
    rows = np.random.default_rng(seed).integers(-1, spread, size=(n, width))
    assert np.array_equal(unique_rows(rows), np.unique(rows, axis=0))
