"""Writing files so that an interrupted run never leaves a half-written one: a temporary name in
the same folder first, renamed over the target only once complete."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def temporary(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so a rename onto ``path`` is atomic)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    tmp = temporary(path)
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
