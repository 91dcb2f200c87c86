"""Linearize pass: linear layers that store their weight transposed become ``nn.Linear``, in place.

GPT-2 and its relatives (Hugging Face ``transformers`` ``Conv1D``) compute ``x @ W + b`` with
``W`` of shape ``[in, out]``. That is a linear layer with the weight transposed, so it is swapped
for an ``nn.Linear`` holding ``Wᵀ`` before the model is captured; every later pass then sees an
ordinary linear site. The outputs stay the same up to float rounding (a product in the other
layout). The state_dict keeps the key ``weight``, now ``[out, in]`` like every nn.Linear.
:func:`transposed_back` undoes the swap on a copy, for writing a Hugging Face checkpoint its own
class reloads.
"""
from __future__ import annotations

import torch
from torch import nn

TRANSPOSED = "transformers Conv1D (weight stored [in, out])"


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def linearize(model: nn.Module) -> dict[str, str]:
    """Swap every transposed-weight linear of ``model`` for an equivalent nn.Linear (new
    Parameters holding the transposed weight); returns name -> what it was."""
    found = {name: m for name, m in model.named_modules() if _is_conv1d(m)}
    for module in found.values():
        in_features, out_features = module.weight.shape
        bias = getattr(module, "bias", None)
        linear = nn.Linear(in_features, out_features, bias=bias is not None,
                           device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        linear.weight.requires_grad_(module.weight.requires_grad)
        _swap(model, module, linear)
    return {name: TRANSPOSED for name in found}


def transposed_back(model: nn.Module, names: list[str]) -> None:
    """Turn the plain nn.Linear modules ``names`` of ``model`` back into transformers Conv1D (in
    place; their sizes may have shrunk)."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias.zero_()
        _swap(model, linear, conv)
