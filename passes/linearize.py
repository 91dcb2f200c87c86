"""Linearize pass: linear layers written another way become plain ``nn.Linear``, in place.

Three kinds, each swapped before the model is captured so every later pass sees an ordinary linear
call (``aten.linear``) and site:

- GPT-2 and its relatives (Hugging Face ``transformers`` ``Conv1D``) compute ``x @ W + b`` with
  ``W`` of shape ``[in, out]``: the swap holds ``Wᵀ`` in new Parameters. The state_dict keeps the
  key ``weight``, now ``[out, in]`` like every nn.Linear. :func:`transposed_back` undoes the swap
  on a copy, for writing a Hugging Face checkpoint its own class reloads.
- Subclasses of nn.Linear with their own forward (Falcon's ``FalconLinear`` computes
  ``x @ W.T + b`` by hand, which the graph shows as a matmul, not a linear call): the swap shares
  their Parameters, and is made only when their output on a random input is the linear product's.
  Any other subclass is left alone.
- ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer`` and friends) keeps q, k and v in
  one packed parameter and, in eval mode, runs inside one fused kernel: no linear call to find.
  It becomes a :class:`SplitMultiheadAttention` with the same weights as four nn.Linear layers and
  the product through ``scaled_dot_product_attention``, which couple then reads like any attention.

The outputs stay the same up to float rounding.
"""
from __future__ import annotations

import copy
import math
from collections import Counter

import torch
from torch import fx, nn
from torch.nn import functional as F

from sparsify.errors import SparsifyError
from sparsify.passes.find_linears import overrides_forward
from sparsify.passes.graph_pass import GraphPass
from sparsify.passes.rewrite import replace_everywhere

TRANSPOSED = "transformers Conv1D (weight stored [in, out]) became nn.Linear holding the weight transposed"
OWN_FORWARD = "{} (an nn.Linear subclass computing the product in its own forward) became nn.Linear, same Parameters"
ATTENTION = "nn.MultiheadAttention became SplitMultiheadAttention: q, k, v and out as nn.Linear layers"


def _shared(linear: nn.Module) -> nn.Linear:
    """A plain nn.Linear holding ``linear``'s own weight and bias Parameters."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks as added to the scores: True (or a float) means masked out / added."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class SplitMultiheadAttention(nn.Module):
    """nn.MultiheadAttention computed from four nn.Linear layers (q_proj, k_proj, v_proj, out_proj)
    and ``scaled_dot_product_attention``: the same call, arguments, outputs and weights (the packed
    in_proj weight split in three). With separate projections, nn.TransformerEncoderLayer's fused
    fast path does not apply, which its checks read from ``_qkv_same_embed_dim`` and
    ``in_proj_weight``/``in_proj_bias``."""

    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().chunk(3)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = (None,) * 3 if mha.in_proj_bias is None else mha.in_proj_bias.detach().chunk(3)
        projections = []
        for weight, bias in zip(weights, biases):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                               dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
                if bias is not None:
                    linear.bias.copy_(bias)
            projections.append(linear)
        self.q_proj, self.k_proj, self.v_proj = projections
        self.out_proj = _shared(mha.out_proj)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], -1, self.head_dim).transpose(1, 2)  # [batch, heads, length, head_dim]

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        # is_causal is only a hint in nn.MultiheadAttention: attn_mask carries the causal mask
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _additive(attn_mask, q.dtype)
        if mask is not None and mask.dim() == 3:  # [batch * heads, target, source]
            mask = mask.view(batch, -1, target, source)
        padding = _additive(key_padding_mask, q.dtype)
        if padding is not None:
            padding = padding.view(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout > 0 else weights @ v
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target, -1))  # -1: the heads it has (export may drop some)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _splittable(module: nn.Module) -> bool:
    """An nn.MultiheadAttention without extra key/value biases or zero attention."""
    return (type(module) is nn.MultiheadAttention and module.bias_k is None and module.bias_v is None
            and not module.add_zero_attn)


def _is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def _from_conv1d(module: nn.Module) -> nn.Linear:
    """An nn.Linear holding a transformers Conv1D's weight transposed, and its bias (new Parameters)."""
    in_features, out_features = module.weight.shape
    bias = getattr(module, "bias", None)
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device=module.weight.device,
                       dtype=module.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(module.weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    return linear


def _cpu_twin(module: nn.Module) -> nn.Module:
    """A copy of a meta-device ``module`` on the CPU with random values, for checks that need values."""
    twin = copy.deepcopy(module).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*twin.parameters(), *twin.buffers()]:
            t.normal_(generator=generator) if t.is_floating_point() else t.zero_()
    return twin


def _computes_linear(module: nn.Module) -> bool:
    """Whether an nn.Linear subclass with its own forward returns F.linear's output (checked on a
    random input, in eval mode, without gradients; on a CPU twin with random weights for a module on
    the meta device)."""
    if module.weight.is_meta:
        module = _cpu_twin(module)
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


def _plain_form(module: nn.Module) -> tuple[nn.Module, str] | None:
    """The module to put in place of ``module`` and what it was, or None when it stays."""
    if _splittable(module):
        return SplitMultiheadAttention(module), ATTENTION
    if overrides_forward(module) and _computes_linear(module):
        return _shared(module), OWN_FORWARD.format(type(module).__name__)
    if _is_conv1d(module):
        return _from_conv1d(module), TRANSPOSED
    return None


def linearize(model: nn.Module) -> dict[str, str]:
    """Swap every linear layer of ``model`` written another way for an equivalent nn.Linear (and
    every nn.MultiheadAttention for a SplitMultiheadAttention); returns name -> what it was. A
    GraphModule is left as given: its graph may read those layers' weights directly."""
    if isinstance(model, fx.GraphModule):
        return {}
    swaps: dict[int, nn.Module] = {}
    linearized: dict[str, str] = {}
    for name, module in model.named_modules():
        plain = _plain_form(module)
        if plain is not None:
            swaps[id(module)], linearized[name] = plain
    replace_everywhere([model], swaps)
    for encoder in model.modules():  # its nested-tensor fast path reads the packed attention weights
        if isinstance(encoder, nn.TransformerEncoder) and any(
                isinstance(layer.self_attn, SplitMultiheadAttention) for layer in encoder.layers):
            encoder.use_nested_tensor = False
    return linearized


def summary_lines(linearized: dict[str, str]) -> list[str]:
    """One line per kind of layer :func:`linearize` swapped, with how many."""
    kinds = Counter(linearized.values())
    return [f"{count} module(s): {was}" for was, count in sorted(kinds.items())]


def transposed_back(model: nn.Module, linearized: dict[str, str]) -> None:
    """Turn the nn.Linear modules of ``model`` that :func:`linearize` made from transformers Conv1D
    back into Conv1D (in place; their sizes may have shrunk)."""
    names = sorted(n for n, was in linearized.items() if was == TRANSPOSED)
    if not names:
        return
    from transformers.pytorch_utils import Conv1D  # lazy: transformers is optional (only its models need it)

    swaps = {}
    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias.zero_()
        swaps[id(linear)] = conv
    replace_everywhere([model], swaps)


LINEARIZE = GraphPass("linearize", linearize, SparsifyError)
