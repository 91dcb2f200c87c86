"""Writing and reading a run's model.pt and checkpoint.pt: tensors and plain data only (never
pickled code), with a SHA-256 of the contents stored inside and verified on every read, so a file
a disk fault or a cut copy changed is refused, never used; a state that does not fit the model is a
user error that says which keys and shapes differ."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.errors import SparsifyError, first_line
from sparsify.files import atomic_write

CHECKSUM = "sha256"  # the key of the contents' digest in a saved dict
CORRUPT = ("the file is corrupt (a disk fault, or a copy or write cut short); restore it from a copy, or start the "
           "run again (--force) or, for model.pt, export from the run's checkpoint.pt")


def digest(value: Any) -> str:
    """The SHA-256 of ``value``, a nest of dicts, lists and tuples of tensors and plain data: each
    tensor's dtype, shape and bytes, each dict's keys in order, every other value's repr.

    >>> digest({"w": torch.zeros(2), "step": 3}) == digest({"w": torch.zeros(2), "step": 3})
    True
    >>> digest({"w": torch.zeros(2)}) == digest({"w": torch.tensor([0.0, 1e-45])})
    False
    """
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        t = t.to_dense() if t.layout != torch.strided else t
        h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def save(path: Path, contents: dict) -> None:
    """``torch.save`` of ``contents`` with its digest under ``sha256``, written atomically (a
    temporary file in the same folder, flushed, renamed over ``path``)."""
    saved = {**contents, CHECKSUM: digest(contents)}
    atomic_write(Path(path), lambda f: torch.save(saved, f), binary=True)


def read(path: Path, keys: tuple[str, ...] = ("policy", "model_file")) -> dict:
    """The dict a run saved at ``path``, loaded with ``weights_only=True``; it must hold ``keys``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SparsifyError(f"{path}: not a PyTorch file of tensors and plain data, so not a sparsify model.pt "
                            "or checkpoint.pt (it is corrupt, or holds pickled objects, which sparsify never "
                            "loads)") from None
    except Exception as exc:
        raise SparsifyError(f"{path}: cannot read it as a sparsify model.pt or checkpoint.pt "
                            f"({first_line(exc)}); if it is one, {CORRUPT}") from None
    if not isinstance(saved, dict):
        raise SparsifyError(f"{path}: holds a {type(saved).__name__}, not a sparsify model.pt or checkpoint.pt")
    stored = saved.pop(CHECKSUM, None)  # files written before checksums have none
    if stored is not None and stored != digest(saved):
        raise SparsifyError(f"{path}: its contents do not match the SHA-256 stored in it: {CORRUPT}")
    missing = [k for k in keys if k not in saved]
    if missing:
        kind = "checkpoint.pt" if "optimizer" in keys else "model.pt or checkpoint.pt"
        raise SparsifyError(f"{path}: not a sparsify {kind} (it has no {', '.join(missing)})")
    return saved


def load_state(module: nn.Module, state: dict, path: Path, model_path: str) -> None:
    """``module.load_state_dict(state)``, or a SparsifyError naming what does not fit.

    Keys are judged by the load itself, so a module that fills in a key older files lack (a
    default in its ``_load_from_state_dict``) loads them; shapes are checked before anything loads."""
    own = module.state_dict()
    shapes = [f"{k} is {list(state[k].shape)} in the file but {list(own[k].shape)} in the model"
              for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if shapes:
        missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    else:
        result = module.load_state_dict(state, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    problems = shapes + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SparsifyError(f"{path} does not fit the model that {model_path} builds with this policy: "
                            f"{'; '.join(problems[:3])}{more}. Was model.py or the policy changed after the run? "
                            "Restore them, or start a new run.")
