"""Shrink pass: dead neurons and dead heads leave the exported model (each checked through the export,
in PyTorch and onnxruntime)."""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import sparsify
from sparsify.export.report import print_report
from sparsify.passes.couple import Attention

from export_checks import EVERY, export_tokens, kill, ort_outputs, reference
from model_zoo import load_example
from models.heads import FixedWidthScale, FusedMLPs


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


@pytest.mark.parametrize("loop", ["fixed", "cumsum"])  # "unbind" reads the same groups (test_couple) and is slower
def test_a_per_channel_recurrence_loses_receptance_key_value_rows_and_decays_together(tmp_path, loop):
    """RWKV-like time mixing (sigmoid(r) * state, state_t = decay * state_{t-1} + k_t * v_t per channel),
    trained with its topology evolving, then output columns dead: r, k and v lose the same rows, the
    per-channel decay the same entries, and the export matches the trained model. The shrink used to
    cut r alone ('The size of tensor a (48) must match the size of tensor b (64)')."""
    module = load_example("recurrent")
    model, x = module.build_model(loop), module.example_inputs()
    policy = {**EVERY, "defaults": {"density": 0.5, "method": "CHTs", "update": {"every": 2, "unit": "steps"}}}
    model, handle = sparsify.sparsify(model, policy, x)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle.attach(optimizer, total_steps=8)
    for _ in range(8):
        loss = model(*x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [r["step"] for r in handle.history] == [2, 4]
    model.eval()
    kill(handle, columns=[(f"blocks.{i}.time.output", slice(16 * i, 16 * i + 16)) for i in range(2)])
    g = torch.Generator().manual_seed(0)
    report = handle.export(tmp_path / "m.onnx", x, held_out=[(torch.randint(0, 96, (3, 8), generator=g),)],
                           compare_dense=False)
    units = {u["into"]: u for u in report["units"] if u["kept"] < u["neurons"]}
    assert sorted(units) == ["blocks.0.time.output", "blocks.1.time.output"]
    assert units["blocks.0.time.output"]["layers"] == [f"blocks.0.time.{s}" for s in ("key", "receptance", "value")]
    assert [(u["kept"], u["unused"]) for u in units.values()] == [(48, 16), (48, 16)]
    assert report["not_shrunk"] == {}
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    state = torch.export.load(str(tmp_path / "m.pt2")).module().state_dict()
    for i in range(2):
        assert [tuple(state[f"blocks.{i}.time.{s}.weight"].shape) for s in ("receptance", "key", "value", "output")] == [
            (48, 32), (48, 32), (48, 32), (32, 48)]
        kept = [c for c in range(64) if not 16 * i <= c < 16 * i + 16]
        assert torch.equal(state[f"blocks.{i}.time.decay"], model.blocks[i].time.decay.detach()[kept])
    other = (torch.randint(0, 96, (5, 8), generator=g),)  # a batch the export never saw
    expected = reference(model, other)
    assert np.abs(ort_outputs(tmp_path / "m.onnx", list(other)) - expected.numpy()).max() <= 1e-4


def test_a_shrink_that_breaks_the_model_is_undone_with_the_reason(tmp_path):
    """The model's code scales its hidden features by a tensor of a fixed width: with dead neurons cut,
    it no longer runs, so the cut is undone, the reason reported, and the export still matches."""
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(FixedWidthScale(), {**EVERY, "defaults": {"density": 0.5}}, torch.randn(4, 8))
    kill(handle, columns=[("fc2", slice(0, 8))])
    x = torch.randn(4, 8)
    report = handle.export(tmp_path / "m.onnx", (x,), held_out=[(torch.randn(6, 8),)], compare_dense=False)
    assert [u for u in report["units"] if u["kept"] < u["neurons"]] == []
    why = report["not_shrunk"]["fc2"]
    assert why.startswith("8 dead neuron(s) of fc1 kept, the model does not run without them (RuntimeError: The size of "
                          "tensor a (24) must match the size of tensor b (32)"), why
    assert why.endswith("; read the width of these features from the tensors, not from a fixed size")
    assert report["parameters"]["after"] == report["parameters"]["before"]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
