"""The shape every graph pass has: a name, a function from its inputs to its result, and the one
error type its user-facing failures raise.

A pass is run through :meth:`GraphPass.__call__`: a user error (the pass's ``error``, or any other
:class:`~sparsify.errors.SparsifyError` from the user's own code) passes through unchanged, since it
already says what to do; anything else is an internal error, raised again as :class:`PassFailed`
naming the pass and the one that ran before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sparsify.errors import SparsifyError


class PassFailed(RuntimeError):
    """An internal error inside a pass (not the user's input); says which pass, and after which."""

    def __init__(self, message: str, pass_name: str = "", previous: str | None = None):
        super().__init__(message)
        self.pass_name, self.previous = pass_name, previous


@dataclass(frozen=True)
class GraphPass:
    """A named pass: ``run(*inputs) -> result``; ``error`` is the SparsifyError its bad inputs raise.

    >>> double = GraphPass("double", lambda x: 2 * x, SparsifyError)
    >>> double(21)
    42
    """

    name: str
    run: Callable[..., Any]
    error: type[SparsifyError]

    def __call__(self, *inputs: Any, after: str | None = None) -> Any:
        try:
            return self.run(*inputs)
        except SparsifyError:
            raise
        except Exception as exc:
            since = f" (after {after})" if after else ""
            raise PassFailed(f"pass {self.name} failed{since}: {type(exc).__name__}: {exc}", self.name, after) from exc
