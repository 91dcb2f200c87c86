"""Loading a user's model.py: the contract and its error messages.

model.py is Python code and runs with the user's rights. It defines:

- ``build_model()`` -> torch.nn.Module
- ``example_inputs()`` -> a tensor, a tuple of positional inputs, or a dict of keyword inputs
- for training runs (optional): ``train_data()`` and ``eval_data()`` -> iterables of
  ``(inputs, targets)`` batches, and optionally ``loss(outputs, targets)`` (default: cross entropy)
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from sparsify.errors import ModelFileError, user_frame
from sparsify.inputs import ExampleInputs

CONTRACT = ("build_model() returning a torch.nn.Module, and example_inputs() returning a tensor, "
            "a tuple of positional inputs or a dict of keyword inputs")


class ModelFile:
    """A loaded model.py."""

    def __init__(self, path: Path, module: ModuleType):
        self.path, self.module = path, module

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def _call(self, name: str) -> Any:
        fn = getattr(self.module, name, None)
        if not callable(fn):
            raise ModelFileError(f"{self.path}: defines no function {name}(); model.py must define {CONTRACT}")
        try:
            return fn()
        except Exception as exc:
            raise ModelFileError(f"{self.path}: {name}() raised {_where(exc)}") from exc

    def build_model(self) -> nn.Module:
        model = self._call("build_model")
        if not isinstance(model, nn.Module):
            raise ModelFileError(f"{self.path}: build_model() returned a {type(model).__name__}, "
                                 "expected a torch.nn.Module")
        return model

    def example_inputs(self) -> Any:
        value = self._call("example_inputs")
        try:
            ExampleInputs.of(value)
        except TypeError as exc:
            raise ModelFileError(f"{self.path}: example_inputs(): {exc}") from None
        return value


def _where(exc: BaseException) -> str:
    frame = user_frame(exc)
    loc = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{loc}"


def load_model_file(path: str | Path) -> ModelFile:
    """Import model.py from ``path`` (its folder is importable while it loads)."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give the path of a model.py that defines {CONTRACT}")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; give the path of a model.py that defines {CONTRACT}")
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read it: {exc.strerror}") from None
    if b"\0" in source:
        raise ModelFileError(f"{path}: not Python source (it holds null bytes: a binary file?)")
    if not source.strip():
        raise ModelFileError(f"{path}: is empty; model.py must define {CONTRACT}")
    name = f"sparsify_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"{path}: cannot be imported as Python (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        line = f":{exc.lineno}" if exc.lineno else ""
        raise ModelFileError(f"{path}{line}: syntax error: {exc.msg}") from None
    except Exception as exc:
        raise ModelFileError(f"{path}: importing it raised {_where(exc)}") from exc
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    return ModelFile(path, module)
