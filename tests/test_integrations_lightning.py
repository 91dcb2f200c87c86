"""sparsify.integrations.lightning: real lightning.Trainer runs on CPU on a small MLP."""
import json
import sys
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import Logger  # noqa: E402

import sparsify  # noqa: E402
from sparsify.integrations.lightning import SparsifyCallback  # noqa: E402
from ddp_worker import torchrun  # noqa: E402
from lightning_worker import Classifier, Net, build, data  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model: one thread steps it in microseconds, where two fight over busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trainer(out, callbacks, **overrides):
    settings = dict(default_root_dir=str(out), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_epochs=2)
    return Trainer(callbacks=callbacks, **{**settings, **overrides})


def masks(handle):
    return {name: mask.clone() for name, mask in handle.masks().items()}


class Recorder(Logger):
    """Stands for TensorBoard or W&B: records what the Trainer sends it, by step."""

    def __init__(self):
        super().__init__()
        self.rows = []

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def test_gradient_accumulation_counts_optimizer_steps_and_logs_reach_the_logger(tmp_path):
    module, handle = build()
    before = masks(handle)
    recorder = Recorder()
    # 8 batches per epoch, 2 per optimizer step: 4 steps per epoch, 8 in all; updates at 3 and 6 (T_end = 6: not 6)
    run = trainer(tmp_path, [SparsifyCallback(handle)], accumulate_grad_batches=2, logger=recorder, log_every_n_steps=1)
    run.fit(module, data())
    assert run.global_step == 8 and len(module.losses) == 16
    assert handle.evolution.step_index == 8            # one count per optimizer step, not per batch
    assert int(handle.evolution.total_steps) == 8 and int(handle.evolution.steps_per_epoch) == 4
    assert [r["step"] for r in handle.history] == [3]
    assert any(not torch.equal(before[n], m) for n, m in masks(handle).items())
    active, total = handle.parameters_active()
    logged = [(step, row) for step, row in recorder.rows if "sparsify/updates" in row]
    assert [step for step, _ in logged] == list(range(8))  # once per optimizer step (Lightning counts from 0)
    assert [row["sparsify/updates"] for _, row in logged] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(row["sparsify/density"] == pytest.approx(active / total) for _, row in logged)
    assert "sparsify/anp" not in logged[1][1] and logged[-1][1]["sparsify/anp"] == pytest.approx(handle.history[-1]["anp"])
    assert logged[-1][1]["sparsify/regrown"] == sum(r["regrown"] for r in handle.history[-1]["layers"].values()) > 0
    # training ended: the step hook is gone, so the optimizer's steps no longer count
    run.optimizers[0].step()
    assert handle.evolution.step_index == 8


class StopAfterEpoch(Callback):
    """An interruption: training stops at the end of epoch ``epoch`` (0-based), its checkpoint written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def test_a_resumed_run_ends_with_the_uninterrupted_runs_masks_and_losses(tmp_path):
    epochs = 4  # 8 steps per epoch, 32 in all: updates at 3, 6, ..., 21 (T_end = 24); the cut after step 16
    module, handle = build()
    trainer(tmp_path / "whole", [SparsifyCallback(handle)], max_epochs=epochs).fit(module, data())
    whole, whole_losses = masks(handle), module.losses
    assert [r["step"] for r in handle.history] == [3, 6, 9, 12, 15, 18, 21]

    module, handle = build()
    saving = ModelCheckpoint(dirpath=tmp_path / "cut", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path / "cut", [SparsifyCallback(handle), StopAfterEpoch(1), saving], max_epochs=epochs,
            enable_checkpointing=True).fit(module, data())
    checkpoint = tmp_path / "cut" / "epoch=1-step=16.ckpt"
    assert checkpoint.is_file() and handle.evolution.step_index == 16
    first_losses = module.losses

    module, handle = build(seed=1)  # another initial topology and weights: the checkpoint must replace both
    assert any(not torch.equal(whole[n], m) for n, m in masks(handle).items())
    run = trainer(tmp_path / "cut", [SparsifyCallback(handle)], max_epochs=epochs)
    run.fit(module, data(), ckpt_path=str(checkpoint))
    assert run.global_step == 32 and handle.evolution.step_index == 32
    assert [r["step"] for r in handle.history] == [3, 6, 9, 12, 15, 18, 21]  # those before the cut from the checkpoint
    resumed = masks(handle)
    assert resumed.keys() == whole.keys() and all(torch.equal(whole[n], resumed[n]) for n in whole)
    assert first_losses + module.losses == whole_losses  # bitwise: the same steps on the same weights


def test_a_model_outside_the_lightning_module_is_refused(tmp_path):
    module, handle = build()
    other = Classifier(Net())  # trains a dense copy: the sparse model would never see a step
    with pytest.raises(sparsify.SparsifyError, match="not part of the LightningModule Classifier"):
        trainer(tmp_path, [SparsifyCallback(handle)]).fit(other, data())


class TwoOptimizers(Classifier):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.fc1.parameters(), lr=0.1), torch.optim.SGD(self.net.fc2.parameters(), lr=0.1)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(data().dataset)


def test_several_optimizers_and_a_run_of_unknown_length_are_refused(tmp_path):
    module, handle = build()
    with pytest.raises(sparsify.SparsifyError, match="configure_optimizers gave 2 optimizers"):
        trainer(tmp_path, [SparsifyCallback(handle)]).fit(TwoOptimizers(module.net), data())
    with pytest.raises(sparsify.SparsifyError, match="number of optimizer steps is not known .* set max_steps"):
        trainer(tmp_path, [SparsifyCallback(handle)]).fit(module, torch.utils.data.DataLoader(Stream(), batch_size=8))
    assert handle.evolution.step_index == 0


@pytest.fixture
def one_epoch(tmp_path):
    """A checkpoint after one epoch of a one-epoch run (8 steps, an update at step 3)."""
    module, handle = build()
    run = trainer(tmp_path, [SparsifyCallback(handle)], max_epochs=1)
    run.fit(module, data())
    run.save_checkpoint(tmp_path / "one.ckpt")
    return tmp_path / "one.ckpt"


def test_resuming_with_a_model_that_did_not_come_from_the_checkpoint_is_refused(tmp_path, one_epoch):
    state = torch.load(one_epoch, weights_only=False)
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "sparsify_evolution" not in k}
    torch.save(state, tmp_path / "partial.ckpt")
    module, handle = build()
    module.strict_loading = False  # a checkpoint without the evolution's state: its step stays at 0
    with pytest.raises(sparsify.SparsifyError, match="ends at step 8 but the model's evolution loaded from it counted 0"):
        trainer(tmp_path, [SparsifyCallback(handle)]).fit(module, data(), ckpt_path=str(tmp_path / "partial.ckpt"))


def test_resuming_for_more_steps_than_planned_says_the_schedule_follows(tmp_path, one_epoch):
    module, handle = build()
    with pytest.warns(RuntimeWarning, match="resumes with 16 optimizer steps in all where its topology schedule was "
                                            "made for 8"):
        trainer(tmp_path, [SparsifyCallback(handle)], max_epochs=2).fit(module, data(), ckpt_path=str(one_epoch))
    assert int(handle.evolution.total_steps) == 16
    assert [r["step"] for r in handle.history] == [3, 9]  # T_end: 6 of 8 steps, then 12 of 16


def test_the_callback_takes_the_handle():
    module, handle = build()
    with pytest.raises(sparsify.SparsifyError, match="handle"):
        SparsifyCallback(module)


def test_without_lightning_the_import_says_what_to_install(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "sparsify.integrations.lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("sparsify.integrations.lightning")


def test_ddp_strategy_in_two_processes_keeps_every_ranks_masks_identical(tmp_path):
    """Lightning's ddp strategy under torchrun (gloo on CPU), each rank on its half of the batches; RigL's
    regrowth reads the dense gradients all-reduced over the ranks, and rank 0's masks reach every rank."""
    proc = torchrun(tmp_path, ROOT / "tests/lightning_worker.py", tmp_path, "RigL", env={"OMP_NUM_THREADS": "1"},
                    timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["steps"] == 24 and rank["losses"] == 24  # 8 of the 16 batches per rank and epoch
        assert rank["updates"] == [3, 6, 9, 12, 15]  # T_end = 18
    assert len(ranks[0]["sums"]) == 5
    for update in ranks[0]["sums"]:  # the checksums every rank gathered after each update
        assert update[0] == update[1]
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["sums"][0] != ranks[0]["sums"][-1]  # the topology did change
