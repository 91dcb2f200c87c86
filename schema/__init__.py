"""The policy JSON Schema, installed as sparsify.schema (data only)."""
