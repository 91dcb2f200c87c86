"""Integrations with other training frameworks; each imports its framework only when imported itself
(``sparsify.integrations.hf`` needs ``transformers``, ``sparsify.integrations.lightning`` needs ``lightning``)."""
