"""The CLI's main job: sparsify the model of a model.py as the policy says, train it with the
scheduled topology evolution, and write a run folder.

The run folder holds ``checkpoint.pt`` (model with masks and evolution state, optimizer, RNG,
metrics so far; rewritten after every epoch, so ``--resume`` continues an interrupted run exactly),
``model.pt`` (final state_dict, the policy and the per-layer specs), ``metrics.jsonl`` (one line per
topology update and per epoch), ``report.json``, ``coupling.txt`` and PNG plots. Every file is
written to a temporary name first and renamed, so an interrupted run leaves no half-written file.

Distributed data parallel: under ``torchrun`` (or ``--nproc N``) every process trains on its share
of the batches; rank 0 writes the folder. With ``training.distributed: fsdp`` the parameters are
sharded across the processes by FSDP2's ``fully_shard`` (each sparse layer its own unit), and the
checkpoint and model.pt hold them gathered whole, as in any other run.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm

from sparsify.checkpoint import load_state, read as read_checkpoint, save as save_checkpoint
from sparsify.errors import ModelFileError, SparsifyError
from sparsify.evolution import describe_spec
from sparsify.export.pipeline import export_trained
from sparsify.files import atomic_write, remove_leftovers
from sparsify.model_file import CONTRACT, load_model_file
from sparsify.plots import write_plots
from sparsify.policy import Policy, TrainingConfig, load_policy
from sparsify.sparse_model import SparseModel, sparsify
from sparsify.topology.initial import CALIBRATED_INIT
from sparsify.topology.metrics import active_neuron_rate

log = logging.getLogger(__name__)

# Settings a resumed run must share with the run it continues: the schedules depend on them.
RESUME_KEYS = ("epochs", "batch_size", "lr", "lr_schedule", "optimizer", "lr_end_factor", "lr_decay_end", "lr_step",
               "lr_warmup_steps", "distributed")
RUN_FILES = ("checkpoint.pt", "model.pt", "report.json", "metrics.jsonl")
CHECKPOINT = "checkpoint.pt"
UNPERCOLATED_ANP = 0.99  # above it, a run with percolation on and no weight decay gets a note on why


def _out_folder(out: str | None, model_path: str, force: bool, resume: bool) -> Path:
    folder = Path(out) if out else Path("runs") / Path(model_path).stem
    if folder.exists() and not folder.is_dir():
        raise SparsifyError(f"{folder}: exists and is not a folder; choose another -o")
    existing = [f for f in RUN_FILES if (folder / f).exists()]
    if resume:
        if not (folder / CHECKPOINT).exists():
            again = ("it stopped before its first epoch ended: start it again with --force" if existing
                     else "start the run without --resume")
            raise SparsifyError(f"{folder}: holds no {CHECKPOINT} to resume from; {again}")
        remove_leftovers(folder)
        return folder
    if existing and not force:
        raise SparsifyError(f"{folder}: already holds a run ({', '.join(existing)}); continue it with --resume, "
                            "choose another -o, or pass --force to overwrite it")
    if folder.is_dir():
        remove_leftovers(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise SparsifyError(f"{folder}: cannot write the output folder: {exc.strerror}") from None
    return folder


def make_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer the training settings ``cfg`` name, over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainingConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) as a fraction of ``cfg.lr``.

    linear and cosine fall from 1 to ``lr_end_factor`` at ``lr_decay_end`` of training and hold
    there, after ``lr_warmup_steps`` rising linearly to 1 (then the fall spans the steps left to
    ``lr_decay_end``); with ``lr_step: epoch`` the rate moves once per epoch, as torch's LinearLR stepped per
    epoch does in the official recipe (epoch e of 100: 1 - 0.99 min(e, 90) / 90).

    >>> cfg = TrainingConfig(lr_step="epoch")
    >>> [round(lr_factor(cfg, e * 10, 10, 1000), 4) for e in (0, 45, 90, 99)]
    [1.0, 0.505, 0.01, 0.01]
    """
    warm = cfg.lr_warmup_steps
    if step < warm:
        return (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return 1.0
    end = cfg.lr_end_factor
    if cfg.lr_step == "epoch":
        epochs = max(total_steps // max(steps_per_epoch, 1), 1)
        horizon = max(int(epochs * cfg.lr_decay_end), 1)
        x = min((step // max(steps_per_epoch, 1)) / horizon, 1.0)
    else:
        x = min((step - warm) / max(cfg.lr_decay_end * total_steps - warm, 1.0), 1.0)
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - end) * x
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * x))


def _forward(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


IGNORED_TARGET = -100  # cross_entropy's ignore_index: padding targets are not counted


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, loss_fn: Callable, metric: Callable | None = None) -> dict:
    """The mean loss over ``data`` and the measures its outputs allow, nothing else.

    Class logits ``[batch, classes]`` against integer targets ``[batch]`` give ``accuracy``;
    token logits ``[batch, tokens, vocab]`` against ``[batch, tokens]`` give ``token_accuracy``
    (targets -100 not counted) and ``perplexity``, the exponential of the mean loss; a model.py's
    own ``metric(outputs, targets)`` gives ``metric``, averaged over batches by their size.
    """
    model.eval()
    total, loss_sum, metric_sum, correct, counted, kind = 0, 0.0, 0.0, 0, 0, None
    for inputs, targets in data:
        outputs = _forward(model, inputs)
        n = targets.shape[0]
        loss_sum += float(loss_fn(outputs, targets)) * n
        if (torch.is_tensor(outputs) and not targets.is_floating_point() and targets.dim() in (1, 2)
                and outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape):
            kind = "accuracy" if targets.dim() == 1 else "token_accuracy"
            keep = targets != IGNORED_TARGET
            correct += int(((outputs.argmax(-1) == targets) & keep).sum())
            counted += int(keep.sum())
        if metric is not None:
            metric_sum += float(metric(outputs, targets)) * n
        total += n
    model.train()
    result = {"loss": loss_sum / max(total, 1)}
    if kind is not None and counted:
        result[kind] = correct / counted
    if kind == "token_accuracy":
        result["perplexity"] = math.exp(min(result["loss"], 700.0))
    if metric is not None and total:
        result["metric"] = metric_sum / total
    return result


def _metric(model_file) -> tuple[Callable | None, str | None]:
    """model.py's optional ``metric(outputs, targets)`` and its name (its docstring's first line)."""
    fn = getattr(model_file.module, "metric", None)
    if fn is None:
        return None, None
    if not callable(fn):
        raise ModelFileError(f"{model_file.path}: metric must be a function metric(outputs, targets) returning a "
                             f"number, not a {type(fn).__name__}")
    name = ((fn.__doc__ or "").strip().splitlines() or ["metric"])[0].rstrip(".") or "metric"

    def checked(outputs: Any, targets: Any) -> float:
        try:
            return float(fn(outputs, targets))
        except Exception as exc:
            raise ModelFileError(f"{model_file.path}: metric(outputs, targets) raised {type(exc).__name__}: {exc}; "
                                 "it must return a number for a batch") from exc

    return checked, name


CALIBRATION_SAMPLES = 2048


def calibration_batches(model_file, policy, batch_size: int) -> list | None:
    """The first training batches' inputs, when a rule's initial topology is computed from data."""
    layers = [policy.defaults] + [r.fields for r in policy.rules]
    if not any(layer.get("init", {}).get("model") in CALIBRATED_INIT for layer in layers):
        return None
    batches, samples = [], 0
    for inputs, _targets in model_file.module.train_data(batch_size):
        batches.append(inputs)
        samples += len(inputs) if isinstance(inputs, torch.Tensor) else 1
        if samples >= CALIBRATION_SAMPLES:
            break
    return batches




@dataclass
class Ranks:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def agree(self, error: str | None) -> None:
        """Rank 0's refusal (or go-ahead) reaches every rank, so none waits in a collective alone."""
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise SparsifyError(error)


def _init_distributed(device: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    target = torch.device(device)
    if target.type == "cuda":  # one GPU a process: the one of its local rank, as torchrun numbers them
        if target.index is not None:
            raise SparsifyError(f"training.device {device!r} puts all {world} processes on one GPU; write "
                                "device: cuda, and each process takes the GPU of its LOCAL_RANK")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means that GPU
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())


@dataclass
class RunState:
    """What a checkpoint carries besides the model and the optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0
    updates: list = field(default_factory=list)
    epochs: list = field(default_factory=list)
    start_masks: dict = field(default_factory=dict)
    seconds: float = 0.0


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _data(model_file, name: str, batch_size: int) -> Any:
    try:
        return getattr(model_file.module, name)(batch_size)
    except Exception as exc:
        raise ModelFileError(f"{model_file.path}: {name}({batch_size}) raised {type(exc).__name__}: {exc}") from exc


def _jsonl(rows: list[dict]) -> Callable:
    return lambda f: f.writelines(json.dumps(r) + "\n" for r in rows)


def _settings(model_path: str, policy_path: str, epochs: int | None) -> tuple[Any, Policy, TrainingConfig]:
    """model.py, the policy and the training settings, refused at once when the contract is not met."""
    model_file = load_model_file(model_path)
    policy = load_policy(policy_path)
    missing = [f"{name}()" for name in ("build_model", "example_inputs") if not model_file.has(name)]
    data = [f"{name}(batch_size)" for name in ("train_data", "eval_data") if not model_file.has(name)]
    if missing or data:  # all that is missing at once, before anything runs
        raise ModelFileError(f"{model_path}: defines no {', '.join(missing + data)}; a training run needs "
                             f"{CONTRACT}, and train_data(batch_size) and eval_data(batch_size) returning "
                             "iterables of (inputs, targets) batches"
                             + (". To only analyze the model, use `sparsify inspect`." if not missing else ""))
    cfg = policy.training_config()
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise SparsifyError(f"{policy.source}: training.device {cfg.device!r} is not a torch device; write cpu, "
                            "cuda, cuda:1 or another torch device string") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparsifyError(f"{policy.source}: training.device {cfg.device!r}, but this torch sees no CUDA device "
                            f"(torch {torch.__version__}, torch.cuda.is_available() is False); train on cpu")
    if epochs is not None:
        if epochs < 1:
            raise SparsifyError(f"--epochs {epochs}: must be at least 1")
        cfg = cfg.replace(epochs=epochs)
    return model_file, policy, cfg


@dataclass
class _Run:
    """Everything one training run holds while it trains."""

    model_path: str
    model_file: Any
    policy: Policy
    cfg: TrainingConfig
    ranks: Ranks
    model: nn.Module
    handle: SparseModel
    folder: Path
    train: Any
    test: Any
    steps_per_epoch: int
    # set by _attach
    net: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    state: RunState | None = None
    loss_fn: Callable | None = None
    metric: Callable | None = None
    metric_name: str | None = None
    graph: Any = None

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards the parameters across the processes (training.distributed: fsdp)."""
        return self.ranks.world > 1 and self.cfg.distributed == "fsdp"

    def anp(self) -> float:
        return active_neuron_rate(self.handle.masks(), self.graph)

    def write_metrics(self) -> None:
        if self.ranks.main:
            atomic_write(self.folder / "metrics.jsonl", _jsonl(_rows(self.state)))


def _start(model_path: str, policy_path: str, out: str | None, epochs: int | None, force: bool,
           resume: bool) -> _Run:
    """The sparsified model, its output folder (made once the run can start) and its data."""
    model_file, policy, cfg = _settings(model_path, policy_path, epochs)
    ranks = _init_distributed(cfg.device)
    torch.manual_seed(policy.seed)
    model = model_file.build_model()
    model, handle = sparsify(model, policy, model_file.example_inputs(), calibration_batches(model_file, policy, cfg.batch_size))
    error, folder = None, Path(out) if out else Path("runs") / Path(model_path).stem
    if ranks.main:  # only once the run can start: no empty folder is left behind
        try:
            folder = _out_folder(out, model_path, force, resume)
        except SparsifyError as exc:
            error = str(exc)
    ranks.agree(error)
    train, test = _data(model_file, "train_data", cfg.batch_size), _data(model_file, "eval_data", cfg.batch_size)
    if not hasattr(train, "__len__"):
        raise ModelFileError(f"{model_path}: train_data() must return a sized iterable (with len()): the "
                             "topology schedule is counted in optimizer steps")
    steps_per_epoch = len(train) // ranks.world
    if steps_per_epoch < 1:
        raise ModelFileError(f"{model_path}: train_data() gives {len(train)} batch(es), fewer than the "
                             f"{ranks.world} processes of the run")
    return _Run(model_path, model_file, policy, cfg, ranks, model, handle, folder, train, test, steps_per_epoch)


def _attach(run_: _Run, resume: bool) -> None:
    """The optimizer, the evolution attached to it, and the state a checkpoint resumes."""
    model, handle = run_.model, run_.handle
    model.to(run_.device)
    run_.state = RunState(start_masks={n: m.detach().cpu().clone() for n, m in handle.masks().items()})
    if run_.sharded:
        _attach_sharded(run_, resume)
    else:
        run_.net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if run_.ranks.world > 1 else model
        run_.optimizer = make_optimizer(model, run_.cfg)
        handle.attach(run_.optimizer, total_steps=run_.total_steps, steps_per_epoch=run_.steps_per_epoch)
        if resume:
            _load_checkpoint(run_.folder / CHECKPOINT, model, run_.optimizer, handle, run_.state, run_.cfg, run_.ranks)
    if resume:
        run_.write_metrics()  # the rows the interrupted process wrote after its last checkpoint are done again
    run_.loss_fn = getattr(run_.model_file.module, "loss", None) or nn.functional.cross_entropy
    run_.metric, run_.metric_name = _metric(run_.model_file)
    run_.graph = handle.neuron_graph()

    def on_update(record: dict) -> None:
        run_.state.updates.append({"kind": "update", **record})
        run_.write_metrics()

    handle.evolution.listeners.append(on_update)


def _attach_sharded(run_: _Run, resume: bool) -> None:
    """FSDP2: every sparse layer its own unit, then the rest of the model. A checkpoint's model state
    loads whole before sharding and its optimizer state after; the evolution is attached last, since
    loading a sharded optimizer's state runs one optimizer step, which must not count."""
    # imported here: they take a second to import, and only a sharded run needs them
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    model, handle = run_.model, run_.handle
    checkpoint = None
    if resume:
        checkpoint = _load_checkpoint(run_.folder / CHECKPOINT, model, None, handle, run_.state, run_.cfg, run_.ranks)
    for site in handle.sites.values():  # a topology update then gathers one layer at a time
        fully_shard(site.module)
    fully_shard(model)
    run_.net = model
    run_.optimizer = make_optimizer(model, run_.cfg)
    if checkpoint is not None:
        set_optimizer_state_dict(model, run_.optimizer, checkpoint["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    handle.attach(run_.optimizer, total_steps=run_.total_steps, steps_per_epoch=run_.steps_per_epoch)


def _whole_state(run_: _Run, optimizer: bool = True) -> tuple[dict, dict | None]:
    """The model's state_dict (and the optimizer's), whole: under FSDP2 gathered to rank 0, so every
    rank must call it (the other ranks get empty dicts)."""
    if not run_.sharded:
        return run_.model.state_dict(), run_.optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # (see above)
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(run_.model, options=options),
            get_optimizer_state_dict(run_.model, run_.optimizer, options=options) if optimizer else None)


def _unsharded(run_: _Run, state: dict) -> SparseModel:
    """A whole copy of a sharded run's model on this rank, for the export: model.py's model, sparsified
    by the policy again, with the run's gathered ``state``."""
    torch.manual_seed(run_.policy.seed)
    model, handle = sparsify(run_.model_file.build_model(), run_.policy, run_.model_file.example_inputs())
    load_state(model, state, run_.folder / "model.pt", run_.model_path)
    return handle


def _train_epoch(run_: _Run, epoch: int, close_bars: Callable[[], None]) -> float:
    """One epoch of optimizer steps on this rank's share of the batches; returns the mean loss over ranks."""
    state, ranks, optimizer, cfg = run_.state, run_.ranks, run_.optimizer, run_.cfg
    if hasattr(run_.train, "set_epoch"):
        run_.train.set_epoch(epoch)
    bar = tqdm(total=run_.steps_per_epoch, desc=f"epoch {epoch}", unit="step", leave=False, position=1,
               disable=not ranks.main)
    running, seen = 0.0, 0
    for i, (inputs, targets) in enumerate(run_.train):
        if i // ranks.world >= run_.steps_per_epoch:
            break
        if i % ranks.world != ranks.rank:
            continue
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, state.step, run_.steps_per_epoch, run_.total_steps)
        loss = run_.loss_fn(_forward(run_.net, _to(inputs, run_.device)), _to(targets, run_.device))
        if not torch.isfinite(loss):
            bar.close()
            close_bars()
            kept = f"; the checkpoint of epoch {state.epoch} is kept" if state.epoch else ""
            raise SparsifyError(f"the loss became {loss.detach().item()} at epoch {epoch}, step {seen + 1}{kept}; "
                                "lower training.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # the evolution counts the step and updates the topology when scheduled
        state.step += 1
        seen += 1
        running += float(loss.detach())
        bar.update(1)
        if seen % 20 == 0 and ranks.main:
            active, dense = run_.handle.parameters_active()
            bar.set_postfix(loss=f"{running / seen:.4f}", density=f"{active / dense:.4f}", anp=f"{run_.anp():.3f}")
    bar.close()
    train_loss = running / max(seen, 1)
    if ranks.world > 1:
        mean = torch.tensor([train_loss], dtype=torch.float64)
        dist.all_reduce(mean)
        train_loss = float(mean) / ranks.world
    return train_loss


def _end_epoch(run_: _Run, epoch: int, train_loss: float, started: float) -> None:
    """Evaluate, record the epoch's row, and write the metrics and the checkpoint (rank 0)."""
    state, handle = run_.state, run_.handle
    active, dense = handle.parameters_active()
    measures = evaluate(run_.model, _EvalData(run_.test, run_.device), run_.loss_fn, run_.metric)
    row = {"kind": "epoch", "epoch": epoch, "step": state.step, "train_loss": train_loss,
           **{f"eval_{k}": v for k, v in measures.items()},
           "density": active / dense, "anp": run_.anp(), "at_target": handle.at_target(),
           "seconds": round(time.perf_counter() - started, 2)}
    state.epochs.append(row)
    state.epoch, state.seconds = epoch, time.perf_counter() - started
    model_state, optimizer_state = _whole_state(run_)  # on every rank: a gather under FSDP2
    if run_.ranks.main:
        run_.write_metrics()
        _save_checkpoint(run_.folder / CHECKPOINT, model_state, optimizer_state, state, run_.cfg, run_.policy,
                         run_.ranks, run_.model_path)
        tqdm.write(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in row.items() if k != "kind"))


def _finish(run_: _Run, plots: bool) -> dict:
    """The report; on rank 0 the model, coupling, export, plots, report.json and the summary."""
    handle, folder, policy = run_.handle, run_.folder, run_.policy
    report = _report(handle, policy, run_.cfg, run_.state, run_.model_path, run_.anp(), run_.ranks)
    if run_.metric_name:
        report["metric"] = run_.metric_name
    model_state, _ = _whole_state(run_, optimizer=False)  # on every rank: a gather under FSDP2
    if not run_.ranks.main:
        return report
    save_checkpoint(folder / "model.pt", {"state_dict": model_state, "policy": policy.document,
                                          "model_file": str(Path(run_.model_path).resolve()),
                                          "specs": {n: s.spec.to_dict() for n, s in handle.sites.items()}})
    atomic_write(folder / "coupling.txt", lambda f: f.write(handle.coupling.dump()))
    if policy.export.get("onnx"):  # sharded, the model runs on this rank alone as a whole copy
        whole = _unsharded(run_, model_state) if run_.sharded else handle
        report["export"] = _export(folder, whole, run_.model_file, policy, run_.test)
    if plots:
        report["plots"] = _plots(folder, handle, run_.state)
    atomic_write(folder / "report.json", lambda f: json.dump(report, f, indent=2))
    print(_summary(report, folder))
    return report


def run(model_path: str, policy_path: str, out: str | None = None, epochs: int | None = None,
        force: bool = False, resume: bool = False, plots: bool = True) -> dict:
    """Sparsify, train with the topology evolution, and write the run folder; returns the report."""
    run_ = _start(model_path, policy_path, out, epochs, force, resume)
    _attach(run_, resume)
    state = run_.state
    started = time.perf_counter() - state.seconds
    run_.model.train()
    epoch_bar = tqdm(range(state.epoch + 1, run_.cfg.epochs + 1), initial=state.epoch, total=run_.cfg.epochs,
                     desc="epochs", unit="epoch", position=0, disable=not run_.ranks.main)
    for epoch in epoch_bar:
        train_loss = _train_epoch(run_, epoch, epoch_bar.close)
        _end_epoch(run_, epoch, train_loss, started)
    epoch_bar.close()
    return _finish(run_, plots)


class _EvalData:
    """The evaluation batches, moved to the training device."""

    def __init__(self, data: Any, device: torch.device):
        self.data, self.device = data, device

    def __iter__(self):
        for inputs, targets in self.data:
            yield _to(inputs, self.device), _to(targets, self.device)


def _rows(state: RunState) -> list[dict]:
    return sorted(state.updates + state.epochs, key=lambda r: (r["step"], r["kind"] == "epoch"))


def _plots(folder: Path, handle: SparseModel, state: RunState) -> list[str]:
    try:
        return write_plots(folder, handle.evolution, state.updates, state.epochs, state.start_masks)
    except ImportError as exc:
        log.warning("no plots: %s (pip install matplotlib)", exc)
        return []


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "training", "policy", "model_file", "world", "epoch", "step",
                   "updates", "epochs", "start_masks", "seconds")


def _save_checkpoint(path: Path, model_state: dict, optimizer_state: dict, state: RunState, cfg: TrainingConfig,
                     policy: Policy, ranks: Ranks, model_path: str) -> None:
    checkpoint = {"model": model_state, "optimizer": optimizer_state, "rng": torch.get_rng_state(),
                  "training": cfg.to_dict(), "policy": policy.document, "model_file": str(Path(model_path).resolve()),
                  "world": ranks.world, "epoch": state.epoch,
                  "step": state.step, "updates": state.updates, "epochs": state.epochs,
                  "start_masks": state.start_masks, "seconds": state.seconds}
    if torch.device(cfg.device).type == "cuda":  # dropout and other random ops on the GPU draw from its own generator
        checkpoint["cuda_rng"] = torch.cuda.get_rng_state(cfg.device)
    save_checkpoint(path, checkpoint)


def _load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, handle: SparseModel,
                     state: RunState, cfg: TrainingConfig, ranks: Ranks) -> dict:
    """Resume from ``path``: the model, the optimizer (None: the caller loads it; an optimizer over
    sharded parameters loads once they are sharded), the random state and the run so far."""
    checkpoint = read_checkpoint(path, CHECKPOINT_KEYS)
    for key in RESUME_KEYS:
        if key in checkpoint["training"] and checkpoint["training"][key] != getattr(cfg, key):
            raise SparsifyError(f"{path}: the run was started with training.{key} = {checkpoint['training'].get(key)!r}, "
                                f"now {getattr(cfg, key)!r}; resume with the same settings (the schedules depend on them)")
    if checkpoint["world"] != ranks.world:
        raise SparsifyError(f"{path}: the run was started with {checkpoint['world']} process(es), now {ranks.world}")
    load_state(model, checkpoint["model"], path, checkpoint["model_file"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"])
    if "cuda_rng" in checkpoint and torch.device(cfg.device).type == "cuda":
        torch.cuda.set_rng_state(checkpoint["cuda_rng"], cfg.device)
    for key in ("epoch", "step", "updates", "epochs", "start_masks", "seconds"):
        setattr(state, key, checkpoint[key])
    handle.evolution.history[:] = [{k: v for k, v in r.items() if k != "kind"} for r in state.updates]
    if ranks.main:
        tqdm.write(f"resuming {path.parent} after epoch {state.epoch} (step {state.step})")
    return checkpoint


def _export(folder: Path, handle: SparseModel, model_file, policy: Policy, test: Any) -> dict:
    """The export the policy asks for at the end of the run: folder/model.onnx, checked."""
    return export_trained(handle, model_file, policy, folder / "model.onnx", test)


def _report(handle: SparseModel, policy: Policy, cfg: TrainingConfig, state: RunState, model_path: str, anp: float,
            ranks: Ranks) -> dict:
    active, total = handle.parameters_active()
    stored = sum(p.numel() for p in handle.model.parameters())
    all_params = stored + sum(s.module.mask.numel() - s.module.trainable.numel() for s in handle.sites.values())
    evolution = handle.evolution
    layers = []
    for i, (name, site) in enumerate(handle.sites.items()):
        mask = site.module.mask
        layers.append({
            "name": name, "shape": [site.module.out_features, site.module.in_features],
            "active": site.module.active_links, "density": site.module.density,
            "active_outputs": int(mask.any(1).sum()), "active_inputs": int(mask.any(0).sum()),
            "itop": evolution.state[i].itop(), "frozen": bool(evolution.state[i].frozen),
            "updates": sum(1 for r in state.updates if name in r["layers"]),
            "method": site.spec.method, "percolation": bool(site.spec.percolation),
            "schedule": describe_spec(site.spec), "rule": site.rule})
    return {
        "model": str(model_path), "policy": policy.source, "capture": handle.capture, "training": cfg.to_dict(),
        "processes": ranks.world, "steps": state.step,
        "final": state.epochs[-1] if state.epochs else {}, "best": best_epoch(state.epochs), "anp": anp,
        "parameters": {"model": all_params, "sparse_layers_dense": total, "sparse_layers_active": active,
                       "model_active": all_params - total + active},
        "topology_updates": len(state.updates),
        "layers": layers,
    }


def best_epoch(epochs: list[dict]) -> dict | None:
    """The epoch with the best evaluation (highest accuracy, or lowest loss without one) among those
    that ended with every sparse layer at its target density, as the official runs track it; None
    when no epoch did."""
    rows = [r for r in epochs if r.get("at_target", True)]
    if not rows:
        return None
    if all("eval_accuracy" in r for r in rows):
        best = max(rows, key=lambda r: (r["eval_accuracy"], -r["epoch"]))
        return {"epoch": best["epoch"], "eval_accuracy": best["eval_accuracy"], "eval_loss": best.get("eval_loss")}
    best = min(rows, key=lambda r: (r.get("eval_loss", math.inf), r["epoch"]))
    return {"epoch": best["epoch"], "eval_loss": best.get("eval_loss")}


def _headline(report: dict) -> str:
    """The measures the run computed, nothing else: model.py's metric, class accuracy (with its best
    epoch), token accuracy and perplexity, and the loss (with its best epoch when there is no accuracy)."""
    final, best = report["final"], report.get("best") or {}
    parts = []
    if "eval_metric" in final:
        parts.append(f"{report.get('metric', 'metric')} {final['eval_metric']:.4f}")
    if "eval_accuracy" in final:
        parts.append(f"accuracy {final['eval_accuracy']:.4f}" + (
            f" (best {best['eval_accuracy']:.4f} at epoch {best['epoch']})" if "eval_accuracy" in best else ""))
    if "eval_token_accuracy" in final:
        parts.append(f"token accuracy {final['eval_token_accuracy']:.4f}, perplexity {final['eval_perplexity']:.2f}")
    loss = f"eval loss {final.get('eval_loss', float('nan')):.4f}"
    if "eval_accuracy" not in final and best.get("eval_loss") is not None:
        loss += f" (best {best['eval_loss']:.4f} at epoch {best['epoch']})"
    if "eval_accuracy" not in final or not parts:
        parts.append(loss)
    return ", ".join(parts)


def _summary(report: dict, folder: Path) -> str:
    final, params = report["final"], report["parameters"]
    metric = _headline(report)
    lines = [f"done: {metric} after {final.get('epoch', 0)} epochs ({report['steps']} steps, "
             f"{report['topology_updates']} topology updates); {params['model_active']:,} of {params['model']:,} "
             f"parameters active; ANP {report['anp']:.3f}"]
    for layer in report["layers"]:
        lines.append(f"  {layer['name']:<24} {layer['shape'][0]}x{layer['shape'][1]}  density {layer['density']:.4f}  "
                     f"active out {layer['active_outputs']}/{layer['shape'][0]} in {layer['active_inputs']}/"
                     f"{layer['shape'][1]}  ITOP {layer['itop']:.3f}  {layer['method']}")
    percolating = any(layer["percolation"] for layer in report["layers"])
    if percolating and report["anp"] > UNPERCOLATED_ANP and not report["training"].get("weight_decay"):
        lines.append(f"note: percolation is on but ANP is {report['anp']:.3f}: with no weight decay the links of "
                     "unused neurons keep their size, so few neurons lose all their links; a training.weight_decay "
                     "(5e-4 by default, the official recipe's) lets them percolate over a long run")
    files = ["checkpoint.pt", "model.pt", "report.json", "metrics.jsonl", "coupling.txt", *report.get("plots", [])]
    lines.append(f"wrote {folder}/({', '.join(files)})")
    return "\n".join(lines)


def run_and_leave(**kwargs: Any) -> dict:
    """:func:`run`, then, in a process group started outside (torchrun), wait for every rank and
    tear the group down before the interpreter exits: gloo threads still alive at exit abort the
    process ("terminate called without an active exception")."""
    try:
        report = run(**kwargs)
        if dist.is_initialized():
            gc.collect()  # the run's DDP wrapper (held in a cycle through the evolution's listener) goes first
            dist.barrier()
        return report
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, **kwargs: Any) -> None:
    """Run :func:`run` in ``nproc`` local processes (distributed data parallel over gloo or nccl)."""
    if nproc < 1:
        raise SparsifyError(f"--nproc {nproc}: must be at least 1")
    # The processes meet through a file store in a private folder, not a TCP store on a port picked in advance:
    # no other process can take the port between the pick and the bind, and no rank hosts a store server
    # that the others still need while they tear down.
    with tempfile.TemporaryDirectory(prefix="sparsify-ddp-") as folder:
        try:
            mp.start_processes(_worker, args=(nproc, os.path.join(folder, "store"), kwargs), nprocs=nproc,
                               start_method="spawn")
        except mp.ProcessExitedException as exc:
            raise SparsifyError(f"process {exc.error_index} of {nproc} exited with code {exc.exit_code}") from None


def _worker(rank: int, nproc: int, store_path: str, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    store = dist.FileStore(store_path, nproc)
    # run() finds the group made; with CUDA present, None gives gloo for CPU tensors and nccl for CUDA ones
    dist.init_process_group(None if torch.cuda.is_available() else "gloo", store=store, rank=rank, world_size=nproc)
    try:
        run(**kwargs)
        gc.collect()  # the run's DDP wrapper (held in a cycle through the evolution's listener) goes first
        dist.barrier()  # no rank tears gloo down while another still has work in flight
    except SparsifyError as exc:
        if rank == 0:
            print(f"sparsify: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist.destroy_process_group()
    leave_together(store, nproc)


def leave_together(store: dist.Store, world: int, timeout: float = 120.0) -> None:
    """Return once every rank has torn its process group down (or after ``timeout`` seconds): no
    process exits, closing its gloo sockets, while another is still tearing down."""
    store.add("torn_down", 1)
    deadline = time.monotonic() + timeout
    while store.add("torn_down", 0) < world and time.monotonic() < deadline:
        time.sleep(0.01)
