"""Loading a training run (its folder, model.pt or checkpoint.pt) and exporting it: what
``sparsify export RUN`` does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify import checkpoint
from sparsify.errors import ExportError
from sparsify.export.pipeline import export_trained
from sparsify.model_file import load_model_file
from sparsify.policy import load_policy
from sparsify.sparse_model import sparsify
from sparsify.train import calibration_batches


def load_run(source: str | Path):
    """The trained model of a run (its folder, model.pt or checkpoint.pt), rebuilt from its model.py:
    (handle, model file, policy, the file read)."""
    source = Path(source)
    file = source / "model.pt" if source.is_dir() else source
    if not file.exists():
        raise ExportError(f"{source}: no model.pt in this folder; give a run folder, model.pt or checkpoint.pt"
                          if source.is_dir() else f"{source}: no such file")
    saved = checkpoint.read(file)
    state, document, model_path = saved.get("state_dict", saved.get("model")), saved["policy"], saved["model_file"]
    model_file = load_model_file(model_path)
    policy = load_policy(document)
    model, handle = sparsify(model_file.build_model(), policy, model_file.example_inputs(),
                             _calibration(model_file, policy))
    checkpoint.load_state(model, state, file, model_path)
    return handle, model_file, policy, file


def export_run(source: str | Path, out: str | Path | None = None, **options: Any) -> dict:
    """Export a training run (its folder, model.pt or checkpoint.pt) the way :func:`export` does,
    checked on the first batches of its eval_data."""
    handle, model_file, policy, file = load_run(source)
    eval_data = None
    if model_file.has("eval_data"):
        eval_data = model_file.module.eval_data(policy.training_config().batch_size)
    return export_trained(handle, model_file, policy, Path(out) if out else file.parent / "model.onnx",
                          eval_data, **options)


def _calibration(model_file, policy):
    """The calibration batches the training run used (none without train_data)."""
    if not model_file.has("train_data"):
        return None
    return calibration_batches(model_file, policy, policy.training_config().batch_size)
