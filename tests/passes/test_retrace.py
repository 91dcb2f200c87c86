"""Retrace: an attention whose code fixes its head count runs as its graph with the head sizes
rewritten, so its dead heads can go (checked through the export)."""

import numpy as np
import pytest
import torch

import sparsify
from sparsify.export.report import print_report

from export_checks import EVERY, check_one_kv_group_gone, export_tokens, kill, ort_outputs, reference
from model_zoo import load_example
from models.heads import (Blocks, ComplexRotaryAttention, CountsInATuple, FixedHeads, FusedFixedHeads, GainedHeads,
                          InlineBlock, LoopedHeads, ReferenceLlamaAttention, SharedKvHeads)


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
