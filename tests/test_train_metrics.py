"""What a run measures: only what its outputs allow, and model.py's own metric by its name."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from sparsify.train import _headline, evaluate

ROOT = Path(__file__).resolve().parent.parent


def test_class_logits_give_accuracy_and_nothing_for_tokens():
    data = [(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]))]
    result = evaluate(nn.Identity(), data, nn.functional.cross_entropy)
    assert result["accuracy"] == 0.5 and "token_accuracy" not in result and "perplexity" not in result


def test_token_logits_give_token_accuracy_perplexity_and_skip_ignored_targets():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 3] = 5.0  # predicts 2, 1, 3
    targets = torch.tensor([[2, 0, -100]])  # right, wrong, ignored

    def loss(outputs, y):
        return nn.functional.cross_entropy(outputs.reshape(-1, 4), y.reshape(-1))

    result = evaluate(nn.Identity(), [(logits, targets)], loss, metric=lambda o, y: 7.0)
    assert result["token_accuracy"] == 0.5 and "accuracy" not in result and result["metric"] == 7.0
    assert result["perplexity"] == math.exp(result["loss"])


def test_a_regression_loss_prints_no_accuracy():
    data = [(torch.randn(4, 1), torch.randn(4, 1))]
    result = evaluate(nn.Identity(), data, nn.functional.mse_loss)
    assert set(result) == {"loss"}
    assert _headline({"final": {"eval_loss": 0.5}, "best": {"epoch": 1, "eval_loss": 0.5}}) == \
        "eval loss 0.5000 (best 0.5000 at epoch 1)"


def test_the_language_model_example_trains_and_reports_its_measures(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SPARSIFY_LM_BYTES": "150000"}  # 146 steps: one update, at step 100
    proc = subprocess.run([sys.executable, "-m", "sparsify", str(ROOT / "examples/lm/model.py"),
                           str(ROOT / "examples/lm/policy.yaml"), "-o", str(out), "--no-plots"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    final = report["final"]
    assert "eval_accuracy" not in final and 0 < final["eval_token_accuracy"] < 1
    assert final["eval_perplexity"] == math.exp(final["eval_loss"]) and report["metric"] == "bits per byte"
    assert abs(final["eval_metric"] - final["eval_loss"] / math.log(2)) < 1e-3
    assert final["eval_loss"] < math.log(256)  # better than a uniform guess over bytes
    assert "accuracy 0.0000" not in proc.stdout and "done: bits per byte" in proc.stdout
    assert {layer["method"] for layer in report["layers"]} == {"CHTss"} and len(report["layers"]) == 14
    assert report["topology_updates"] == 1
    assert all(abs(layer["density"] - 0.3) < 1e-3 for layer in report["layers"])
