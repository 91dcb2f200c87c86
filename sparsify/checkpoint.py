"""Reading a run's model.pt and checkpoint.pt: tensors and plain data only (never pickled code), and
a state that does not fit the model is a user error that says which keys and shapes differ."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from sparsify.errors import SparsifyError, first_line


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
                            f"({first_line(exc)})") from None
    if not isinstance(saved, dict):
        raise SparsifyError(f"{path}: holds a {type(saved).__name__}, not a sparsify model.pt or checkpoint.pt")
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
