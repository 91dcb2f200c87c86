import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsify.cli import main

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "examples" / "models"
FMNIST = Path(os.environ.get("SPARSIFY_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def test_inspect_table_groups_and_unmatched_rules(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {name: fc4}\n    skip: true\n"
                      "  - match: {regex: 'fc[1-3]'}\n    sparsity: 0.99\n    method: RigL\n"
                      "  - match: {name: nothing}\n    density: 0.5\n")
    assert main(["inspect", str(MODELS / "mlp.py"), str(policy)]) == 0
    out = capsys.readouterr().out
    assert "capture: torch.fx.symbolic_trace" in out
    assert "1568 x 784" in out and "1,230,880" in out  # fc1's shape and parameters
    assert "chain  fc1 -> relu -> fc2  (1568 features, in order)" in out
    assert "warning: rules[2] name='nothing' (line 8) matches no linear layer" in out
    assert ("fc1, fc2, fc3: RigL: every 100 steps until 75% of training; remove zeta 0.3 (cosine) by WM hard; "
            "regrow gradient hard") in out


def test_inspect_json(capsys):
    assert main(["inspect", str(MODELS / "llama.py"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["sites"]) == 15 and report["sites"][0]["rule"] is None
    dots = [g for g in report["groups"] if g["kind"] == "dot"]
    assert len(dots) == 2 and dots[0]["q_heads"] == 4 and dots[0]["kv_heads"] == 2
    assert dots[0]["kv_shared_by"] == {"0": [0, 1], "1": [2, 3]}


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("import torch\n", "defines no function build_model()"),
    ("def build_model():\n    return [1]\n", "build_model() returned a list, expected a torch.nn.Module"),
    ("def build_model():\n    raise RuntimeError('boom')\n", "build_model() raised RuntimeError: boom at model.py:2"),
    ("x = (\n", "model.py:1: syntax error"),
    ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 4)\ndef example_inputs():\n"
     "    return (torch.ones(2, 5),)\n", "fails on its own example inputs"),
])
def test_model_file_errors_exit_2_without_traceback(tmp_path, content, expected):
    path = tmp_path / "model.py"
    if content is not None:
        path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "sparsify", "inspect", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_policy_exits_2_with_its_line(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules:\n  - match: {name: fc1}\n    density: 1.5\n")
    proc = subprocess.run(["sparsify", "inspect", str(MODELS / "mlp.py"), str(policy)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{policy}:4: rules[0].density: 1.5 is greater than the maximum 1" in proc.stderr


TINY = ROOT / "tests/models/tiny_task.py"
TINY_POLICY = """version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.2
    method: CHTs
    update: {every: 10, unit: steps}
training: {epochs: 3, batch_size: 32, optimizer: adamw, lr: 0.01}
"""


def comparable(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def test_interrupted_run_resumes_to_the_same_masks_and_losses(tmp_path, device):
    policy = tmp_path / "policy.yaml"
    policy.write_text(TINY_POLICY.replace("lr: 0.01}", f"lr: 0.01, device: {device}}}"))  # dropout on its generator
    cmd = ["sparsify", str(TINY), str(policy), "--no-plots", "-o"]
    whole = subprocess.run(cmd + [str(tmp_path / "whole")], capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    broken = subprocess.run(cmd + [str(tmp_path / "broken")], capture_output=True, text=True,
                            env={**os.environ, "SPARSIFY_TEST_DIE_AT_EPOCH": "2"})
    assert broken.returncode == 3 and not (tmp_path / "broken/model.pt").exists()
    assert [r["kind"] for r in comparable(tmp_path / "broken")].count("epoch") == 1
    again = subprocess.run(cmd + [str(tmp_path / "broken")], capture_output=True, text=True)
    assert again.returncode == 2 and "continue it with --resume" in again.stderr
    resumed = subprocess.run(cmd + [str(tmp_path / "broken"), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and "after epoch 1 (step 30)" in resumed.stdout
    expected = comparable(tmp_path / "whole")
    assert comparable(tmp_path / "broken") == expected  # losses, accuracies, every update's counts: equal
    assert [r["kind"] for r in expected].count("update") == 6
    a = torch.load(tmp_path / "whole/model.pt", map_location="cpu")["state_dict"]
    b = torch.load(tmp_path / "broken/model.pt", map_location="cpu")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # masks and weights, bitwise


def test_resume_refuses_changed_settings_and_missing_checkpoints(tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text(TINY_POLICY)
    cmd = ["sparsify", str(TINY), str(policy), "--no-plots", "-o", str(tmp_path / "run")]
    missing = subprocess.run(cmd + ["--resume"], capture_output=True, text=True)
    assert missing.returncode == 2 and "holds no checkpoint.pt to resume from" in missing.stderr
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    changed = subprocess.run(cmd + ["--resume", "--epochs", "5"], capture_output=True, text=True)
    assert changed.returncode == 2 and "started with training.epochs = 3, now 5" in changed.stderr


def test_training_needs_data_functions(tmp_path):
    proc = subprocess.run(["sparsify", str(MODELS / "mlp.py"), str(ROOT / "examples/policies/static.yaml"),
                           "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2 and "defines no train_data(batch_size), eval_data(batch_size);" in proc.stderr
    assert "To only analyze the model, use `sparsify inspect`" in proc.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("import torch\n")
    proc = subprocess.run(["sparsify", str(empty), str(ROOT / "examples/policies/static.yaml"),
                           "-o", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("defines no build_model(), example_inputs(), train_data(batch_size), eval_data(batch_size); "
            "a training run needs build_model() returning a torch.nn.Module") in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not FMNIST.exists() and not os.environ.get("CI"),
                    reason="Fashion-MNIST not installed (scripts/test.sh installs it; never skipped in CI)")
def test_short_training_run_on_fashion_mnist(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SPARSIFY_FMNIST_TRAIN_LIMIT": "12000"}  # 375 steps: one topology update, at 250
    cmd = ["sparsify", str(ROOT / "examples/fmnist/model.py"), str(ROOT / "examples/fmnist/policy.yaml"), "-o", str(out),
           "--epochs", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["eval_accuracy"] > 0.5  # 10 classes: chance is 0.1
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert set(layers) == {"fc1", "fc2", "fc3"}
    assert layers["fc2"]["active"] == round(0.01 * 1568 * 1568)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in rows] == [("update", 250), ("epoch", 375)]
    update = rows[0]["layers"]["fc2"]
    assert update["regrown"] == update["removed"] + update["percolated_links"] > 0
    assert report["topology_updates"] == 1 and 0 < report["anp"] <= 1
    assert all(layer["percolation"] for layer in layers.values()) and report["training"]["weight_decay"] == 5e-4
    assert "note: percolation is on but ANP is" not in proc.stdout  # weight decay is set (the official 5e-4)
    assert report["best"]["epoch"] == 1 and report["best"]["eval_accuracy"] == report["final"]["eval_accuracy"]
    assert f"(best {report['best']['eval_accuracy']:.4f} at epoch 1)" in proc.stdout
    export = report["export"]  # the example policy exports with sparse matmul, checked with onnxruntime
    assert export["sparse_matmul"] == ["fc1", "fc2", "fc3"] and export["compact"] == []
    assert export["onnxruntime_max_abs_diff"] <= 1e-4
    assert export["size_ratio"] < 0.05 and (out / "model.onnx").exists() and (out / "model.pt2").exists()
    for name in ("density.png", "anp.png", "degrees.png", "adjacency.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.parametrize("anp, weight_decay, percolation, noted", [
    (0.999, 0.0, True, True), (0.999, 5e-4, True, False), (0.5, 0.0, True, False), (0.999, 0.0, False, False)])
def test_the_summary_notes_a_percolating_run_without_weight_decay(anp, weight_decay, percolation, noted):
    from sparsify.train import _summary

    layer = {"name": "fc1", "shape": [4, 3], "density": 0.5, "active_outputs": 4, "active_inputs": 3, "itop": 0.7,
             "method": "CHTs", "percolation": percolation}
    report = {"final": {"eval_accuracy": 0.9, "epoch": 1}, "parameters": {"model": 19, "model_active": 13},
              "steps": 10, "topology_updates": 1, "anp": anp, "layers": [layer],
              "training": {"weight_decay": weight_decay}}
    assert ("note: percolation is on" in _summary(report, Path("run"))) is noted


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "sparsify", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("sparsify ")
