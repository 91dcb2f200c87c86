"""Bad input and what it gets: one test per row of the table in docs/errors.md.

A user error ends with one line, "sparsify: error: ...", and exit code 2 (main() returns 2 rather
than raising, so no traceback is printed); a warning is one line, "sparsify: warning: ...", and the
work goes on. Internal errors keep their traceback.
"""
import re
import shutil
from pathlib import Path

import pytest
import torch

import sparsify
from sparsify import checkpoint
from sparsify.cli import main
from sparsify.errors import SparsifyWarning
from sparsify.export.onnx_file import OnnxModel
from sparsify.inspection import inspect_model

from model_zoo import load_example

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "models" / "tiny_task.py"
MLP = ROOT / "examples" / "models" / "mlp.py"
POLICY = """version: 1
rules:
  - match: {regex: "fc[12]"}
    density: 0.2
    method: SET
    update: {every: 10, unit: steps}
training: {epochs: 1, batch_size: 32, optimizer: sgd, lr: 0.01}
"""


def cli(capsys, *argv):
    """(exit code, stderr) of the CLI run in this process."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def error_of(capsys, *argv) -> str:
    code, err = cli(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("sparsify: error: ") or any(line.startswith("sparsify: error: ") for line in lines)
    assert "Traceback" not in err
    return err


def bad_file(path: Path, content: bytes | None) -> Path:
    """``path`` holding ``content`` as raw bytes, or a folder in its place when ``content`` is None."""
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A finished training run of the tiny task (one epoch)."""
    folder = tmp_path_factory.mktemp("run")
    policy = write(folder, "policy.yaml", POLICY)
    assert main([str(TINY), str(policy), "-o", str(folder / "run"), "--no-plots"]) == 0
    return folder / "run"


# --- the policy ---------------------------------------------------------------------------------

def test_malformed_yaml(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - match: {name: fc1\n    density: 0.1\n")
    err = error_of(capsys, "inspect", MLP, policy)
    assert f"{policy}:" in err and "YAML" in err


@pytest.mark.parametrize("body, expected", [
    ("rules:\n  - match: {name: fc1}\n    density: high\n", "p.yaml:4: rules[0].density: 'high' is a string, expected number"),
    ("rules:\n  - match: {name: fc1}\n    density: 1.5\n", "p.yaml:4: rules[0].density: 1.5 is greater than the maximum 1"),
    ("rules:\n  - match: {name: fc1}\n    densty: 0.1\n", "did you mean 'density'"),
    ("rules:\n  - match: {name: fc1}\n    density: 0.1\n    method: CHTS\n", "did you mean 'CHTs'"),
])
def test_schema_violations_name_line_path_and_fix(tmp_path, capsys, body, expected):
    policy = write(tmp_path, "p.yaml", "version: 1\n" + body)
    assert expected in error_of(capsys, "inspect", MLP, policy)


def test_regex_that_does_not_compile(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", 'version: 1\nrules:\n  - match: {regex: "fc[1-"}\n    density: 0.1\n')
    err = error_of(capsys, "inspect", MLP, policy)
    assert "p.yaml:3: rules[0].match.regex: 'fc[1-' is not a valid regular expression" in err


@pytest.mark.parametrize("device, expected", [
    ("gpu", "training.device 'gpu' is not a torch device; write cpu, cuda, cuda:1"),
    ("cuda:x", "training.device 'cuda:x' is not a torch device"),
    *([] if torch.cuda.is_available() else [("cuda", "training.device 'cuda', but this torch sees no CUDA device")]),
])
def test_a_training_device_torch_cannot_use_is_refused_before_the_run(tmp_path, capsys, device, expected):
    policy = write(tmp_path, "p.yaml", POLICY.replace("lr: 0.01}", f"lr: 0.01, device: '{device}'}}"))
    assert expected in error_of(capsys, TINY, policy, "-o", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rules_that_apply_to_no_layer_warn_and_the_run_goes_on(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY.replace("training:", """  - match: {name: fc_3}
    density: 0.5
  - match: {regex: "fc"}
    density: 0.5
  - match: {regex: "fc1"}
    density: 0.5
  - match: {regex: "attn.*"}
    density: 0.5
training:"""))
    code, err = cli(capsys, TINY, policy, "-o", tmp_path / "run", "--no-plots")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("sparsify: warning: ")]
    assert len(warnings) == 4
    assert "rules[1] name='fc_3' (line 7) matches no linear layer; did you mean fc3" in warnings[0]
    assert "regex='fc' (line 9) matches no linear layer; it is found inside fc1, fc2, fc3 but must match the " \
           "whole name" in warnings[1]
    assert "rules[3] regex='fc1' (line 11) applies to no linear layer: an earlier rule takes every layer it " \
           "matches (fc1)" in warnings[2]
    assert "regex='attn.*' (line 13) matches no linear layer; the linear layers are fc1, fc2, fc3" in warnings[3]


def test_a_policy_that_makes_nothing_sparse(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", 'version: 1\nrules:\n  - match: {regex: "attn.*"}\n    density: 0.1\n')
    err = error_of(capsys, "inspect", MLP, policy)
    assert "the policy makes no layer sparse. The model's linear layers are: fc1, fc2, fc3, fc4" in err


def test_density_that_leaves_a_layer_no_link(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", 'version: 1\nrules:\n  - match: {name: fc4}\n    density: 0.00001\n')
    err = error_of(capsys, "inspect", MLP, policy)
    assert "layer fc4 (10x1568): density 1e-05 leaves no link" in err
    assert "the smallest density that keeps one link is 3.2e-05" in err


def test_density_that_leaves_output_neurons_without_input_warns(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", 'version: 1\nrules:\n  - match: {name: fc1}\n    density: 0.0005\n')
    expected = ("rules[0] name='fc1': layer fc1 (1568x784): density 0.0005 gives 615 links for 1568 output neurons, "
                "so at least 953 output neurons have no input and emit a constant; a density of at least 0.00128 "
                "gives each one a link")
    code, _ = cli(capsys, "inspect", MLP, policy)
    assert code == 0
    assert inspect_model(str(MLP), str(policy)).warnings() == [expected]  # what inspect prints
    with pytest.warns(SparsifyWarning) as caught:  # what a run or the Python API says
        sparsify.sparsify(load_example("mlp").build_model(), policy, torch.zeros(2, 784))
    assert [str(w.message) for w in caught] == [f"{policy}: {expected}"]


def test_density_above_one_asks_for_more_links_than_the_layer_has(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", "version: 1\nrules:\n  - match: {name: fc1}\n    sparsity: -0.5\n")
    assert "rules[0].sparsity: -0.5 is less than the minimum 0" in error_of(capsys, "inspect", MLP, policy)


def test_an_optimizer_the_runtime_does_not_know(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY.replace("optimizer: sgd", "optimizer: lion"))
    err = error_of(capsys, TINY, policy, "-o", tmp_path / "run")
    assert "training.optimizer: 'lion' is not one of sgd, adam, adamw" in err
    assert not (tmp_path / "run").exists()


# --- the model -------------------------------------------------------------------------------------

UNTRACEABLE = """import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)

    def forward(self, x):
        n = int(x.sum().item())
        return self.fc1(x).repeat(n, 1)

def build_model():
    return Net()

def example_inputs():
    return (torch.ones(2, 8),)
"""


def test_untraceable_model_names_both_captures_and_the_line(tmp_path, capsys):
    model = write(tmp_path, "model.py", UNTRACEABLE)
    err = error_of(capsys, "inspect", model)
    assert "could not capture the model as a graph" in err
    assert "torch.fx.symbolic_trace: TypeError" in err and "model.py:10: n = int(x.sum().item())" in err
    assert "torch.export.export(strict=False): GuardOnDataDependentSymNode" in err
    assert "def forward" not in err  # torch.export's partial graph is not dumped on the user


NAN_MODEL = """import sys
import torch
sys.path.insert(0, {models!r})
from mlp import MLP

def build_model():
    model = MLP((20, 32, 32, 32, 4))
    with torch.no_grad():
        model.fc2.weight[3, 5] = float({value!r})
    return model

def example_inputs():
    return (torch.zeros(2, 20),)
"""


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_weights(tmp_path, capsys, value):
    model = write(tmp_path, "model.py", NAN_MODEL.format(models=str(MLP.parent), value=value))
    policy = write(tmp_path, "p.yaml", 'version: 1\nrules:\n  - match: {regex: "fc[1-3]"}\n    density: 0.5\n')
    err = error_of(capsys, "inspect", model, policy)
    assert f"layer fc2 holds 1 non-finite weight(s) ({value} at [3, 5])" in err


DIVERGING = TINY.read_text().replace("    return x, (x[:, :4]", "    x[7, 3] = float('nan')\n    return x, (x[:, :4]")


def test_loss_becoming_nan_stops_the_run_with_the_step(tmp_path, capsys):
    model = write(tmp_path, "model.py", DIVERGING)
    policy = write(tmp_path, "p.yaml", POLICY)
    err = error_of(capsys, model, policy, "-o", tmp_path / "run", "--no-plots")
    assert re.search(r"the loss became nan at epoch 1, step \d+; lower training.lr or check the data", err)
    assert not (tmp_path / "run" / "model.pt").exists()


# --- files --------------------------------------------------------------------------------------------

def test_output_folder_that_holds_a_run(run_folder, capsys):
    err = error_of(capsys, TINY, run_folder.parent / "policy.yaml", "-o", run_folder)
    assert "already holds a run" in err and "--resume" in err and "--force" in err


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    policy = write(tmp_path, "p.yaml", POLICY)
    blocker = write(tmp_path, "file", "")
    err = error_of(capsys, TINY, policy, "-o", blocker / "run")
    assert f"{blocker / 'run'}: cannot write the output folder: Not a directory" in err


@pytest.mark.parametrize("content", [b"garbage", bytes(range(256)), None])
def test_corrupt_checkpoint(run_folder, tmp_path, capsys, content):
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    if content is None:
        torch.save({"a": 1}, copy / "checkpoint.pt")
    else:
        (copy / "checkpoint.pt").write_bytes(content)
    err = error_of(capsys, TINY, run_folder.parent / "policy.yaml", "-o", copy, "--resume")
    assert f"{copy / 'checkpoint.pt'}: not a" in err
    err = error_of(capsys, "export", copy / "checkpoint.pt")
    assert f"{copy / 'checkpoint.pt'}: not a" in err


def test_checkpoint_of_a_changed_model(run_folder, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_folder, copy)
    for name in ("checkpoint.pt", "model.pt"):  # point the run at a model.py that has changed since
        saved = torch.load(copy / name, weights_only=True)
        changed = write(tmp_path, "changed.py", TINY.read_text().replace("nn.Linear(64, 64)", "nn.Linear(64, 48)")
                        .replace("nn.Linear(64, 4)", "nn.Linear(48, 4)"))
        saved["model_file"] = str(changed)
        checkpoint.save(copy / name, {k: v for k, v in saved.items() if k != checkpoint.CHECKSUM})
    err = error_of(capsys, changed, run_folder.parent / "policy.yaml", "-o", copy, "--resume")
    assert "fc2.weight is [64, 64] in the file but [48, 64] in the model" in err
    assert "Was model.py or the policy changed after the run?" in err
    err = error_of(capsys, "export", copy)
    assert f"{copy / 'model.pt'} does not fit the model that {changed} builds" in err


def test_export_whose_parity_check_fails_leaves_no_file(run_folder, tmp_path, capsys, monkeypatch):
    real = OnnxModel.run
    monkeypatch.setattr(OnnxModel, "run", lambda self, inputs: [o + 1e-3 for o in real(self, inputs)])
    err = error_of(capsys, "export", run_folder, "-o", tmp_path / "out" / "m.onnx")
    assert "onnxruntime's outputs differ from the trained model's by 0.001 (limit 0.0001); no file was written" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_internal_errors_keep_their_traceback(monkeypatch):
    import dataclasses

    import sparsify.passes.couple as couple

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("sparsify.passes.pipeline.COUPLE", dataclasses.replace(couple.COUPLE, run=broken))
    assert couple.couple is not broken
    with pytest.raises(RuntimeError, match="pass couple failed \\(after find_linears\\): ZeroDivisionError: a bug"):
        main(["inspect", str(MLP)])


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\x00version: 1", "not UTF-8 text (byte 0xff at offset 0); a policy is a YAML text file"),
    (b"", "the policy is empty"),
    (b"version: 1\ndefaults:\n  density: .nan\n", ":3: defaults.density: nan is not a finite number"),
    (b"version: 1\ndefaults:\n  density: 0.1\ntraining:\n  lr: 1.0e+999\n", ":5: training.lr: inf is not a finite number"),
    (None, "is a folder, not a policy file"),
])
def test_policy_files_that_are_not_text_empty_folders_or_not_finite(tmp_path, capsys, content, expected):
    policy = bad_file(tmp_path / "p.yaml", content)
    err = error_of(capsys, TINY, policy, "-o", tmp_path / "run")
    assert expected in err and str(policy) in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, expected", [
    (b"\x00\x01binary", "not Python source (it holds null bytes: a binary file?)"),
    (b"  \n", "is empty; model.py must define build_model()"),
    (b"x = 1\n\xff bad\n", ":2: syntax error: (unicode error)"),
    (None, "is a folder; give the path of a model.py"),
])
def test_model_files_that_are_not_text_empty_or_folders(tmp_path, capsys, content, expected):
    model = bad_file(tmp_path / "model.py", content)
    err = error_of(capsys, model, write(tmp_path, "policy.yaml", POLICY))
    assert expected in err and str(model) in err
