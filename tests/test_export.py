"""Export: the trained sparse model, shrunk, to ONNX and .pt2, checked against itself."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import sparsify
from sparsify.errors import ExportError
from sparsify.export.onnx_file import OnnxModel, to_onnx
from sparsify.export.report import print_report
from sparsify.onnx_layers import GatherLinear
from sparsify.passes.couple import Attention
from sparsify.inputs import ExampleInputs

from model_zoo import load_example

ROOT = Path(__file__).resolve().parent.parent
EVERY = {"version": 1, "unmatched": "sparsify"}


def kill(handle, rows=(), columns=()):
    """Cut every input link of some rows and every link of some columns, as training might."""
    with torch.no_grad():
        for name, selection in rows:
            handle.sites[name].module.mask[selection] = False
        for name, selection in columns:
            handle.sites[name].module.mask[:, selection] = False
        for site in handle.sites.values():
            site.module.apply_mask()


def reference(model, inputs):
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    return getattr(out, "logits", out)


def ort_outputs(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), feed)})[0]


def export_tokens(handle, x, tmp_path):
    """Export a token model to m.onnx, checked on 3 x 11 held-out tokens; returns the report and the
    generator (seed 0) that drew them, which draws the tests' further inputs."""
    g = torch.Generator().manual_seed(0)
    report = handle.export(tmp_path / "m.onnx", x, held_out=[{"input_ids": torch.randint(0, 128, (3, 11), generator=g)}],
                           compare_dense=False)
    return report, g


def test_mlp_shrinks_folds_constants_and_matches_in_torch_and_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = load_example("mlp").MLP((20, 64, 64, 64, 5))
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.3}}, torch.randn(2, 20))
    g = torch.Generator().manual_seed(0)
    kill(handle, rows=[("fc1", torch.randperm(64, generator=g)[:10]), ("fc2", slice(5, 15))],
         columns=[("fc3", slice(20, 30)), ("fc4", [1, 2, 3])])
    held = [(torch.randn(16, 20),), (torch.randn(3, 20),)]
    report = handle.export(tmp_path / "mlp.onnx", (torch.randn(4, 20),), held_out=held)
    units = {u["into"]: u for u in report["units"]}
    assert (units["fc2"]["folded"], units["fc2"]["kept"]) == (10, 54)  # relu(bias) of input-less fc1 rows
    assert (units["fc3"]["unused"], units["fc3"]["folded"], units["fc3"]["kept"]) == (10, 10, 44)
    assert units["fc4"]["unused"] >= 3  # the killed columns, and those the 30% density left empty
    assert report["parameters"]["after"] < report["parameters"]["before"]
    shrunk = torch.export.load(tmp_path / "mlp.pt2").module()
    assert report["parameters"]["nonzero"] == sum(int(t.count_nonzero()) for t in shrunk.parameters())
    assert report["parameters"]["nonzero"] < report["parameters"]["after"] * 0.4  # density 0.3, plus biases
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    onnx.checker.check_model(str(tmp_path / "mlp.onnx"))
    assert report["latency_ratio"] > 0 and report["size_ratio"] < 1
    x = torch.randn(7, 20)  # a batch size the export never saw
    expected = reference(model, (x,))
    assert np.abs(ort_outputs(tmp_path / "mlp.onnx", [x]) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "mlp.pt2"))  # reloads without the model's source
    assert (program.module()(x) - expected).abs().max() <= 1e-5
    saved = json.loads((tmp_path / "mlp.json").read_text())
    assert saved["units"] == report["units"]


@pytest.mark.parametrize("name", ["llama", "hf_llama"])
def test_gated_mlps_of_llama_decoders_shrink_with_rope_and_gqa_attention_intact(tmp_path, name):
    module = load_example(name)
    model, x = module.build_model(), module.example_inputs()
    policy = {**EVERY, "defaults": {"density": 0.5}, "rules": [{"match": {"regex": ".*head.*"}, "skip": True}]}
    model, handle = sparsify.sparsify(model, policy, x)
    g = torch.Generator().manual_seed(1)
    rows, columns = [], []
    for site in handle.sites:
        if site.endswith(("gate_proj", "up_proj", "q_proj", "k_proj")):
            rows.append((site, torch.randperm(handle.sites[site].module.out_features, generator=g)[:24]))
        if site.endswith("down_proj"):
            columns.append((site, slice(40, 60)))
    kill(handle, rows, columns)
    tokens = torch.randint(0, 128, (3, 11), generator=g)
    held = [{"input_ids": tokens}] if isinstance(x, dict) else [(tokens,)]
    report = handle.export(tmp_path / "m.onnx", x, held_out=held, compare_dense=False)
    assert all(u["kept"] < u["neurons"] for u in report["units"]) and len(report["units"]) == 2
    assert all("attention" in why for why in report["not_shrunk"].values())
    assert report["onnxruntime_max_abs_diff"] <= 1e-4 and report["torch_max_abs_diff"] <= 1e-5
    other = torch.randint(0, 128, (2, 6), generator=g)  # batch and sequence lengths the export never saw
    expected = reference(model, {"input_ids": other} if isinstance(x, dict) else (other,))
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
    if name == "hf_llama":
        kept = {u["kept"] for u in report["units"]}
        assert report["hf_config"]["rewritten"] == (len(kept) == 1)


@pytest.mark.parametrize("name", ["llama", "meta_llama", "hf_llama", "hf_bert", "hf_phi", "torch_transformer"])
def test_dead_head_groups_go_with_their_q_k_v_rows_and_o_columns(tmp_path, name):
    module = load_example(name)
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5},
                                              "rules": [{"match": {"regex": ".*(head|pooler|classifier).*"},
                                                         "skip": True}]}, x)
    first, second = handle.coupling.attentions[:2]
    o_of = {g.src: g.dst for g in handle.coupling.groups if g.kind == "chain" and "attention" in g.trail}
    kv_heads = handle.sites[first.k].module.out_features // 16  # head_dim 16, 4 q heads in every example
    group = 4 // kv_heads * 16  # o's columns of the q heads sharing one kv head
    with torch.no_grad():
        v = handle.sites[first.v].module
        v.mask[16:32] = False  # the second kv group's v rows have no input: it outputs v's bias
        v.apply_mask()
        if v.bias is not None:
            v.bias[16:32] = torch.linspace(-1, 1, 16)  # a constant that must be folded into o's bias
        o = handle.sites[o_of[second.v]].module
        o.mask[:, :group] = False  # nothing reads the first group's heads
        o.apply_mask()
    g = torch.Generator().manual_seed(2)

    def inputs(batch, length):  # token ids, and an attention mask where the model takes one
        if name == "torch_transformer":  # nn.TransformerEncoder (split by linearize) on embeddings
            return (torch.randn(batch, length, 64, generator=g),)
        tokens = torch.randint(0, 100, (batch, length), generator=g)
        return {k: tokens if k == "input_ids" else torch.ones_like(tokens) for k in x} if isinstance(x, dict) \
            else (tokens,)

    report = handle.export(tmp_path / "m.onnx", x, held_out=[inputs(3, 11)], compare_dense=False)
    heads = {h["into"]: h for h in report["heads"]}
    assert len(heads) == 2 and {h["kept_kv"] for h in heads.values()} == {kv_heads - 1}
    assert {h["kept"] for h in heads.values()} == {4 - 4 // kv_heads}
    assert heads[o_of[first.v]]["folded"] == (1 if v.bias is not None else 0)
    if name in ("hf_llama", "hf_bert"):  # every attention kept the same heads: the config follows if it can
        assert report["hf_config_heads"] == ({"rewritten": True, "num_attention_heads": 2, "num_key_value_heads": 1,
                                              "head_dim": 16} if name == "hf_llama" else
                                             {"rewritten": False, "why": "BertConfig has no num_key_value_heads or "
                                                                         "head_dim: its models derive the head size "
                                                                         "from the head count"})
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert report["parameters"]["after"] < report["parameters"]["before"]
    other = inputs(2, 6)  # batch and sequence lengths the export never saw
    expected = reference(model, other)
    feed = list(other.values()) if isinstance(other, dict) else list(other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", feed) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    got = program(**other) if isinstance(other, dict) else program(*other)
    assert (getattr(got, "logits", got) - expected).abs().max() <= 1e-5
    if name == "hf_llama":  # save_pretrained of the shrunk model, which from_pretrained reloads without sparsify
        loaded = type(model).from_pretrained(report["hf_pretrained"]["folder"], use_cache=False).eval()
        assert loaded.config.num_attention_heads == 2 and loaded.model.layers[0].self_attn.q_proj.out_features == 32
        assert (reference(loaded, other) - expected).abs().max() <= 1e-5
    if name == "hf_bert":
        assert not report["hf_pretrained"]["written"]
        why = report["hf_pretrained"]["why"]
        assert why.startswith("from_pretrained cannot reload it: its config does not describe the shrunk sizes "
                              "(BertConfig has no num_key_value_heads or head_dim: its models derive the head "
                              "size from the head count; bert.encoder.layer.0.attention.")
        assert "where the config gives [64, 64]" in why


@pytest.mark.parametrize("name,qkv,o,v_rows,split", [
    # GPT-2: rows q 0-63, k 64-127, v 128-191, split by the attention's split_size
    ("hf_gpt2", "transformer.h.{}.attn.c_attn", "transformer.h.{}.attn.c_proj", slice(144, 160),
     "transformer.h.{}.attn.split_size"),
    # GPT-NeoX: q, k, v of head 0 in rows 0-47, of head 1 in 48-95, ...; viewed as (-1, 3 * head_size)
    ("hf_gpt_neox", "gpt_neox.layers.{}.attention.query_key_value", "gpt_neox.layers.{}.attention.dense",
     slice(80, 96), None)])
def test_dead_heads_of_a_fused_qkv_layer_go(tmp_path, capsys, name, qkv, o, v_rows, split):
    module = load_example(name)
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    with torch.no_grad():
        fused = handle.sites[qkv.format(0)].module
        fused.mask[v_rows] = False  # head 1's v rows have no input: it outputs v's bias
        fused.apply_mask()
        fused.bias[v_rows] = torch.linspace(-1, 1, 16)
        out = handle.sites[o.format(1)].module
        out.mask[:, 48:64] = False  # nothing reads head 3 of the second attention
        out.apply_mask()
    g = torch.Generator().manual_seed(3)
    report = handle.export(tmp_path / "m.onnx", x, held_out=[{"input_ids": torch.randint(0, 128, (3, 11), generator=g)}],
                           compare_dense=False)
    heads = {h["into"]: h for h in report["heads"]}
    assert {h["kept"] for h in heads.values()} == {3} and len(heads) == 2
    assert heads[o.format(0)]["folded"] == 1
    for i in range(2):
        assert heads[o.format(i)]["rewritten"] == ({split.format(i): 48} if split else {})
    print_report(report)
    assert (f"{qkv.format(0)} -> {o.format(0)}: 3 of 4 heads kept (3 of 4 kv heads; 1 dead groups' bias folded"
            + (f"; {split.format(0)} set to 48)" if split else ")")) in capsys.readouterr().out
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}  # shapes the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert (getattr(program(**other), "logits", None) - expected).abs().max() <= 1e-5
    assert program.state_dict()[qkv.format(0) + ".weight"].shape[0] == 144  # q, k and v of 3 heads: 3 * 48
    if split:
        assert model.transformer.h[0].attn.split_size == 64  # the trained model is left as it was


class FusedFixedHeads(torch.nn.Module):
    """nanoGPT's attention with scaled_dot_product_attention: q, k and v split from one layer by the
    residual width, views that fix the head count."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.c_attn, self.c_proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Blocks(torch.nn.Module):
    """Residual blocks around an attention, and a head."""

    def __init__(self, attention=FusedFixedHeads, dim=32, layers=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList([attention() for _ in range(layers)])
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 7)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return self.head(x)


def test_heads_of_views_that_fix_their_count_go_through_the_graph(tmp_path, capsys):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(Blocks(), {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 5, 32))
    assert handle.coupling.attentions[0].q == handle.coupling.attentions[0].v == "blocks.0.c_attn"
    kill(handle, columns=[("blocks.0.c_proj", slice(0, 8)),  # nothing reads head 0 of the first attention
                          ("blocks.1.c_proj", slice(8, 24))])  # nor heads 1 and 2 of the second
    x, other = torch.randn(2, 5, 32), torch.randn(3, 9, 32)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(x,)], compare_dense=False)
    heads = {h["into"]: h for h in report["heads"]}
    assert {o: (h["kept"], h["traced"]) for o, h in heads.items()} == {
        "blocks.0.c_proj": (3, "blocks.0"), "blocks.1.c_proj": (2, "blocks.1")}
    assert report["parameters"]["after"] == report["parameters"]["before"] - (3 * 8 * 33 + 8 * 32) - 2 * (3 * 8 * 33 + 8 * 32)
    print_report(report)
    assert "blocks.0.c_attn -> blocks.0.c_proj: 3 of 4 heads kept (3 of 4 kv heads; 0 dead groups' bias folded; " \
           "blocks.0 runs as its graph with the head sizes rewritten)" in capsys.readouterr().out
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    expected = reference(model, (other,))  # a batch and a length the export never saw
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert (program(other) - expected).abs().max() <= 1e-5
    assert program.state_dict()["blocks.1.c_attn.weight"].shape == (48, 32)  # q, k and v of 2 heads of 8
    assert type(model.blocks[0]) is FusedFixedHeads and model.blocks[0].c_attn.out_features == 96  # left as it was


class InlineBlock(torch.nn.Module):
    """Attention written inline in a block whose MLP sits beside it: the block holds the attention."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(dim, 64), torch.nn.Linear(64, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return self.fc2(torch.relu(self.fc1(x)))


def test_every_linear_layer_of_a_traced_block_stays_a_layer(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(Blocks(InlineBlock, layers=1), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 5, 32))
    kill(handle, rows=[("blocks.0.v", slice(24, 32))])
    report = handle.export(tmp_path / "m.onnx", (torch.randn(2, 5, 32),), compare_dense=False, compact=True)
    assert [(h["kept"], h["traced"]) for h in report["heads"]] == [(3, "blocks.0")]
    # the block runs as its graph, and its MLP's layers are still layers: stored as values + indices
    assert set(report["compact"]) == {f"blocks.0.{n}" for n in ("q", "k", "v", "o", "fc1", "fc2")} | {"head"}
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4


def test_heads_of_nanogpt_go(tmp_path):
    """nanoGPT's attention written out: softmax(q·kᵀ / √d), masked, times v; views of n_head heads."""
    module = load_example("nanogpt")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    assert ("h.0.attn.c_attn", "h.0.attn.c_proj", ("attention",)) in [
        (g.src, g.dst, g.trail) for g in handle.coupling.groups if g.kind == "chain"]
    kill(handle, rows=[("h.1.attn.c_attn", slice(64 + 16, 64 + 24))])  # the v rows of head 2: it outputs v's bias
    g = torch.Generator().manual_seed(1)
    report = handle.export(tmp_path / "m.onnx", x, held_out=[(torch.randint(0, 96, (3, 11), generator=g),)],
                           compare_dense=False)
    assert [(h["into"], h["kept"], h["folded"], h["traced"]) for h in report["heads"]] == [
        ("h.1.attn.c_proj", 3, 1, "h.1.attn")]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = torch.randint(0, 96, (1, 16), generator=g)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - reference(model, (other,)).numpy()).max() <= 1e-4


def test_heads_of_hugging_face_eager_attention_go(tmp_path):
    """Hugging Face's eager attention: q·kᵀ, softmax and the product with v written out, kv heads
    repeated for grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False, attn_implementation="eager")
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(LlamaForCausalLM(config).eval(), {**EVERY, "defaults": {"density": 0.5}}, x)
    assert len(handle.coupling.attentions) == 2
    kill(handle, rows=[("model.layers.1.self_attn.v_proj", slice(0, 16))])  # kv group 0: its 2 q heads output 0
    other = {"input_ids": torch.randint(0, 128, (3, 11))}
    report = handle.export(tmp_path / "m.onnx", x, held_out=[other], compare_dense=False)
    assert [(h["into"], h["kept"], h["kept_kv"], h["traced"]) for h in report["heads"]] == [
        ("model.layers.1.self_attn.o_proj", 2, 1, None)]  # it reads the head count from the tensors
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4


def t5_tokens(batch, length):
    return {"input_ids": torch.randint(0, 128, (batch, length)),
            "decoder_input_ids": torch.randint(0, 128, (batch, length - 2))}


def sparse_t5(layers):
    """A small T5ForConditionalGeneration (4 heads of 16), every linear layer at density 0.5."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=layers,
                                                num_heads=4, decoder_start_token_id=0, use_cache=False)).eval()
    x = t5_tokens(2, 8)
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    return model, handle, x


def test_t5_exports_and_its_config_follows_the_mlp_width(tmp_path):
    """T5: x.transpose(1, 2).contiguous().view(...) with dynamic sizes (the ONNX decomposition drops a
    contiguous() it cannot prove needed, then refuses the view, unless the export copies), and its
    MLP width in d_ff."""
    model, handle, x = sparse_t5(layers=1)
    kill(handle, columns=[(f"{part}.block.0.layer.{i}.DenseReluDense.wo", slice(0, 32))
                          for part, i in (("encoder", 1), ("decoder", 2))])
    report = handle.export(tmp_path / "m.onnx", x, held_out=[t5_tokens(3, 11)], compare_dense=False)
    assert report["hf_config"] == {"d_ff": 96, "rewritten": True}
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert report["hf_pretrained"]["written"]


def test_t5_heads_go_with_their_slices_of_the_shared_position_bias(tmp_path):
    """T5's first layer computes a relative position bias with one slice per head and passes it to
    every later layer of its stack. Each attention runs as its graph, in which the bias it adds to
    its scores is narrowed to its own heads kept; the bias passed on stays whole."""
    model, handle, x = sparse_t5(layers=2)
    kill(handle, columns=[("encoder.block.0.layer.0.SelfAttention.o", slice(0, 16)),  # head 0 of the first layer
                          ("encoder.block.1.layer.0.SelfAttention.o", slice(32, 48)),  # head 2 of the second
                          ("decoder.block.1.layer.1.EncDecAttention.o", slice(16, 32))])
    report = handle.export(tmp_path / "m.onnx", x, held_out=[t5_tokens(3, 11)], compare_dense=False)
    assert sorted((h["into"], h["kept"]) for h in report["heads"]) == [
        ("decoder.block.1.layer.1.EncDecAttention.o", 3), ("encoder.block.0.layer.0.SelfAttention.o", 3),
        ("encoder.block.1.layer.0.SelfAttention.o", 3)]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = t5_tokens(1, 13)
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", list(other.values())) - expected.numpy()).max() <= 1e-4
    assert report["hf_config_heads"] == {"rewritten": False, "why": "the attentions kept different numbers of heads"}
    assert not report["hf_pretrained"]["written"]


def test_t5_with_the_same_head_gone_everywhere_reloads_with_its_position_bias_narrowed(tmp_path):
    """T5's config gives the head size itself (d_kv): with the same head gone from every attention,
    num_heads is rewritten, and the saved folder keeps the kept heads' columns of each stack's
    relative position bias. Different heads gone from each attention cannot be saved so."""
    from transformers import T5ForConditionalGeneration

    model, handle, x = sparse_t5(layers=1)
    attentions = ["encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention",
                  "decoder.block.0.layer.1.EncDecAttention"]
    kill(handle, columns=[(f"{a}.o", slice(16, 32)) for a in attentions])  # head 1 everywhere
    report = handle.export(tmp_path / "m.onnx", x, held_out=[t5_tokens(3, 11)], compare_dense=False)
    assert report["hf_config_heads"] == {"rewritten": True, "num_attention_heads": 3, "narrowed": [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]}
    assert report["hf_pretrained"]["written"] and report["hf_pretrained"]["max_abs_diff"] <= 1e-5
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "m_hf").eval()
    bias = loaded.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    trained = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert loaded.config.num_heads == 3 and torch.equal(bias, trained[:, [0, 2, 3]])
    other = t5_tokens(1, 13)
    assert (reference(loaded, other) - reference(model, other)).abs().max() <= 1e-5

    model, handle, x = sparse_t5(layers=1)
    kill(handle, columns=[(f"{a}.o", slice(16 * i, 16 * i + 16)) for i, a in enumerate(attentions)])  # heads 0, 1, 2
    report = handle.export(tmp_path / "n.onnx", x, compare_dense=False)
    assert report["hf_config_heads"] == {"rewritten": False, "why": (
        "the attentions kept different heads, and encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
        ".weight (one column per head) is shared by them")}
    assert not report["hf_pretrained"]["written"]


def test_mixtral_exports_with_its_experts_in_batched_matmuls(tmp_path):
    """transformers' default experts (grouped_mm) call a custom op with no ONNX function."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                             num_experts_per_tok=2, use_cache=False)).eval()
    before = model.config._experts_implementation
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    other = {"input_ids": torch.randint(0, 128, (3, 11))}
    report = handle.export(tmp_path / "m.onnx", x, held_out=[other], compare_dense=False)
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert model.config._experts_implementation == before  # the trained model is left as it was


class ReferenceLlamaAttention(torch.nn.Module):
    """LLaMA's reference attention: views of n_heads and n_kv_heads, rotary embedding (rotate half),
    repeat_kv by expand and reshape, output viewed as (B, T, -1)."""

    def __init__(self, dim=64, n_heads=4, n_kv_heads=2, max_len=16):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = torch.nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk, self.wv = (torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.wo = torch.nn.Linear(n_heads * self.head_dim, dim, bias=False)
        angles = torch.outer(torch.arange(max_len), 1e4 ** (-torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)

    def rotary(self, x, T):
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[:T, None, :] + rotated * self.sin[:T, None, :]

    def counts(self):
        return self.n_heads, self.n_kv_heads

    def forward(self, x):
        B, T, _ = x.shape
        n_heads, n_kv_heads = self.counts()
        q = self.rotary(self.wq(x).view(B, T, n_heads, self.head_dim), T)
        k = self.rotary(self.wk(x).view(B, T, n_kv_heads, self.head_dim), T)
        v = self.wv(x).view(B, T, n_kv_heads, self.head_dim)
        n_rep = n_heads // n_kv_heads
        k, v = (t[:, :, :, None, :].expand(B, T, n_kv_heads, n_rep, self.head_dim)
                .reshape(B, T, n_kv_heads * n_rep, self.head_dim) for t in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             is_causal=True)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))


class CountsInATuple(ReferenceLlamaAttention):
    """The same attention with its head counts in a tuple, which no integer attribute holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shape = (self.n_heads, self.n_kv_heads)
        del self.n_heads, self.n_kv_heads

    def counts(self):
        return self.shape


def check_one_kv_group_gone(model, other, tmp_path):
    """m.onnx matches ``model`` on ``other``, and m.pt2's block of 4 q and 2 kv heads (64 wide) kept
    one kv group: half of wq's rows and wo's columns, half of wk's rows."""
    expected = reference(model, (other,))
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
    shapes = {k: tuple(v.shape) for k, v in torch.export.load(str(tmp_path / "m.pt2")).module().state_dict().items()}
    assert (shapes["blocks.0.wq.weight"], shapes["blocks.0.wk.weight"], shapes["blocks.0.wo.weight"]) == (
        (32, 64), (16, 64), (64, 32))


@pytest.mark.parametrize("attention", [ReferenceLlamaAttention, CountsInATuple])
def test_grouped_query_heads_of_reference_llama_go(tmp_path, attention):
    """Its n_heads and n_kv_heads are set to the heads kept; with the counts in a tuple, the module
    runs as its graph with the views and repeat_kv's expand rewritten."""
    torch.manual_seed(0)
    model = Blocks(attention, dim=64, layers=1)
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 5, 64))
    kill(handle, rows=[("blocks.0.wv", slice(16, 32))])  # kv head 1: its two q heads output 0
    x, other = torch.randn(2, 7, 64), torch.randn(3, 12, 64)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(x,)], compare_dense=False)
    if attention is CountsInATuple:
        assert [(h["kept"], h["kept_kv"], h["traced"], h["rewritten"]) for h in report["heads"]] == [(2, 1, "blocks.0", {})]
    else:
        assert [(h["kept"], h["kept_kv"], h["traced"], h["rewritten"]) for h in report["heads"]] == [
            (2, 1, None, {"blocks.0.n_heads": 2, "blocks.0.n_kv_heads": 1})]
        assert model.blocks[0].n_heads == 4  # the trained model is left as it was
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    check_one_kv_group_gone(model, other, tmp_path)


class ComplexRotaryAttention(ReferenceLlamaAttention):
    """The same attention with Meta's rotary embedding: pairs of features as complex numbers,
    multiplied by a complex buffer unsqueezed over the heads."""

    def __init__(self, max_len=16, **kwargs):
        super().__init__(max_len=max_len, **kwargs)
        angles = torch.outer(torch.arange(max_len), 1e4 ** (-torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotary(self, x, T):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * self.freqs_cis[:T].unsqueeze(1)).flatten(3).type_as(x)


def test_heads_go_and_the_model_exports_with_a_rotary_embedding_in_complex_numbers(tmp_path):
    """The coupling pass follows q's and k's features through the complex numbers; torch.onnx has no
    function for the unsqueeze of a complex tensor, so the export goes through its real view. The
    ONNX model matches on lengths it never saw."""
    torch.manual_seed(0)
    model = Blocks(ComplexRotaryAttention, dim=64, layers=1)
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 5, 64))
    kill(handle, rows=[("blocks.0.wv", slice(16, 32))])  # kv head 1: its two q heads output 0
    x = torch.randn(2, 7, 64)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(x,)], compare_dense=False)
    assert [(h["kept"], h["kept_kv"], h["rewritten"]) for h in report["heads"]] == [
        (2, 1, {"blocks.0.n_heads": 2, "blocks.0.n_kv_heads": 1})]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    for other in (torch.randn(3, 12, 64), torch.randn(1, 1, 64)):
        expected = reference(model, (other,))
        assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
        assert (torch.export.load(str(tmp_path / "m.pt2")).module()(other) - expected).abs().max() <= 1e-5


class SharedKvHeads(torch.nn.Module):
    """Grouped-query attention left to scaled_dot_product_attention (``enable_gqa=True``: 2 kv heads
    for 4 q heads, never repeated in the model's code), head counts read from the tensors."""

    def __init__(self, dim=64, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq, self.wo = torch.nn.Linear(dim, dim, bias=False), torch.nn.Linear(dim, dim, bias=False)
        self.wk, self.wv = (torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False) for _ in range(2))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (layer(x).view(B, T, -1, self.head_dim).transpose(1, 2) for layer in (self.wq, self.wk, self.wv))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_grouped_query_heads_shared_inside_the_attention_call_go(tmp_path):
    torch.manual_seed(0)
    model = Blocks(SharedKvHeads, dim=64, layers=1)
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 5, 64))
    dot = handle.groups_of("blocks.0.wq")[0]
    assert dot.heads() == (4, 2, {0: [0, 1], 1: [2, 3]})
    kill(handle, rows=[("blocks.0.wv", slice(16, 32))])  # kv head 1: its two q heads output 0
    x, other = torch.randn(2, 7, 64), torch.randn(3, 12, 64)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(x,)], compare_dense=False)
    assert [(h["kept"], h["kept_kv"]) for h in report["heads"]] == [(2, 1)]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    check_one_kv_group_gone(model, other, tmp_path)


class GainedHeads(FusedFixedHeads):
    """A learned gain per head, broadcast as [1, heads, 1, 1]: rewriting the views is not enough."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, self.heads).view(1, self.heads, 1, 1))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v) * self.gain
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_a_gain_per_head_is_narrowed_to_the_heads_kept(tmp_path):
    """The gain's [1, 4, 1, 1] meets the attention's output of 3 heads: the graph selects the gain's
    entries of the heads kept, and the outputs match."""
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(Blocks(GainedHeads, layers=1), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 5, 32))
    kill(handle, columns=[("blocks.0.c_proj", slice(8, 16))])  # nothing reads head 1
    report = handle.export(tmp_path / "m.onnx", (torch.randn(2, 5, 32),), held_out=[(torch.randn(3, 7, 32),)],
                           compare_dense=False)
    assert [(h["kept"], h["traced"]) for h in report["heads"]] == [(3, "blocks.0")]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    gains = [v for k, v in program.state_dict().items() if k.endswith("gain")]
    assert [tuple(g.shape) for g in gains] == [(1, 4, 1, 1)]  # stored whole, selected in the graph
    x = torch.randn(1, 9, 32)
    assert (program(x) - reference(model, (x,))).abs().max() <= 1e-5


class LoopedHeads(FusedFixedHeads):
    """A scale per head applied in a Python loop over the head count: the graph reads head 3 by index."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = torch.stack([y[:, h] * (h + 1) for h in range(self.heads)], 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_heads_stay_when_the_rewritten_graph_does_not_run(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(Blocks(LoopedHeads, layers=1), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 5, 32))
    kill(handle, columns=[("blocks.0.c_proj", slice(0, 8))])
    report = handle.export(tmp_path / "m.onnx", (torch.randn(2, 5, 32),), compare_dense=False)
    assert report["heads"] == []
    why = report["not_shrunk"]["blocks.0.c_proj"]
    assert why.startswith("attention: 1 dead head group(s) kept, the model does not run without them (RuntimeError")
    assert "; nor through its graph: its graph does not run with the heads kept: " in why
    assert type(model.blocks[0]) is LoopedHeads and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert (tmp_path / "m.onnx").exists()


class FixedHeads(torch.nn.Module):
    """Attention whose views fix the head count, as the whole model."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


def test_heads_stay_when_the_model_is_the_attention(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(FixedHeads(), {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 5, 32))
    with torch.no_grad():
        handle.sites["v"].module.mask[:8] = False
        handle.sites["v"].module.apply_mask()
    report = handle.export(tmp_path / "m.onnx", (torch.randn(2, 5, 32),), compare_dense=False)
    assert report["heads"] == []
    assert report["not_shrunk"]["o"].startswith("attention: 1 dead head group(s) kept, the model does not run without "
                                                "them (RuntimeError: shape")
    assert "view(B, T, -1, head_dim)" in report["not_shrunk"]["o"]
    assert report["not_shrunk"]["o"].endswith("; nor through its graph: the attention's layers are not inside one "
                                              "submodule")
    assert report["onnxruntime_max_abs_diff"] <= 1e-4


class FusedGatedMLP(torch.nn.Module):
    """A gated MLP whose gate and up projections are one layer (Phi-3's gate_up_proj), its output
    split by ``chunk(2)``, by a width the module holds, or at a fixed index."""

    def __init__(self, split, dim=16, hidden=32):
        super().__init__()
        self.split, self.hidden = split, hidden
        self.gate_up, self.down = torch.nn.Linear(dim, 2 * hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.gate_up(x)
        if self.split == "chunk":
            gate, up = h.chunk(2, -1)
        elif self.split == "width":
            gate, up = h.split(self.hidden, -1)
        else:
            gate, up = h[..., :32], h[..., 32:]
        return self.down(torch.nn.functional.silu(gate) * up)


class FusedMLPs(torch.nn.Module):
    def __init__(self, split):
        super().__init__()
        self.embed, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)
        self.blocks = torch.nn.ModuleList([FusedGatedMLP(split) for _ in range(2)])

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("split", ["chunk", "width", "fixed"])
def test_fused_gate_up_rows_go_in_pairs(tmp_path, split):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(FusedMLPs(split), {**EVERY, "defaults": {"density": 0.5}}, torch.randn(4, 8))
    mul = next(g for g in handle.coupling.groups if g.kind == "mul" and g.a == "blocks.0.gate_up")
    assert mul.b == mul.a and mul.pairs.tolist() == [[i, 32 + i] for i in range(32)]
    with torch.no_grad():
        kill(handle, rows=[("blocks.1.gate_up", [*range(4), *range(32, 36)])],  # gate and up of units 0-3: constants
             columns=[("blocks.0.down", slice(0, 6))])  # nothing reads units 0-5
        handle.sites["blocks.1.gate_up"].module.bias[[0, 1, 2, 3, 32, 33, 34, 35]] = torch.linspace(-1, 1, 8)
        kill(handle, rows=[("blocks.1.gate_up", [4, 5])])  # gate rows without input or bias: silu(0) * up = 0
        handle.sites["blocks.1.gate_up"].module.bias[[4, 5]] = 0
    x, other = torch.randn(4, 8), torch.randn(9, 8)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(x,)], compare_dense=False)
    units = {u["into"]: u for u in report["units"]}
    if split == "fixed":  # the model's code splits at 32: the change is undone, with the reason
        assert units == {}
        why = report["not_shrunk"]["blocks.0.down"]
        assert why.startswith("6 dead neuron(s) of blocks.0.gate_up kept, the model does not run without them "
                              "(RuntimeError") and "split its output by its size, e.g. chunk(2, -1)" in why
        assert why.endswith("; nor with an integer attribute of blocks.0 equal to 32 set to 26")
        assert report["parameters"]["after"] == report["parameters"]["before"]
    else:
        assert (units["blocks.0.down"]["unused"], units["blocks.0.down"]["kept"]) == (6, 26)
        assert (units["blocks.1.down"]["folded"], units["blocks.1.down"]["zero"], units["blocks.1.down"]["kept"]) == (4, 2, 26)
        assert units["blocks.0.down"]["rewritten"] == ({"blocks.0.hidden": 26} if split == "width" else {})
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    expected = reference(model, (other,))  # a batch the export never saw
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert (program(other) - expected).abs().max() <= 1e-5
    assert program.state_dict()["blocks.1.gate_up.weight"].shape[0] == (64 if split == "fixed" else 52)
    assert model.blocks[0].hidden == 32  # the trained model is left as it was


def test_phi3_keeps_its_gate_rows_through_training_and_its_mlp_shrinks(tmp_path):
    """Phi-3's gate_up_proj: the chain into down_proj follows up's rows; its gate rows are used through
    the product, so percolation keeps them (it used to cut every one) and the shrink drops both."""
    module = load_example("hf_phi3")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5, "method": "CHTs",
                                                                    "update": {"every": 1, "unit": "steps"}}}, x)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle.attach(optimizer, total_steps=8)
    for _ in range(4):
        loss = model(**x).logits.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    fused = handle.sites["model.layers.0.mlp.gate_up_proj"].module
    assert len(handle.history) == 4 and int(fused.mask[:128].any(1).sum()) >= 120  # gate rows still have links
    model.eval()
    kill(handle, columns=[(f"model.layers.{i}.mlp.down_proj", slice(0, 32)) for i in range(2)])
    report, g = export_tokens(handle, x, tmp_path)
    assert [(u["kept"], u["unused"]) for u in report["units"]] == [(96, 32), (96, 32)]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert report["hf_config"] == {"intermediate_size": 96, "rewritten": True}
    loaded = type(model).from_pretrained(report["hf_pretrained"]["folder"], use_cache=False).eval()
    assert loaded.model.layers[0].mlp.gate_up_proj.out_features == 192
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}
    assert (reference(loaded, other) - reference(model, other)).abs().max() <= 1e-5


def test_grouped_query_heads_of_falcons_fused_layer_go_with_its_head_counts(tmp_path, capsys):
    """Falcon's new decoder architecture: one fused layer holds, per kv group, its q heads, then k, then
    v; the views read the module's num_heads and num_kv_heads, and k and v are picked with index
    tensors (qkv[:, :, :, [-2]]) and broadcast to the q heads."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           num_kv_heads=2, new_decoder_architecture=True, bias=True)).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    assert len(handle.coupling.attentions) == 2
    qkv = "transformer.h.{}.self_attention.query_key_value"
    assert "4 q heads, 2 kv heads (q 0,1 -> kv 0; q 2,3 -> kv 1)" in next(
        line for line in handle.coupling.group_lines() if line.startswith(f"dot    {qkv.format(0)}"))
    with torch.no_grad():
        fused = handle.sites[qkv.format(0)].module
        fused.mask[112:128] = False  # the second group's v rows (q 64-95, k 96-111, v 112-127) have no input
        fused.apply_mask()
        fused.bias[112:128] = torch.linspace(-1, 1, 16)  # so it outputs v's bias: folded into dense's bias
    kill(handle, columns=[("transformer.h.1.self_attention.dense", slice(0, 32))])  # nothing reads group 0
    report, g = export_tokens(handle, x, tmp_path)
    heads = {h["into"]: h for h in report["heads"]}
    assert [(h["kept"], h["kept_kv"], h["folded"]) for h in heads.values()] == [(2, 1, 1), (2, 1, 0)]
    assert heads["transformer.h.0.self_attention.dense"]["rewritten"] == {
        "transformer.h.0.self_attention.num_heads": 2, "transformer.h.0.self_attention.num_kv_heads": 1}
    config = report["hf_config_heads"]  # the config's head_dim is a property of its head count: no rewrite
    assert not config["rewritten"] and "derive the head size" in config["why"], config
    print_report(report)
    assert "transformer.h.0.self_attention.num_heads set to 2; transformer.h.0.self_attention.num_kv_heads set to 1)" \
        in capsys.readouterr().out
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}  # shapes the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert (program(**other).logits - expected).abs().max() <= 1e-5
    assert program.state_dict()[qkv.format(1) + ".weight"].shape[0] == 64  # 2 q heads, 1 k, 1 v of 16
    assert model.transformer.h[0].self_attention.num_heads == 4  # the trained model is left as it was


def test_grouped_query_heads_of_phi3s_fused_layer_go_through_its_graph(tmp_path, capsys):
    """Phi-3 slices q, k and v out of qkv_proj at offsets from its config (query_pos): the attention
    runs as its graph with the slices moved to the rows kept; its config then says 2 heads and 1 kv
    head, and from_pretrained reloads it."""
    module = load_example("hf_phi3")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, rows=[("model.layers.0.self_attn.qkv_proj", slice(112, 128))],  # kv group 1's v rows
         columns=[("model.layers.1.self_attn.o_proj", slice(0, 32))])  # nothing reads q heads 0 and 1 (group 0)
    report, g = export_tokens(handle, x, tmp_path)
    assert [(h["kept"], h["kept_kv"], h["traced"]) for h in report["heads"]] == [
        (2, 1, "model.layers.0.self_attn"), (2, 1, "model.layers.1.self_attn")]
    assert report["hf_config_heads"] == {"rewritten": True, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "head_dim": 16}
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}  # shapes the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    loaded = type(model).from_pretrained(report["hf_pretrained"]["folder"], use_cache=False).eval()
    assert loaded.model.layers[1].self_attn.qkv_proj.out_features == 64  # 2 q heads, 1 k and 1 v head of 16
    assert (reference(loaded, other) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["Qwen3", "Olmo2"])
def test_heads_go_under_a_norm_of_each_heads_q_and_k_but_not_of_all_heads(tmp_path, arch):
    """Qwen3 normalizes q and k head by head (RMSNorm over head_dim after the view): whole heads go,
    and from_pretrained reloads the model. OLMo2 normalizes q and k over all heads at once: dropping
    a head would change every other head's norm, so the heads stay, with the reason."""
    import transformers

    config = getattr(transformers, f"{arch}Config")(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[("model.layers.0.self_attn.o_proj", slice(0, 32))])  # nothing reads kv group 0's q heads
    report, g = export_tokens(handle, x, tmp_path)
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    if arch == "Olmo2":
        assert report["heads"] == []
        assert report["not_shrunk"]["model.layers.0.self_attn.o_proj"] == (
            "attention: model.layers.0.self_attn.q_proj's output is also read across heads (mean over its "
            "features in model.layers.0.self_attn.q_norm (Olmo2RMSNorm))")
        return
    assert [(h["kept"], h["kept_kv"]) for h in report["heads"]] == [(2, 1)]
    assert handle.coupling.boundaries[("model.layers.0.self_attn.q_proj", "out")] == {
        "mean over its features in model.layers.0.self_attn.q_norm (Qwen3RMSNorm)"}  # still never percolated
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    loaded = type(model).from_pretrained(report["hf_pretrained"]["folder"], use_cache=False).eval()
    assert loaded.model.layers[0].self_attn.q_proj.out_features == 32
    assert (reference(loaded, other) - expected).abs().max() <= 1e-5


def test_heads_of_deepseeks_latent_attention_go_beside_the_rotary_key_every_head_reads(tmp_path):
    """DeepSeek-V3's multi-head latent attention: each head's key is its own k_nope (rows of kv_b_proj,
    beside its v rows) and one rotary part that every head reads (rows of kv_a_proj_with_mqa), copied
    into the two halves of an empty tensor. q heads are 16 rows of q_b_proj, v heads 12: a dead head
    takes its q rows, its k_nope and v rows and o's columns, and the shared rotary rows stay."""
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    attn = "model.layers.0.self_attn."
    assert handle.coupling.attentions[0] == Attention(attn + "q_b_proj", attn + "kv_b_proj", attn + "kv_b_proj",
                                                      (attn + "kv_a_proj_with_mqa",))
    dots = [line for line in handle.coupling.group_lines() if line.startswith("dot")]
    assert [line.split("head_dim 16, ")[1].split(";")[0] for line in dots] == [
        "4 q heads, 1 kv heads (q 0,1,2,3 -> kv 0)", "4 q heads, 4 kv heads"]  # rotary part, then k_nope
    kill(handle, rows=[(attn + "kv_b_proj", slice(68, 80))],  # head 3's v rows (8 k_nope, 12 v per head)
         columns=[(attn + "o_proj", slice(12, 24))])  # nothing reads head 1
    report, g = export_tokens(handle, x, tmp_path)
    assert [(h["kept"], h["kept_kv"]) for h in report["heads"]] == [(2, 2)]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}  # shapes the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    loaded = type(model).from_pretrained(report["hf_pretrained"]["folder"], use_cache=False).eval()
    layer = loaded.model.layers[0].self_attn
    assert (layer.q_b_proj.out_features, layer.kv_b_proj.out_features, layer.o_proj.in_features,
            layer.kv_a_proj_with_mqa.out_features) == (32, 40, 24, 24)
    assert (reference(loaded, other) - expected).abs().max() <= 1e-5


def test_attention_sinks_are_cut_to_the_heads_kept(tmp_path, capsys):
    """gpt-oss adds a learned sink logit per q head beside the scores (``sinks.reshape(1, -1, 1, 1)``):
    with a head gone, the model runs only once its sinks parameter holds the kept heads' values."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.sinks.copy_(torch.tensor([0.5, -1.0, 2.0, 0.25]))
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[("model.layers.0.self_attn.o_proj", slice(32, 64))])  # nothing reads kv group 1's q heads
    report, g = export_tokens(handle, x, tmp_path)
    assert [(h["kept"], h["kept_kv"], h["narrowed"]) for h in report["heads"]] == [
        (2, 1, ["model.layers.0.self_attn.sinks"])]
    print_report(report)
    assert "model.layers.0.self_attn.sinks cut to the kept heads" in capsys.readouterr().out
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert program.state_dict()["model.layers.0.self_attn.sinks"].tolist() == [0.5, -1.0]
    other = {"input_ids": torch.randint(0, 128, (2, 6), generator=g)}  # shapes the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other["input_ids"]]) - expected.numpy()).max() <= 1e-4
    assert (program(**other).logits - expected).abs().max() <= 1e-5


def test_the_only_head_group_of_multi_query_attention_stays(tmp_path):
    """GPTBigCode's multi-query attention: one kv head that every q head reads. With nothing reading
    any head, the group is dead but is the only one, and an attention keeps at least one."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64, multi_query=True)).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[("transformer.h.0.attn.c_proj", slice(None))])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["heads"] == []
    assert report["not_shrunk"]["transformer.h.0.attn.c_proj"] == (
        "attention: its only head group is dead, and an attention keeps at least one")
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4


def test_hf_config_is_rewritten_when_every_mlp_kept_the_same_width(tmp_path):
    module = load_example("hf_llama")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5},
                                              "rules": [{"match": {"name": "lm_head"}, "skip": True}]}, x)
    kill(handle, columns=[(f"model.layers.{i}.mlp.down_proj", slice(0, 28)) for i in range(2)])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["hf_config"] == {"intermediate_size": 100, "rewritten": True}
    assert report["hf_pretrained"]["written"] and report["hf_pretrained"]["max_abs_diff"] <= 1e-5
    loaded = type(model).from_pretrained(tmp_path / "m_hf")
    assert loaded.config.intermediate_size == 100 and loaded.model.layers[0].mlp.down_proj.in_features == 100


def test_failed_check_leaves_no_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)),
                                      {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 8))
    real = OnnxModel.run
    monkeypatch.setattr(OnnxModel, "run", lambda self, inputs: [o + 1e-3 for o in real(self, inputs)])
    with pytest.raises(ExportError, match=r"onnxruntime's outputs differ from the trained model's by 0.001 "
                                          r"\(limit 0.0001\); no file was written"):
        handle.export(tmp_path / "m.onnx", (torch.randn(4, 8),))
    assert os.listdir(tmp_path) == []  # nothing that looks valid, no temporary left either


def test_checks_allow_rounding_in_proportion_to_the_outputs_and_catch_a_wrong_shrink(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = load_example("mlp").MLP((64, 256, 256, 256, 10))
    policy = {**EVERY, "defaults": {"density": 0.05, "backend": "csr"}}
    model, handle = sparsify.sparsify(model, policy, torch.randn(2, 64))
    held = [(3000 * torch.randn(32, 64),)]  # outputs in the thousands: float32 rounding beyond 1e-5
    largest = float(reference(model, held[0]).abs().max())
    assert largest > 10
    report = handle.export(tmp_path / "big.onnx", held[0], held_out=held, compare_dense=False)
    assert report["torch_limit"] == pytest.approx(1e-5 * largest)
    assert report["tolerance"] == 1e-4 and report["onnxruntime_limit"] == pytest.approx(1e-4 * largest)
    assert report["onnxruntime_max_abs_diff"] <= report["onnxruntime_limit"]
    assert 1e-5 < report["torch_max_abs_diff"] <= report["torch_limit"]  # over a fixed 1e-5

    import sparsify.export.pipeline as export_module
    real = export_module.shrink_model

    def wrong(shrunk, *args):  # a shrink that drops a live neuron's contribution
        result = real(shrunk, *args)
        with torch.no_grad():
            shrunk.fc4.bias[0] += 1e-3 * largest
        return result

    monkeypatch.setattr(export_module, "shrink_model", wrong)
    with pytest.raises(ExportError, match=r"the shrunk model differs from the trained model by .*; no file was written"):
        handle.export(tmp_path / "wrong.onnx", held[0], held_out=held, compare_dense=False)
    assert not (tmp_path / "wrong.onnx").exists()


def test_head_check_scales_with_the_outputs():
    from sparsify.passes.shrink import _checked, scaled_limit

    assert scaled_limit(1e-5, [torch.tensor([0.5, -0.2])]) == 1e-5  # outputs within 1: the tolerance itself
    assert scaled_limit(1e-5, [torch.tensor([3.0]), torch.tensor([[-400.0]]), torch.tensor([7])]) == pytest.approx(4e-3)
    assert scaled_limit(1e-5, []) == 1e-5
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(1000)
    x = torch.randn(5, 4)
    with torch.no_grad():
        reference = model(x)
    largest = float(reference.abs().max())
    assert largest > 100
    rounding = reference + 5e-6 * largest  # above a fixed 1e-5, within 1e-5 of the largest output
    assert _checked(model, [(x,)], [rounding], "1 head", "hint") is None
    why = _checked(model, [(x,)], [reference + 0.5], "1 head", "hint")
    assert why is not None and "1 head, the outputs moved by 0.5 without them (limit" in why


def test_compact_storage_keeps_values_and_indices_and_parity(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((256, 512, 512, 512, 10)),
                                      {**EVERY, "defaults": {"density": 0.02},
                                       "rules": [{"match": {"name": "fc4"}, "skip": True}]}, torch.randn(2, 256))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 256),), held_out=[(torch.randn(9, 256),)],
                           compact=True)
    assert report["compact"] == ["fc1", "fc2", "fc3"]
    assert report["onnxruntime_max_abs_diff"] <= 1e-4
    assert report["size_ratio"] < 0.1  # 2% of the weights at 8 bytes each, against 4 bytes for every position
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert "ScatterElements" in {n.op_type for n in graph.node}
    program = torch.export.load(str(tmp_path / "m.pt2"))
    x = torch.randn(5, 256)
    assert (program.module()(x) - reference(model, (x,))).abs().max() <= 1e-5


def node_types(graph) -> list[str]:
    """The op types of a graph's nodes and of its If branches', recursively."""
    return [t for node in graph.node for t in [node.op_type] + [
        inner for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH
        for inner in node_types(attribute.g)]]


def test_sparse_matmul_multiplies_only_the_links_with_parity(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((256, 512, 512, 512, 10)),
                                      {**EVERY, "defaults": {"density": 0.015},
                                       "rules": [{"match": {"name": "fc3"}, "density": 0.3},
                                                 {"match": {"name": "fc4"}, "skip": True}]}, torch.randn(2, 256))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 256),), held_out=[(torch.randn(9, 256),)],
                           sparse_matmul=True, compact=True)
    assert report["sparse_matmul"] == ["fc1", "fc2"] and report["compact"] == ["fc3"]  # fc3: 30% > 2%
    assert report["onnxruntime_max_abs_diff"] <= 1e-4 and report["torch_max_abs_diff"] <= 1e-5
    ops = node_types(onnx.load(str(tmp_path / "m.onnx")).graph)
    # each gathered layer branches on the batch: GatherElements for one row, Gather for several
    assert ops.count("If") == 2 and ops.count("GatherElements") >= 2 and ops.count("Gather") >= 2
    assert "ScatterElements" in ops
    for key in ("latency_one_example", "latency_one_example_one_thread"):
        assert set(report[key + "_ms"]) == {"dense", "shrunk"} and report[key + "_ratio"] > 0
    for x in (torch.randn(1, 256), torch.randn(13, 256)):  # batch sizes the export never saw
        expected = reference(model, (x,))
        assert np.abs(ort_outputs(tmp_path / "m.onnx", [x]) - expected.numpy()).max() <= 1e-4
        assert (torch.export.load(str(tmp_path / "m.pt2")).module()(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("held_rows", [9, 1])
def test_sparse_matmul_parity_is_checked_on_one_row_and_on_several(tmp_path, monkeypatch, held_rows):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((64, 128, 64, 64, 10)),
                                      {**EVERY, "defaults": {"density": 0.015},
                                       "rules": [{"match": {"regex": "fc[234]"}, "skip": True}]}, torch.randn(2, 64))
    fed = []
    run = OnnxModel.run
    monkeypatch.setattr(OnnxModel, "run", lambda self, inputs: fed.append(inputs.args[0].shape[0]) or run(self, inputs))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 64),), held_out=[(torch.randn(held_rows, 64),)],
                           sparse_matmul=True, compare_dense=False, shrink=False)
    assert report["sparse_matmul"] == ["fc1"]
    assert sorted(fed) == sorted([held_rows, 1 if held_rows > 1 else 2])  # the If's two branches


def test_sparse_matmul_on_a_decoder_with_sequence_inputs(tmp_path):
    module = load_example("llama")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.015},
                                              "rules": [{"match": {"regex": ".*head.*"}, "skip": True}]}, x)
    tokens = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(0))
    # unshrunk: shrinking would drop dead MLP units and leave the rest denser than GATHER_DENSITY
    report = handle.export(tmp_path / "m.onnx", x, held_out=[(tokens,)], sparse_matmul=True, compare_dense=False,
                           shrink=False)
    assert len(report["sparse_matmul"]) == len(handle.sites)
    assert report["onnxruntime_max_abs_diff"] <= 1e-4
    other = torch.randint(0, 128, (2, 6))
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - reference(model, (other,)).numpy()).max() <= 1e-4


def test_onnx_files_store_each_initializer_once_without_stack_traces(tmp_path):
    torch.manual_seed(0)
    linear = nn.Linear(640, 320)
    with torch.no_grad():
        linear.weight.mul_(torch.rand(320, 640) < 0.02)
    model = nn.Sequential(GatherLinear(linear, bin_cost=10**9))  # one bin of 7,360 columns
    to_onnx(model, ExampleInputs.of((torch.randn(4, 640),)), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    stored = [(i.data_type, tuple(i.dims), onnx.numpy_helper.to_array(i).tobytes()) for i in graph.initializer]
    assert len(set(stored)) == len(stored)  # constant folding had copied the columns into both branches
    assert not any(node.metadata_props for node in graph.node)  # no stack traces with local paths
    x = torch.randn(3, 640)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [x]) - linear(x).detach().numpy()).max() <= 1e-5


TINY_POLICY = """version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.015
    method: CHTs
    update: {every: 10, unit: steps}
training: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.01}
export: {onnx: true, compact: true}
"""


def test_cli_run_exports_when_the_policy_asks_and_export_command(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(TINY_POLICY)
    out = tmp_path / "run"
    proc = subprocess.run(["sparsify", str(ROOT / "tests/models/tiny_task.py"), str(policy), "-o", str(out),
                           "--no-plots"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["compact"] == ["fc1", "fc2"] and report["export"]["onnxruntime_max_abs_diff"] <= 1e-4
    assert (out / "model.onnx").exists() and (out / "model.pt2").exists()
    again = subprocess.run(["sparsify", "export", str(out), "-o", str(tmp_path / "again.onnx"), "--no-shrink",
                            "--sparse-matmul"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "exported" in again.stdout and "parity: PyTorch" in again.stdout
    again_report = json.loads((tmp_path / "again.json").read_text())
    assert again_report["shrink"] is False and again_report["sparse_matmul"] == ["fc1", "fc2"]
    assert "multiplying only their non-zero weights: fc1" in again.stdout
    missing = subprocess.run(["sparsify", "export", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and "no model.pt in this folder" in missing.stderr


def test_gpt2_exports_shrunk_and_reloads_as_gpt2_with_conv1d_layers(tmp_path):
    from transformers.pytorch_utils import Conv1D

    module = load_example("hf_gpt2")
    model, x = module.build_model(), module.example_inputs()
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[(f"transformer.h.{i}.mlp.c_proj", slice(0, 56)) for i in range(2)])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["hf_config"] == {"n_inner": 200, "rewritten": True}
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert report["hf_pretrained"]["written"] and report["hf_pretrained"]["max_abs_diff"] <= 1e-5
    loaded = type(model).from_pretrained(tmp_path / "m_hf")
    fc = loaded.transformer.h[0].mlp.c_fc
    assert loaded.config.n_inner == 200 and isinstance(fc, Conv1D) and fc.weight.shape == (64, 200)
    assert (reference(loaded, x) - reference(model, x)).abs().max() <= 1e-5


def test_opt_ffn_dim_is_rewritten_when_every_mlp_kept_the_same_width(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                     attn_implementation="sdpa")).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[(f"model.decoder.layers.{i}.fc2", slice(0, 28)) for i in range(2)])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["hf_config"] == {"ffn_dim": 100, "rewritten": True}
    assert report["hf_pretrained"]["written"]
    assert type(model).from_pretrained(tmp_path / "m_hf").model.decoder.layers[1].fc1.out_features == 100


def test_bart_encoder_and_decoder_mlp_sizes_are_rewritten_apart(tmp_path):
    """BART (and Whisper, Marian) size the encoder's and the decoder's MLPs with two keys: each
    follows its own side's MLPs, here 100 and 90 wide."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    model = BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)).eval()
    x = {"input_ids": torch.randint(3, 128, (2, 8)), "decoder_input_ids": torch.randint(3, 128, (2, 6))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[(f"model.encoder.layers.{i}.fc2", slice(0, 28)) for i in range(2)]
         + [(f"model.decoder.layers.{i}.fc2", slice(0, 38)) for i in range(2)])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["hf_config"] == {"encoder_ffn_dim": 100, "decoder_ffn_dim": 90, "rewritten": True}
    assert report["hf_pretrained"]["written"] and report["hf_pretrained"]["max_abs_diff"] <= 1e-5
    loaded = type(model).from_pretrained(tmp_path / "m_hf").eval()
    assert loaded.model.encoder.layers[1].fc1.out_features == 100
    assert loaded.model.decoder.layers[1].fc1.out_features == 90
    assert (reference(loaded, x) - reference(model, x)).abs().max() <= 1e-5


def test_qwen2_moe_shared_expert_size_is_rewritten(tmp_path):
    """Qwen2-MoE sizes its shared expert apart from the routed ones (fused parameters, left whole)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=96)).eval()
    x = {"input_ids": torch.randint(0, 128, (2, 8))}
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    kill(handle, columns=[(f"model.layers.{i}.mlp.shared_expert.down_proj", slice(0, 16)) for i in range(2)])
    report = handle.export(tmp_path / "m.onnx", x, compare_dense=False)
    assert report["hf_config"] == {"shared_expert_intermediate_size": 80, "rewritten": True}
    assert report["hf_pretrained"]["written"] and report["hf_pretrained"]["max_abs_diff"] <= 1e-5
    loaded = type(model).from_pretrained(tmp_path / "m_hf")
    assert loaded.config.moe_intermediate_size == 64
    assert loaded.model.layers[1].mlp.shared_expert.down_proj.in_features == 80


def test_a_failed_onnx_conversion_names_its_cause(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)),
                                      {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 8))

    def failing(*args, **kwargs):
        try:
            raise ValueError("No ONNX function found for <OpOverload(op='custom.op')>")
        except ValueError as cause:
            raise RuntimeError("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m"
                               "\nNext steps: ...") from cause

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ExportError) as err:
        handle.export(tmp_path / "m.onnx", torch.randn(2, 8), compare_dense=False)
    assert str(err.value) == ("torch.onnx.export failed: RuntimeError: Failed to convert the exported program to an "
                              "ONNX model. This is step 3/3\n  caused by ValueError: No ONNX function found for "
                              "<OpOverload(op='custom.op')>")
    assert not (tmp_path / "m.onnx").exists()
