"""Topology algorithms as pure functions of tensors and a torch.Generator, in registries by policy name."""
