"""Export: the trained sparse model, shrunk, to ONNX and .pt2, checked against itself."""
import inspect
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import sparsify
from sparsify.errors import ExportError
from sparsify.export.onnx_file import OnnxModel, to_onnx
from sparsify.inputs import ExampleInputs
from sparsify.onnx_layers import GatherLinear

from export_checks import EVERY, kill, ort_outputs, reference
from model_zoo import load_example

ROOT = Path(__file__).resolve().parent.parent

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
    assert {held_rows, 1 if held_rows > 1 else 2} <= set(fed)  # the If's two branches (and a second batch size)
    # the gathered product left the width unconstrained in the graph: it runs at no other, so it is fixed
    assert report["shapes"]["inputs"]["x"][1] == 64 and report["shapes"]["fixed"] == []


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


def test_export_options_are_the_policy_section_typed_with_the_flags_winning():
    from sparsify.export.options import ExportOptions
    from sparsify.export.pipeline import export

    options = ExportOptions.from_section({"onnx": True, "compact": True, "tolerance": 1e-3}, tolerance=None, opset=19)
    assert (options.onnx, options.compact, options.tolerance, options.opset, options.shrink) == (True, True, 1e-3, 19, True)
    kwargs = options.export_kwargs()
    assert "onnx" not in kwargs and kwargs["sparse_matmul"] is False
    defaults = {k: p.default for k, p in inspect.signature(export).parameters.items() if k in kwargs}
    assert defaults == ExportOptions().export_kwargs()  # one source of defaults


@pytest.mark.parametrize("where, step", [("torch", "check the shrunk model in PyTorch"),
                                         ("onnxruntime", "check the ONNX file in onnxruntime")])
def test_a_raw_failure_after_the_shrink_becomes_an_export_error_naming_the_step(tmp_path, monkeypatch, where, step):
    """A shrunk model that fails in PyTorch (a shrink cut one factor of a product and not the other),
    or an ONNX file onnxruntime cannot run: an ExportError naming the step, no file written."""
    from sparsify.export import pipeline

    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)),
                                      {**EVERY, "defaults": {"density": 0.5}}, torch.randn(2, 8))
    message = "The size of tensor a (48) must match the size of tensor b (64) at non-singleton dimension 2"
    if where == "torch":
        store = pipeline.STORE_SPARSE

        def broken(shrunk, *args, **kwargs):
            result = store(shrunk, *args, **kwargs)
            shrunk.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(RuntimeError(message)))
            return result

        monkeypatch.setattr(pipeline, "STORE_SPARSE", broken)
    else:
        def refuse(self, inputs):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Shape mismatch attempting to re-use buffer")

        monkeypatch.setattr(OnnxModel, "run", refuse)
    with pytest.raises(ExportError) as err:
        handle.export(tmp_path / "m.onnx", (torch.randn(4, 8),), compare_dense=False)
    assert str(err.value).startswith(f"export step '{step}' failed: RuntimeError: ")
    assert "no file was written" in str(err.value) and isinstance(err.value.__cause__, RuntimeError)
    assert os.listdir(tmp_path) == []
