"""SparseLinear: a linear layer with a fixed number of active links, swapped in for nn.Linear."""
from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn import functional as F

from sparsify.topology import bits

DTENSOR_MODULE = "torch.distributed.tensor"  # not imported here: `import sparsify` does not need its start-up time


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a DTensor, as FSDP2's ``fully_shard`` makes parameters, gradients and moments
    (none exists before something, such as fully_shard, has imported torch.distributed.tensor)."""
    module = sys.modules.get(DTENSOR_MODULE)
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (a parameter, gradient or moment sharded by FSDP2) is gathered from
    every rank, a collective that every rank must call in the same order; any other tensor is itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` ([out, in], the same on every rank) laid out as ``like``: for a DTensor each rank keeps
    its own shard, cut locally without communication; otherwise ``tensor`` itself."""
    if not is_sharded(like):
        return tensor
    distribute = sys.modules[DTENSOR_MODULE].distribute_tensor
    return distribute(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _check_backend(backend: str) -> None:
    if backend != "masked":
        raise ValueError(f"SparseLinear stores backend 'masked'; for {backend!r} use CsrLinear.from_masked(layer)")


class _MaskedLinearFunction(torch.autograd.Function):
    """``F.linear`` with the inactive weights (kept at zero) and their gradient masked in the backward:
    one pass over the weight per step instead of a masked copy in the forward and another backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight
        if ctx.needs_input_grad[1] or layer.capture_dense_grad:
            dense = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            if layer.capture_dense_grad:  # a gradient-based topology update is due
                layer._keep_dense_grad(dense)
            if ctx.needs_input_grad[1]:
                grad_w = dense.mul_(layer.float_mask())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


class SparseLinear(nn.Module):
    """``y = x @ (weight * mask).T + bias`` with a boolean ``mask`` of active links ``[out, in]``.

    Inactive weights are kept at zero and receive zero gradient: the backward masks the weight
    gradient, and the mask is applied to the weight again whenever the mask changes (the forward
    checks). Write into ``weight`` directly only at active positions, or call :meth:`apply_mask`.
    ``weight``, ``bias`` and ``mask`` are all in the state_dict, under the same names as
    nn.Linear's plus ``mask``.

    While ``capture_dense_grad`` is set (the evolution sets it only for a step that ends in a
    gradient-based topology update), the forward also keeps the *dense* gradient of the masked
    weight, inactive positions included, in ``dense_grad``, summed over the backward passes.

    >>> layer = SparseLinear.from_linear(nn.Linear(4, 3), mask=torch.eye(3, 4, dtype=torch.bool))
    >>> layer.active_links, layer.density
    (3, 0.25)
    """

    # set by the rewrite where a dense linear layer reads this layer's output; kept when the layer moves
    # to csr storage, whose output is then contiguous (see CsrLinear.forward); no effect here
    contiguous_output = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 mask: torch.Tensor | None = None, backend: str = "masked", device=None, dtype=None):
        super().__init__()
        _check_backend(backend)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        if mask is None:
            mask = torch.ones(out_features, in_features, dtype=torch.bool, device=device)
        self.register_buffer("mask", self._check_mask(mask))
        self._no_capture()
        nn.Linear.reset_parameters(self)  # same init as nn.Linear (weight then bias)
        self.apply_mask()

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if tuple(mask.shape) != (self.out_features, self.in_features):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected "
                             f"[out, in] = {(self.out_features, self.in_features)}")
        return mask.to(device=self.weight.device, dtype=torch.bool)  # the forward masks the weight with it

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor | None = None, backend: str = "masked") -> "SparseLinear":
        """Wrap ``linear``'s own weight and bias Parameters (no copy), zeroing the inactive weights."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        _check_backend(backend)
        layer.in_features, layer.out_features, layer.backend = linear.in_features, linear.out_features, backend
        layer.weight = linear.weight
        layer.bias = linear.bias
        if mask is None:
            mask = torch.ones_like(linear.weight, dtype=torch.bool)
        layer.register_buffer("mask", layer._check_mask(mask))
        layer._no_capture()
        layer.apply_mask()
        return layer

    def _no_capture(self) -> None:
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None
        self._float_mask: torch.Tensor | None = None
        self._float_version = self._masked_version = -1

    def float_mask(self) -> torch.Tensor:
        """The mask in the weight's dtype and device (cached until the mask changes)."""
        m = self._float_mask
        if (m is None or self._float_version != self.mask._version or m.device != self.weight.device
                or m.dtype != self.weight.dtype):
            m = self._float_mask = self.mask.to(device=self.weight.device, dtype=self.weight.dtype)
            self._float_version = self.mask._version
        return m

    def _keep_dense_grad(self, grad: torch.Tensor) -> None:
        grad = grad.detach()
        self.dense_grad = grad.clone() if self.dense_grad is None else self.dense_grad + grad

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the same outputs (inactive weights are zero)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.mask)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the weights of inactive links (after an optimizer step or a mask change); sharded by
        FSDP2, each rank zeroes its own shard. Unsharded, filled through the bool mask rather than
        multiplied by the cached float one, which would hold four bytes a weight from the rewrite on."""
        if is_sharded(self.weight):
            self.weight.mul_(shard_like(self.float_mask(), self.weight))
        else:
            self.weight.masked_fill_(~self.mask, 0)
        self._masked_version = self.mask._version

    @torch.no_grad()
    def rescale_to_fan_in(self) -> None:
        """Scale row i by sqrt(in_features / active inputs of i): the dense layer's activation scale."""
        degree = self.mask.sum(1, keepdim=True).clamp_min(1)  # [out, 1]
        self.weight.mul_((self.in_features / degree).sqrt().to(self.weight.dtype))

    # -- the protocol the evolution uses (shared with CsrLinear) --------------------------------------

    @property
    def trainable(self) -> nn.Parameter:
        """The parameter the optimizer updates."""
        return self.weight

    def dense_weight_grad(self) -> torch.Tensor | None:
        return self.weight.grad

    @torch.no_grad()
    def set_topology(self, mask: torch.Tensor, regrown: torch.Tensor) -> torch.Tensor:
        """Adopt ``mask``: weights and gradients of inactive positions become 0, regrown links start at 0.
        Returns the links that keep their state (``mask`` less ``regrown``), for :meth:`remap_state`."""
        mask = mask.to(self.mask.device, torch.bool)
        kept = mask & ~regrown.to(mask.device)
        self.mask.copy_(mask)
        self.weight.mul_(shard_like(kept, self.weight))  # sharded by FSDP2: each rank its own rows
        if self.weight.grad is not None:
            self.weight.grad.mul_(shard_like(kept, self.weight.grad))
        self._masked_version = self.mask._version  # the weight is masked: no forward needs to again
        return kept

    def remap_state(self, value: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """An optimizer state tensor after a topology change: zero at every inactive position and at
        every regrown link, also one removed and regrown in the same update (it restarts). A moment
        sharded by FSDP2 is zeroed on each rank's shard."""
        return value.mul_(shard_like(kept, value))

    @property
    def active_links(self) -> int:
        return bits.count(self.mask)

    @property
    def density(self) -> float:
        return self.active_links / self.mask.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._masked_version != self.mask._version:  # the mask changed since the weight was masked
            self.apply_mask()
        if not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _MaskedLinearFunction.apply(x, self.weight, self.bias, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, density={self.density:.4f}, backend={self.backend}")
