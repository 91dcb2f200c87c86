"""The Hugging Face Trainer drives the evolving topology: one callback.

    model, handle = sparsify.sparsify(model, policy, example_inputs=(input_ids,))
    trainer = Trainer(model=model, args=args, train_dataset=data)
    sparsify.integrations.hf.install(trainer, handle)   # or callbacks=[SparsifyCallback(handle)]
    trainer.train()                                      # or trainer.train(resume_from_checkpoint=...)

The callback attaches the evolution to the Trainer's optimizer when training begins (``total_steps``
is the Trainer's ``max_steps``), so every optimizer step counts once, with or without gradient
accumulation; it detaches when training ends. The evolution's state (masks, step counter, random
generator, explored positions, early-stop flags) is in ``model.state_dict()``, which the Trainer's
checkpoints already save and ``resume_from_checkpoint`` already loads; the callback adds the
update history (``sparsify_history.json`` in each checkpoint folder), which is not a tensor.
Each log gains ``sparsify/density``, ``sparsify/anp`` and ``sparsify/updates``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sparsify.errors import SparsifyError
from sparsify.integrations import optimizer_steps_per_epoch
from sparsify.sparse_model import SparseModel

try:  # an optional dependency: only this module needs it
    from transformers import Trainer, TrainerCallback
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("sparsify.integrations.hf needs the transformers package: pip install transformers") from error

HISTORY_FILE = "sparsify_history.json"


def _inner(optimizer):
    """The torch optimizer under accelerate's wrapper: its step() runs only when the wrapper really steps."""
    while hasattr(optimizer, "optimizer") and hasattr(optimizer.optimizer, "param_groups"):
        optimizer = optimizer.optimizer
    return optimizer


class SparsifyCallback(TrainerCallback):
    """Run ``handle``'s topology evolution inside a ``transformers.Trainer`` (see the module's doc)."""

    def __init__(self, handle: SparseModel):
        if not isinstance(handle, SparseModel):
            raise SparsifyError("SparsifyCallback takes the handle sparsify.sparsify() returned: "
                                f"model, handle = sparsify.sparsify(...); got {type(handle).__name__}")
        self.handle = handle
        self._hook = None

    # -- attach and detach ------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        if optimizer is None:
            raise SparsifyError("SparsifyCallback: the Trainer began training without an optimizer")
        self._detach()
        self._restore_history(args, state)
        evolution = self.handle.evolution
        if state.global_step and evolution.step_index != state.global_step:
            raise SparsifyError(
                f"SparsifyCallback: the Trainer resumes at step {state.global_step} but the model's evolution "
                f"counted {evolution.step_index} steps; resume the model from the same checkpoint (the Trainer's "
                "resume_from_checkpoint loads both)")
        self._hook = self.handle.attach(_inner(optimizer), total_steps=int(state.max_steps),
                                        steps_per_epoch=self._steps_per_epoch(args, train_dataloader))

    def on_train_end(self, args, state, control, **kwargs):
        self._detach()

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @staticmethod
    def _steps_per_epoch(args, dataloader) -> int | None:
        try:
            batches = len(dataloader)
        except TypeError:  # an iterable dataset: epochs have no fixed length
            return None
        return optimizer_steps_per_epoch(batches, args.gradient_accumulation_steps)

    # -- checkpoints ------------------------------------------------------------------------------

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            (folder / HISTORY_FILE).write_text(json.dumps(self.handle.history))

    def _restore_history(self, args, state) -> None:
        """After a resume, the updates made before the checkpoint (the masks themselves came with the model)."""
        history = self.handle.evolution.history
        if not state.global_step or (history and history[-1]["step"] <= state.global_step):
            return
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / HISTORY_FILE
        if os.path.isfile(path):
            history[:] = [r for r in json.loads(path.read_text()) if r["step"] <= state.global_step]

    # -- logging ----------------------------------------------------------------------------------

    def values(self) -> dict[str, float]:
        """What each log gains: the sparse layers' density, the last update's ANP, the updates so far."""
        active, total = self.handle.parameters_active()
        history = self.handle.history
        values = {"sparsify/density": active / max(total, 1), "sparsify/updates": len(history)}
        if history:
            values["sparsify/anp"] = history[-1]["anp"]
            values["sparsify/regrown"] = sum(layer["regrown"] for layer in history[-1]["layers"].values())
        return values

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        values = self.values()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)  # the Trainer copied logs there before calling back


def install(trainer: Trainer, handle: SparseModel) -> SparsifyCallback:
    """Add a :class:`SparsifyCallback` to ``trainer`` ahead of its reporters, so that TensorBoard,
    W&B or any ``report_to`` integration logs the values it adds (a callback passed in
    ``callbacks=[...]`` comes after them, and they would log without them). Returns the callback."""
    callback = SparsifyCallback(handle)
    callbacks = trainer.callback_handler.callbacks
    callbacks.insert(1 if callbacks and type(callbacks[0]).__name__ == "DefaultFlowCallback" else 0, callback)
    return callback
