"""Errors a user can act on. The CLI prints them without a traceback and exits with 2."""
import os
import re
import traceback

import torch

# Frames from these folders are never "the user's line": sparsify itself and installed packages.
_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)),
                 os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))


def user_frame(exc: BaseException, skip: tuple[str, ...] = ()) -> traceback.FrameSummary | None:
    """The innermost frame of ``exc``'s traceback in the user's own code, or None."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_LIBRARY_DIRS + skip) and not f.filename.startswith("<")]
    return frames[-1] if frames else None


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (its first non-blank line, terminal colour codes removed)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else f"{type(exc).__name__}:"


class SparsifyError(Exception):
    """Base class of user-facing errors: the message says what was wrong, where, and what to do."""


class PolicyError(SparsifyError):
    """The policy file or dict is malformed or violates the schema."""


class CaptureError(SparsifyError):
    """The model could not be captured as a graph."""


class ModelFileError(SparsifyError):
    """model.py is missing, raises, or does not follow the contract."""


class PlanError(SparsifyError):
    """The policy cannot be applied to this model (for example, it matches no layer)."""


class ExportError(SparsifyError):
    """An export whose result does not match the trained model (or that could not be written)."""


class SparsifyWarning(UserWarning):
    """Something in the input that is probably a mistake but does not stop the work (for example, a
    rule that matches no layer). The CLI prints it as one line."""
