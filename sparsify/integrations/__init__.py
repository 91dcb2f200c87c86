"""Integrations with other training frameworks; each imports its framework only when imported itself
(``sparsify.integrations.hf`` needs ``transformers``, ``sparsify.integrations.lightning`` needs ``lightning``)."""
import math


def optimizer_steps_per_epoch(batches: float, accumulation: int) -> int | None:
    """Optimizer steps in an epoch of ``batches`` batches with gradient accumulation over
    ``accumulation`` of them (a last partial group still steps); None when an epoch has no fixed
    length (an iterable dataset: no count, or an infinite one)."""
    if not math.isfinite(batches) or batches < 1:
        return None
    return max(math.ceil(batches / accumulation), 1)
