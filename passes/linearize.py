"""Linearize pass: linear layers written another way become plain ``nn.Linear``, in place.

Two kinds, each swapped before the model is captured so every later pass sees an ordinary linear
call (``aten.linear``) and site:

- GPT-2 and its relatives (Hugging Face ``transformers`` ``Conv1D``) compute ``x @ W + b`` with
  ``W`` of shape ``[in, out]``: the swap holds ``Wᵀ`` in new Parameters. The state_dict keeps the
  key ``weight``, now ``[out, in]`` like every nn.Linear. :func:`transposed_back` undoes the swap
  on a copy, for writing a Hugging Face checkpoint its own class reloads.
- Subclasses of nn.Linear with their own forward (Falcon's ``FalconLinear`` computes
  ``x @ W.T + b`` by hand, which the graph shows as a matmul, not a linear call): the swap shares
  their Parameters, and is made only when their output on a random input is the linear product's.
  Any other subclass is left alone.

The outputs stay the same up to float rounding.
"""
from __future__ import annotations

import torch
from torch import fx, nn

TRANSPOSED = "transformers Conv1D (weight stored [in, out]; the nn.Linear holds it transposed)"
OWN_FORWARD = "{}, an nn.Linear subclass computing the linear product in its own forward (same Parameters)"


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


def _computes_linear(module: nn.Module) -> bool:
    """Whether an nn.Linear subclass with its own forward returns F.linear's output (checked on a
    random input, in eval mode, without gradients)."""
    weight = module.weight
    x = torch.randn(3, module.in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            out = module(x)
            expected = nn.functional.linear(x, weight, module.bias)
    except Exception:  # noqa: BLE001 - a forward we cannot run this way is not a plain linear product
        return False
    finally:
        module.train(was_training)
    return (isinstance(out, torch.Tensor) and out.shape == expected.shape and out.dtype == expected.dtype
            and torch.allclose(out, expected, rtol=1e-4, atol=1e-5))


def _own_forward(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward


def linearize(model: nn.Module) -> dict[str, str]:
    """Swap every linear layer of ``model`` written another way for an equivalent nn.Linear;
    returns name -> what it was. A GraphModule is left as given: its graph may read those layers'
    weights directly."""
    if isinstance(model, fx.GraphModule):
        return {}
    swapped = {}
    for name, module in list(model.named_modules()):
        if _own_forward(module) and _computes_linear(module):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
            linear.weight, linear.bias = module.weight, module.bias  # the same Parameters
            _swap(model, module, linear)
            swapped[name] = OWN_FORWARD.format(type(module).__name__)
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
    return {**swapped, **{name: TRANSPOSED for name in found}}


def transposed_back(model: nn.Module, linearized: dict[str, str]) -> None:
    """Turn the nn.Linear modules of ``model`` that :func:`linearize` made from transformers Conv1D
    back into Conv1D (in place; their sizes may have shrunk)."""
    names = sorted(n for n, was in linearized.items() if was == TRANSPOSED)
    if not names:
        return
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
