"""Writing files so that an interrupted run never leaves a half-written one: a temporary name in
the same folder first, flushed to the disk, renamed over the target only once complete. A write
the operating system refuses (a full disk, a read-only folder) is a user error naming the file;
the file it would have replaced is left as it was."""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

from sparsify.errors import SparsifyError


# What temporary() names: "." + the target's name + "." + mkstemp's 8 random characters + ".tmp",
# with ".data" after it for the external data of an ONNX file written there
LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.data)?$")


def temporary(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so a rename onto ``path`` is atomic), with the
    permissions a file created there would get (mkstemp's are the owner's only)."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_leftovers(folder: Path) -> list[str]:
    """Delete the temporary files a killed process left in ``folder`` (names of :func:`temporary`);
    returns their names."""
    names = sorted(p.name for p in Path(folder).iterdir() if LEFTOVER.match(p.name) and p.is_file())
    for name in names:
        (Path(folder) / name).unlink(missing_ok=True)
    return names


def os_error(exc: BaseException) -> OSError | None:
    """The operating system's refusal behind ``exc``: ``exc`` itself or an exception it was raised
    from or during (torch.save reports a failed write as a RuntimeError raised while handling it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_failed(path: Path, cause: OSError, existed: bool) -> SparsifyError:
    """The user error for a write to ``path`` that the operating system refused with ``cause``."""
    reason = cause.strerror or errno.errorcode.get(cause.errno or 0, str(cause))
    kept = f"the previous {path.name} is kept unchanged" if existed else f"no {path.name} was written"
    todo = "free space on that disk" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
    return SparsifyError(f"{path}: cannot write it ({reason}); {kept}. {todo.capitalize()} or write elsewhere, "
                         "then run again (a training run continues from its last checkpoint with --resume)")


def flush_to_disk(path: Path) -> None:
    """fsync the file at ``path`` (its bytes reach the disk before a rename makes it visible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(tmp: Path, path: Path) -> None:
    """Rename the complete, flushed file ``tmp`` over ``path``, and flush the folder's entry."""
    flush_to_disk(tmp)
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened (some platforms): the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # folders of some file systems refuse fsync; the rename has happened
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write through a temporary file in the same folder, flush it to the disk, then rename it over
    ``path``. SparsifyError naming ``path`` when the operating system refuses the write (``path``
    keeps its previous content)."""
    path = Path(path)
    existed = path.exists()
    tmp = None
    try:
        tmp = temporary(path)
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
        replace(tmp, path)
    except Exception as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = os_error(exc)
        if cause is None or isinstance(exc, SparsifyError):
            raise
        raise write_failed(path, cause, existed) from exc
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
