"""sparsify.integrations.hf: a real transformers.Trainer run on CPU on a tiny LlamaForCausalLM."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import sparsify  # noqa: E402
from sparsify.integrations.hf import HISTORY_FILE, SparsifyCallback, install  # noqa: E402

POLICY = {"version": 1, "seed": 0, "rules": [{
    "name": "attention and MLP", "match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"},
    "density": 0.3, "method": "CHTs", "update": {"every": 5, "unit": "steps"}}]}
VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny model: one thread steps it in milliseconds, where two fight over busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    return sparsify.sparsify(LlamaForCausalLM(config), POLICY, example_inputs=(torch.randint(0, VOCAB, (2, SEQ)),))


def arguments(out, **overrides):
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                    logging_steps=1, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**settings, **overrides})


def masks(handle):
    return {name: mask.clone() for name, mask in handle.masks().items()}


class StopAt(TrainerCallback):
    """An interruption: training stops after step ``step`` (its checkpoint written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class Reporter(TrainerCallback):
    """Stands for TensorBoard or W&B: records what each on_log call shows it."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def test_gradient_accumulation_counts_optimizer_steps_and_logs_reach_reporters(tmp_path):
    model, handle = build()
    before = masks(handle)
    reporter = Reporter()
    trainer = Trainer(model=model, args=arguments(tmp_path, max_steps=8, gradient_accumulation_steps=2),
                      train_dataset=Tokens(), callbacks=[reporter])
    install(trainer, handle)
    trainer.train()
    assert trainer.state.global_step == 8
    assert handle.evolution.step_index == 8           # one count per optimizer step, not per micro-batch
    assert [r["step"] for r in handle.history] == [5]  # every 5 steps
    assert int(handle.evolution.steps_per_epoch) == 4  # 32 samples / batch 4 / accumulation 2
    assert any(not torch.equal(before[n], m) for n, m in masks(handle).items())
    active, total = handle.parameters_active()
    logged = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logged) == 8 and all(r["sparsify/density"] == pytest.approx(active / total) for r in logged)
    assert [r["sparsify/updates"] for r in logged] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert logged[-1]["sparsify/anp"] == handle.history[-1]["anp"]
    assert [r.get("sparsify/updates") for r in reporter.seen if "loss" in r] == [0, 0, 0, 0, 1, 1, 1, 1]
    # training ended: the step hook is gone, so the optimizer steps no longer count
    trainer.optimizer.step()
    assert handle.evolution.step_index == 8


def test_a_resumed_trainer_run_ends_with_the_uninterrupted_runs_masks(tmp_path):
    steps = 16  # updates at steps 5 and 10 (updates stop at 75% of 16); the interruption at step 6 falls between them
    model, handle = build()
    Trainer(model=model, args=arguments(tmp_path / "whole", max_steps=steps), train_dataset=Tokens(),
            callbacks=[SparsifyCallback(handle)]).train()
    whole = masks(handle)
    assert [r["step"] for r in handle.history] == [5, 10]

    model, handle = build()
    first = arguments(tmp_path / "cut", max_steps=steps, save_strategy="steps", save_steps=3)
    Trainer(model=model, args=first, train_dataset=Tokens(), callbacks=[SparsifyCallback(handle), StopAt(6)]).train()
    checkpoint = tmp_path / "cut" / "checkpoint-6"
    assert (checkpoint / HISTORY_FILE).is_file() and handle.evolution.step_index == 6

    model, handle = build(seed=1)  # another initial topology: the checkpoint must replace it
    assert any(not torch.equal(whole[n], m) for n, m in masks(handle).items())
    trainer = Trainer(model=model, args=arguments(tmp_path / "cut", max_steps=steps), train_dataset=Tokens(),
                      callbacks=[SparsifyCallback(handle)])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == steps and handle.evolution.step_index == steps
    assert [r["step"] for r in handle.history] == [5, 10]  # the update before the checkpoint came back from its file
    resumed = masks(handle)
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_the_callback_takes_the_handle():
    model, handle = build()
    with pytest.raises(sparsify.SparsifyError, match="handle"):
        SparsifyCallback(model)


def test_without_transformers_the_import_says_what_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "sparsify.integrations.hf")
    with pytest.raises(ImportError, match="pip install transformers"):
        importlib.import_module("sparsify.integrations.hf")


def test_the_trainers_ddp_launch_keeps_every_ranks_masks_identical(tmp_path):
    """The Trainer under torchrun in 2 processes (DDP over gloo on CPU), each rank on its half of the
    data with gradient accumulation; RigL's regrowth reads the dense gradients all-reduced over the
    ranks, and every rank ends each update with the same masks."""
    import json
    from pathlib import Path

    from ddp_worker import torchrun

    worker = Path(__file__).resolve().parent / "hf_ddp_worker.py"
    proc = torchrun(tmp_path, worker, tmp_path, "RigL", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["wrapped"] == "DistributedDataParallel"
        # 64 samples, 32 a rank in batches of 4, 2 accumulated: 4 optimizer steps an epoch, 3 epochs
        assert rank["steps"] == rank["counted"] == 12
        assert rank["updates"] == [3, 6]  # every 3 steps until 75% of 12
        assert len(rank["sums"]) == 2
        for update in rank["sums"]:  # the checksums every rank gathered after each update
            assert update[0] == update[1]
    assert ranks[0]["sums"] == ranks[1]["sums"] and ranks[0]["final"] == ranks[1]["final"]
    assert ranks[0]["sums"][0] != ranks[0]["sums"][1]  # the topology did change
    assert len(ranks[0]["losses"]) == 12
