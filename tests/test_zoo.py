"""The model zoo: every example model goes through the whole tool on CPU, small configs, no downloads.

For each: `sparsify inspect`, the transform (every linear layer the model owns at density 0.5,
CHTs), eight AdamW steps with the topology evolution (updates at steps 2 and 4), then hidden units of every MLP
chain cut as training might, and the export: shrunk, ONNX, checked in onnxruntime against the
trained model on held-out inputs of a batch and sequence length the export never saw. The model table
of docs/export.md is this test's list.
"""
import pytest
import torch

import sparsify
from sparsify.cli import main
from sparsify.passes.couple import ChainGroup

from model_zoo import MODELS, load_example

ZOO = ["mlp", "nanogpt", "llama", "meta_llama", "hf_llama", "hf_gpt_neox", "hf_bert", "hf_phi", "hf_phi3", "hf_deepseek_v3",
       "hf_gpt2", "torch_transformer", "hf_rwkv"]
# models whose loop over time the capture unrolls for the example's length: held-out inputs keep it
FIXED_LENGTH = {"hf_rwkv"}
POLICY = {"version": 1, "unmatched": "sparsify",
          "defaults": {"density": 0.5, "method": "CHTs", "update": {"every": 2, "unit": "steps"}}}


def call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return getattr(out, "logits", out)


def held_out(inputs, generator, length=11):
    """Inputs like the example's, 3 in the batch and (for token inputs) ``length`` long."""
    def like(key, x):
        if x.dtype == torch.long and key == "attention_mask":
            return torch.ones(3, length, dtype=torch.long)
        if x.dtype == torch.long:
            return torch.randint(0, 96, (3, length), generator=generator)
        return torch.randn(3, *x.shape[1:], generator=generator)
    if isinstance(inputs, dict):
        return {k: like(k, v) for k, v in inputs.items()}
    return tuple(like(None, v) for v in inputs)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_goes_through_the_whole_tool(name, tmp_path, capsys):
    assert main(["inspect", str(MODELS / f"{name}.py")]) == 0
    assert "linear sites" in capsys.readouterr().out

    module = load_example(name)
    x = module.example_inputs()
    model, handle = sparsify.sparsify(module.build_model(), POLICY, x)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle.attach(optimizer, total_steps=8)
    for _ in range(8):
        loss = call(model, x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    assert [r["step"] for r in handle.history] == [2, 4]
    for site in handle.sites.values():
        assert site.module.active_links == round(0.5 * site.module.mask.numel())

    chains = [g for g in handle.coupling.groups if isinstance(g, ChainGroup) and "attention" not in g.trail]
    assert chains, "every zoo model has an MLP chain to shrink"
    with torch.no_grad():
        for group in chains:  # cut a quarter of the hidden units: their columns in the next layer
            dst = handle.sites[group.dst].module
            dst.mask[:, : dst.in_features // 4] = False
            dst.apply_mask()
    model.eval()
    g = torch.Generator().manual_seed(0)
    length = x["input_ids"].shape[1] if name in FIXED_LENGTH else 11
    report = handle.export(tmp_path / "m.onnx", x, held_out=[held_out(x, g, length), held_out(x, g, length)],
                           compare_dense=False)
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["torch_max_abs_diff"] <= 1e-5 and report["onnxruntime_max_abs_diff"] <= 1e-4
    assert (tmp_path / "m.onnx").exists() and (tmp_path / "m.pt2").exists()
