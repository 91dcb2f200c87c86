"""The CLI's main job: sparsify the model of a model.py as the policy says, train it, write a run folder.

The run folder holds ``model.pt`` (state_dict with masks, the policy and the per-layer specs),
``metrics.jsonl`` (one line per epoch), ``report.json`` and ``coupling.txt``. Every file is written
to a temporary name first and renamed, so an interrupted run leaves no half-written file.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from sparsify.api import SparseModel, sparsify
from sparsify.errors import ModelFileError, PlanError, SparsifyError
from sparsify.model_file import load_model_file
from sparsify.passes.plan import CALIBRATED_INIT
from sparsify.policy import Policy, load_policy

log = logging.getLogger(__name__)

TRAINING_DEFAULTS = {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.025, "momentum": 0.9,
                     "weight_decay": 0.0, "lr_schedule": "linear", "device": "cpu"}
RUN_FILES = ("model.pt", "report.json", "metrics.jsonl")


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _out_folder(out: str | None, model_path: str, force: bool) -> Path:
    folder = Path(out) if out else Path("runs") / Path(model_path).stem
    if folder.exists() and not folder.is_dir():
        raise SparsifyError(f"{folder}: exists and is not a folder; choose another -o")
    existing = [f for f in RUN_FILES if (folder / f).exists()]
    if existing and not force:
        raise SparsifyError(f"{folder}: already holds a run ({', '.join(existing)}); choose another -o "
                            "or pass --force to overwrite it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SparsifyError(f"{folder}: cannot write the output folder: {exc.strerror}") from None
    return folder


def _require_static(handle: SparseModel, policy: Policy) -> None:
    evolving = {name: s for name, s in handle.sites.items()
                if s.spec.method != "static" or s.spec.density_decay["kind"] != "none"}
    if evolving:
        name, site = next(iter(evolving.items()))
        raise PlanError(
            f"{policy.source}: {site.rule}: layer {name} uses method {site.spec.method!r}, which evolves the "
            "topology while training; this version of sparsify trains fixed sparse topologies only. "
            "Set 'method: static' to train, or use `sparsify inspect` to see the plan.")


def _optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    cls = torch.optim.Adam if cfg["optimizer"] == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _lr_factor(kind: str, step: int, total: int) -> float:
    if kind == "linear":
        return 1.0 - step / max(total, 1)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))
    return 1.0


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, loss_fn: Callable) -> dict:
    """Mean loss and (for class logits) accuracy over ``data``."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    for inputs, targets in data:
        outputs = _forward(model, inputs)
        n = targets.shape[0]
        loss_sum += float(loss_fn(outputs, targets)) * n
        if outputs.dim() == 2 and targets.dim() == 1:
            correct += int((outputs.argmax(1) == targets).sum())
        total += n
    model.train()
    result = {"loss": loss_sum / max(total, 1)}
    if correct or total:
        result["accuracy"] = correct / max(total, 1)
    return result


CALIBRATION_SAMPLES = 2048


def _calibration(model_file, policy, cfg: dict) -> list | None:
    """The first training batches' inputs, when a rule's initial topology is computed from data."""
    layers = [policy.defaults] + [r.fields for r in policy.rules]
    if not any(layer.get("init", {}).get("model") in CALIBRATED_INIT for layer in layers):
        return None
    batches, samples = [], 0
    for inputs, _targets in model_file.module.train_data(cfg["batch_size"]):
        batches.append(inputs)
        samples += len(inputs) if isinstance(inputs, torch.Tensor) else 1
        if samples >= CALIBRATION_SAMPLES:
            break
    return batches


def run(model_path: str, policy_path: str, out: str | None = None, epochs: int | None = None,
        force: bool = False) -> dict:
    """Sparsify, train and write the run folder; returns the report."""
    model_file = load_model_file(model_path)
    policy = load_policy(policy_path)
    for name in ("train_data", "eval_data"):
        if not model_file.has(name):
            raise ModelFileError(f"{model_path}: defines no {name}(batch_size); a training run needs "
                                 "train_data(batch_size) and eval_data(batch_size) returning iterables of "
                                 "(inputs, targets) batches. To only analyze the model, use `sparsify inspect`.")
    cfg = {**TRAINING_DEFAULTS, **policy.training}
    if epochs is not None:
        if epochs < 1:
            raise SparsifyError(f"--epochs {epochs}: must be at least 1")
        cfg["epochs"] = epochs
    torch.manual_seed(policy.seed)
    model = model_file.build_model()
    model, handle = sparsify(model, policy, model_file.example_inputs(), _calibration(model_file, policy, cfg))
    _require_static(handle, policy)
    folder = _out_folder(out, model_path, force)  # only once the run can start: no empty folder left
    loss_fn = getattr(model_file.module, "loss", None) or nn.functional.cross_entropy
    try:
        train, test = model_file.module.train_data(cfg["batch_size"]), model_file.module.eval_data(cfg["batch_size"])
    except Exception as exc:
        raise ModelFileError(f"{model_path}: train_data/eval_data raised {type(exc).__name__}: {exc}") from exc
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = len(train) if hasattr(train, "__len__") else None
    total_steps = cfg["epochs"] * steps_per_epoch if steps_per_epoch else None
    history, step, start = [], 0, time.perf_counter()
    metrics_path = folder / "metrics.jsonl"
    model.train()
    for epoch in tqdm(range(1, cfg["epochs"] + 1), desc="epochs", unit="epoch", position=0):
        bar = tqdm(train, total=steps_per_epoch, desc=f"epoch {epoch}", unit="step", leave=False, position=1)
        running = 0.0
        for i, (inputs, targets) in enumerate(bar, 1):
            if total_steps:
                for group in optimizer.param_groups:
                    group["lr"] = cfg["lr"] * _lr_factor(cfg["lr_schedule"], step, total_steps)
            loss = loss_fn(_forward(model, inputs), targets)
            if not torch.isfinite(loss):
                raise SparsifyError(f"the loss became {float(loss)} at epoch {epoch}, step {i}; "
                                    "lower training.lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running += float(loss)
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running / i:.4f}")
        active, dense = handle.parameters_active()
        row = {"epoch": epoch, "step": step, "train_loss": running / max(i, 1),
               **{f"eval_{k}": v for k, v in evaluate(model, test, loss_fn).items()},
               "density": active / dense,
               "seconds": round(time.perf_counter() - start, 2)}
        history.append(row)
        tqdm.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        atomic_write(metrics_path, lambda f: f.writelines(json.dumps(r) + "\n" for r in history))
    report = _report(handle, policy, cfg, history, model_path)
    atomic_write(folder / "model.pt", lambda f: torch.save(
        {"state_dict": model.state_dict(), "policy": policy.document,
         "specs": {n: s.spec.to_dict() for n, s in handle.sites.items()}}, f), binary=True)
    atomic_write(folder / "coupling.txt", lambda f: f.write(handle.coupling.dump()))
    atomic_write(folder / "report.json", lambda f: json.dump(report, f, indent=2))
    print(_summary(report, folder))
    return report


def _report(handle: SparseModel, policy: Policy, cfg: dict, history: list, model_path: str) -> dict:
    active, total = handle.parameters_active()
    all_params = sum(p.numel() for p in handle.model.parameters())
    return {
        "model": str(model_path), "policy": policy.source, "capture": handle.capture, "training": cfg,
        "final": history[-1] if history else {},
        "parameters": {"model": all_params, "sparse_layers_dense": total, "sparse_layers_active": active,
                       "model_active": all_params - total + active},
        "layers": [{"name": n, "shape": [s.module.out_features, s.module.in_features],
                    "active": s.module.active_links, "density": s.module.density, "method": s.spec.method,
                    "rule": s.rule} for n, s in handle.sites.items()],
    }


def _summary(report: dict, folder: Path) -> str:
    final, params = report["final"], report["parameters"]
    metric = (f"accuracy {final['eval_accuracy']:.4f}" if "eval_accuracy" in final
              else f"eval loss {final.get('eval_loss', float('nan')):.4f}")
    return (f"done: {metric} after {final.get('epoch', 0)} epochs; {params['model_active']:,} of "
            f"{params['model']:,} parameters active; wrote {folder}/(model.pt, report.json, metrics.jsonl, coupling.txt)")
