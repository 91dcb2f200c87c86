"""Helpers the export tests share: cutting links as training might, and the outputs to compare."""
import numpy as np
import onnxruntime as ort
import torch

EVERY = {"version": 1, "unmatched": "sparsify"}  # a policy making every linear layer sparse


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


def check_one_kv_group_gone(model, other, tmp_path):
    """m.onnx matches ``model`` on ``other``, and m.pt2's block of 4 q and 2 kv heads (64 wide) kept
    one kv group: half of wq's rows and wo's columns, half of wk's rows."""
    expected = reference(model, (other,))
    assert np.abs(ort_outputs(tmp_path / "m.onnx", [other]) - expected.numpy()).max() <= 1e-4
    shapes = {k: tuple(v.shape) for k, v in torch.export.load(str(tmp_path / "m.pt2")).module().state_dict().items()}
    assert (shapes["blocks.0.wq.weight"], shapes["blocks.0.wk.weight"], shapes["blocks.0.wo.weight"]) == (
        (32, 64), (16, 64), (64, 32))
