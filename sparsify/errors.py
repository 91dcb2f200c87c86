"""Errors a user can act on. The CLI prints them without a traceback and exits with 2."""


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
