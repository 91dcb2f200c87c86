import pytest

from sparsify.policy import TrainingConfig, load_policy
from sparsify.train import best_epoch, lr_factor


def test_the_default_schedule_is_the_official_linear_decay_to_one_percent_at_ninety_percent():
    cfg = load_policy({"version": 1, "defaults": {"density": 0.1}}).training_config()
    assert cfg == TrainingConfig() and cfg.weight_decay == 5e-4 and cfg.lr == 0.025
    factors = [lr_factor(cfg, step, 10, 1000) for step in (0, 450, 900, 999)]
    assert factors == pytest.approx([1.0, 0.505, 0.01, 0.01])


def test_per_epoch_steps_match_torch_linear_lr_stepped_each_epoch():
    import torch

    cfg = TrainingConfig(lr_step="epoch")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.025)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=90)
    for epoch in range(100):
        for step in (epoch * 7, epoch * 7 + 6):  # every step of an epoch has the epoch's rate
            assert 0.025 * lr_factor(cfg, step, 7, 700) == pytest.approx(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()


def test_cosine_and_constant_schedules():
    cfg = TrainingConfig(lr_schedule="cosine", lr_end_factor=0.1, lr_decay_end=1.0)
    assert [lr_factor(cfg, s, 10, 100) for s in (0, 50, 100)] == pytest.approx([1.0, 0.55, 0.1])
    assert lr_factor(cfg.replace(lr_schedule="constant"), 77, 10, 100) == 1.0


def test_best_epoch_counts_only_epochs_at_the_target_density():
    rows = [{"epoch": 1, "eval_accuracy": 0.9, "eval_loss": 0.3, "at_target": False},
            {"epoch": 2, "eval_accuracy": 0.8, "eval_loss": 0.4, "at_target": True},
            {"epoch": 3, "eval_accuracy": 0.85, "eval_loss": 0.35, "at_target": True}]
    assert best_epoch(rows) == {"epoch": 3, "eval_accuracy": 0.85, "eval_loss": 0.35}
    assert best_epoch(rows[:1]) is None
    losses = [{"epoch": 1, "eval_loss": 2.0}, {"epoch": 2, "eval_loss": 1.5}]  # no accuracy: the lowest loss
    assert best_epoch(losses) == {"epoch": 2, "eval_loss": 1.5}


def test_warm_up_then_the_official_llama_cosine_to_a_tenth():
    cfg = TrainingConfig(lr_schedule="cosine", lr_end_factor=0.1, lr_decay_end=1.0, lr_warmup_steps=1000)
    factors = [lr_factor(cfg, s, 100, 10_000) for s in (0, 499, 999, 1000, 5500, 10_000)]
    assert factors == pytest.approx([0.001, 0.5, 1.0, 1.0, 0.55, 0.1])
