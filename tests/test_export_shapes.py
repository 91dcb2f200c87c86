"""Exports that know their shapes: each dimension the file declares dynamic is checked at a second
size, one torch.export specialised or that fails there is exported fixed, static shapes on request,
and the report and the summary say which dimensions are fixed, at what size and why."""
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import sparsify
from sparsify.errors import ExportError
from sparsify.export.onnx_file import OnnxModel
from sparsify.export.report import print_report

from export_checks import EVERY
from model_zoo import load_example

ROOT = Path(__file__).resolve().parent.parent


class Scan(nn.Module):
    """A gated per-channel recurrence computed step by step over time in Python, as Mamba's
    reference scan is: torch.export unrolls the loop, so the sequence length is specialised."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mix = nn.Linear(16, 32)
        self.out = nn.Linear(16, 32)

    def forward(self, ids):
        gate, value = self.mix(self.embed(ids)).chunk(2, -1)  # (B, T, 16) each
        h = torch.zeros_like(value[:, 0])
        states = []
        for t in range(ids.shape[1]):
            h = torch.sigmoid(gate[:, t]) * h + value[:, t]
            states.append(h)
        return self.out(torch.stack(states, 1))


def declared_dims(path):
    """The graph input's dims as the file declares them: ints for dim_value, strings for dim_param."""
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def run_file(path, array):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: array.numpy()})[0])


def sparse_scan():
    torch.manual_seed(0)
    return sparsify.sparsify(Scan(), {**EVERY, "defaults": {"density": 0.5}}, (torch.randint(0, 32, (2, 6)),))


def test_a_length_torch_export_specialised_is_exported_fixed_and_reported(tmp_path, capsys):
    model, handle = sparse_scan()
    held_out = [(torch.randint(0, 32, (3, 9)),)]  # a length the export never saw
    report = handle.export(tmp_path / "m.onnx", (torch.randint(0, 32, (2, 6)),), held_out=held_out,
                           compare_dense=False)
    shapes = report["shapes"]
    batch = shapes["inputs"]["ids"][0]
    assert shapes["inputs"] == {"ids": [batch, 6]} and isinstance(batch, str)
    assert shapes["fixed"] == [{"input": "ids", "dim": 1, "size": 6,
                                "why": "torch.export specialised it (the trained model also runs at 7)"}]
    assert shapes["dynamic_checked_at"] == {batch: [3, 4]}  # the held-out batch, and one more row
    assert declared_dims(tmp_path / "m.onnx") == [batch, 6]  # the file says so too
    assert json.loads((tmp_path / "m.json").read_text())["shapes"] == shapes
    ids = torch.randint(0, 32, (5, 6))
    with torch.no_grad():
        assert torch.allclose(run_file(tmp_path / "m.onnx", ids), model(ids), atol=1e-5)
    print_report(report)
    out = capsys.readouterr().out
    assert f"  inputs: ids [{batch}, 6]; {batch} dynamic, checked at 3 and 4\n" in out
    assert "  fixed: ids dim 1 at 6 (torch.export specialised it (the trained model also runs at 7))\n" in out


def test_dimensions_of_an_ordinary_model_stay_dynamic_checked_at_a_second_size(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 8))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 8),), held_out=[(torch.randn(5, 8),)],
                           compare_dense=False)
    batch = report["shapes"]["inputs"]["x"][0]
    assert report["shapes"] == {"inputs": {"x": [batch, 8]}, "dynamic_checked_at": {batch: [5, 6]}, "fixed": []}
    assert declared_dims(tmp_path / "m.onnx") == [batch, 8]  # 8: the model's own width, not a fixed dimension


def test_static_shapes_fix_every_dimension_and_the_checks_fit_them(tmp_path):
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 8))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 8),), held_out=[(torch.randn(5, 8),)],
                           compare_dense=False, static_shapes=True)
    assert report["shapes"] == {"inputs": {"x": [4, 8]}, "dynamic_checked_at": {},
                                "fixed": [{"input": "x", "dim": 0, "size": 4, "why": "static shapes asked for"}]}
    assert declared_dims(tmp_path / "m.onnx") == [4, 8]
    assert report["onnxruntime_max_abs_diff"] <= report["onnxruntime_limit"]  # checked on the held-out rows cut to 4


def test_a_dimension_that_fails_at_a_second_size_is_exported_fixed(tmp_path, monkeypatch):
    """onnxruntime refusing a batch size the file declares dynamic (as it refused Mamba's unseen
    lengths) leads to a second export with that dimension fixed, never to a raw exception."""
    real = OnnxModel.run

    def refuse_other_batches(self, inputs):
        dynamic = isinstance(self.session.get_inputs()[0].shape[0], str)
        if dynamic and inputs.args[0].shape[0] != 4:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Shape mismatch attempting to re-use buffer")
        return real(self, inputs)

    monkeypatch.setattr(OnnxModel, "run", refuse_other_batches)
    torch.manual_seed(0)
    model, handle = sparsify.sparsify(load_example("mlp").MLP((8, 16, 16, 16, 2)), {**EVERY, "defaults": {"density": 0.5}},
                                      torch.randn(2, 8))
    report = handle.export(tmp_path / "m.onnx", (torch.randn(4, 8),), compare_dense=False)
    assert report["shapes"]["fixed"] == [{"input": "x", "dim": 0, "size": 4, "why": (
        "onnxruntime fails at 5: RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Shape mismatch attempting "
        "to re-use buffer")}]
    assert declared_dims(tmp_path / "m.onnx") == [4, 8]


def test_a_model_that_fails_on_the_checks_fitted_to_its_fixed_sizes_is_an_export_error(tmp_path):
    """Held-out inputs cut to the fixed length must still run in the trained model: here the
    trained model refuses the length, so the export stops with an ExportError and writes nothing."""
    model, handle = sparse_scan()
    original = Scan.forward

    def picky(self, ids):
        if ids.shape[1] == 6 and ids.shape[0] == 3:
            raise ValueError("length 6 needs a batch of 2")
        return original(self, ids)

    Scan.forward = picky
    try:
        with pytest.raises(ExportError, match=r"the trained model fails on the check inputs fitted to the export's "
                                              r"fixed sizes \(ids dim 1 = 6\); no file was written"):
            handle.export(tmp_path / "m.onnx", (torch.randint(0, 32, (2, 6)),),
                          held_out=[(torch.randint(0, 32, (3, 9)),)], compare_dense=False)
    finally:
        Scan.forward = original
    assert os.listdir(tmp_path) == []


def test_mamba_exports_with_its_sequence_length_fixed_and_reported(tmp_path):
    """Hugging Face's MambaForCausalLM without its kernels scans the sequence in a Python loop: the
    export declared the length dynamic and onnxruntime failed on an unseen one."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1, expand=2,
                                      conv_kernel=4, time_step_rank=4, use_cache=False)
    x = {"input_ids": torch.randint(0, 64, (2, 8))}
    model, handle = sparsify.sparsify(transformers.MambaForCausalLM(config).eval(), {**EVERY, "defaults": {
        "density": 0.5}}, x)
    report = handle.export(tmp_path / "m.onnx", x, held_out=[{"input_ids": torch.randint(0, 64, (3, 11))}],
                           compare_dense=False)
    batch = report["shapes"]["inputs"]["input_ids"][0]
    assert report["shapes"]["fixed"] == [{"input": "input_ids", "dim": 1, "size": 8,
                                          "why": "torch.export specialised it (the trained model also runs at 9)"}]
    assert report["shapes"]["dynamic_checked_at"] == {batch: [3, 4]}
    assert report["onnxruntime_max_abs_diff"] <= report["onnxruntime_limit"]


def test_the_cli_export_takes_static_shapes_and_prints_them(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {regex: 'fc[12]'}\n    density: 0.2\n"
                      "training: {epochs: 1, batch_size: 64, optimizer: sgd, lr: 0.01}\n")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "sparsify", str(ROOT / "tests/models/tiny_task.py"), str(policy),
                           "-o", str(run), "--no-plots"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "sparsify", "export", str(run), "--static-shapes"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert "  inputs: x [2, 20]\n  fixed: x dim 0 at 2 (static shapes asked for)\n" in proc.stdout
    assert json.loads((run / "model.json").read_text())["shapes"]["inputs"] == {"x": [2, 20]}
