"""Lightning drives the evolving topology: one callback.

    model, handle = sparsify.sparsify(model, policy, example_inputs=(x,))
    module = MyLightningModule(model)      # the sparsified model is the module or one of its submodules
    trainer = lightning.Trainer(max_epochs=10, callbacks=[SparsifyCallback(handle)])
    trainer.fit(module)                    # or trainer.fit(module, ckpt_path="last")

The callback attaches the evolution to the Trainer's optimizer when training starts (after
``configure_optimizers`` and any checkpoint restore), with ``total_steps`` = the Trainer's
``estimated_stepping_batches``: every optimizer step counts once, with or without
``accumulate_grad_batches``; it detaches when training ends or fails. The evolution's state
(masks, step counter, random generator, explored positions, early-stop flags) is in the module's
``state_dict``, which every Lightning checkpoint saves and ``ckpt_path=`` loads; the callback's own
checkpoint entry adds the update history, which is not a tensor. Each training step logs
``sparsify/density`` and ``sparsify/updates`` (and, after the first update, ``sparsify/anp`` and
``sparsify/regrown``) through ``LightningModule.log``, so every logger the Trainer has sees them.
Under the ``ddp`` strategy every rank ends each update with rank 0's masks (see :class:`Evolution`).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

from sparsify.errors import SparsifyError
from sparsify.integrations import optimizer_steps_per_epoch
from sparsify.sparse_model import SparseModel

try:  # an optional dependency: only this module needs it
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("sparsify.integrations.lightning needs the lightning package: pip install lightning") from error


class SparsifyCallback(Callback):
    """Run ``handle``'s topology evolution inside a ``lightning.Trainer`` (see the module's doc)."""

    def __init__(self, handle: SparseModel, *, prog_bar: bool = False):
        """``prog_bar``: also show the density and the last update's ANP in the progress bar."""
        if not isinstance(handle, SparseModel):
            raise SparsifyError("SparsifyCallback takes the handle sparsify.sparsify() returned: "
                                f"model, handle = sparsify.sparsify(...); got {type(handle).__name__}")
        self.handle = handle
        self.prog_bar = prog_bar
        self._hook = None

    # -- attach and detach ------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not any(module is self.handle.model for module in pl_module.modules()):
            raise SparsifyError(
                f"SparsifyCallback: the sparsified model ({type(self.handle.model).__name__}) is not part of the "
                f"LightningModule {type(pl_module).__name__}; make it the module or one of its submodules, so "
                "that Lightning trains it and its checkpoints hold the masks")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()
        if len(trainer.optimizers) != 1:
            raise SparsifyError(f"SparsifyCallback: configure_optimizers gave {len(trainer.optimizers)} optimizers; "
                                "the callback attaches to exactly one (with several, call handle.attach(optimizer, "
                                "hook=False) and handle.evolution.step() yourself)")
        evolution = self.handle.evolution
        if evolution.step_index != trainer.global_step:
            raise SparsifyError(
                f"SparsifyCallback: the Trainer starts at step {trainer.global_step} but the model's evolution "
                f"counted {evolution.step_index} steps; resume the model from the same checkpoint (trainer.fit(..., "
                "ckpt_path=...) loads both) or start from a freshly sparsified model")
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise SparsifyError("SparsifyCallback: the Trainer's number of optimizer steps is not known (an "
                                "iterable dataset or max_epochs=-1); set max_steps")
        planned = int(evolution.total_steps)
        if trainer.global_step and planned and planned != int(total):
            warnings.warn(f"sparsify: the run resumes with {int(total)} optimizer steps in all where its topology "
                          f"schedule was made for {planned}; the updates from here on follow the new length",
                          RuntimeWarning, stacklevel=2)
        self._hook = self.handle.attach(trainer.optimizers[0], total_steps=int(total),
                                        steps_per_epoch=self._steps_per_epoch(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @staticmethod
    def _steps_per_epoch(trainer: Trainer) -> int | None:
        return optimizer_steps_per_epoch(trainer.num_training_batches, trainer.accumulate_grad_batches)

    # -- checkpoints: the masks travel in the module's state_dict, the history here ------------------

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.handle.history), "step": self.handle.evolution.step_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = self.handle.evolution.step_index  # the model's state was loaded first
        if state_dict.get("step") != step:
            raise SparsifyError(
                f"SparsifyCallback: the checkpoint's update history ends at step {state_dict.get('step')} but the "
                f"model's evolution loaded from it counted {step} steps; the sparsified model must be the "
                "LightningModule or one of its submodules")
        self.handle.evolution.history[:] = [r for r in state_dict["history"] if r["step"] <= step]

    # -- logging ----------------------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        """What each training step logs: the sparse layers' density, the updates so far, the last update's ANP."""
        active, total = self.handle.parameters_active()
        history = self.handle.history
        values = {"sparsify/density": active / max(total, 1), "sparsify/updates": float(len(history))}
        if history:
            values["sparsify/anp"] = history[-1]["anp"]
            values["sparsify/regrown"] = float(sum(layer["regrown"] for layer in history[-1]["layers"].values()))
        return values

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        values = self.values()  # the same on every rank: no reduction needed
        shown = {k: values.pop(k) for k in ("sparsify/density", "sparsify/anp") if k in values}
        pl_module.log_dict(shown, on_step=True, on_epoch=False, prog_bar=self.prog_bar)
        pl_module.log_dict(values, on_step=True, on_epoch=False)
