"""CsrLinear: the ``csr`` backend of a sparse linear layer, whose cost follows its active links.

The trainable parameter is ``values``: one weight per active link, in row-major order of the
mask. The three products of a training step run as sparse kernels:

- forward ``y = x Wᵀ``: a CSR matrix times the dense input;
- input gradient ``dx = dy W``: the transposed structure (kept beside the CSR one);
- weight gradient, only at active positions: ``dyᵀ x`` sampled at the links (and the bias gradient).

They run on the compiled kernels of :mod:`sparsify.csr_kernels` (two calls a step: forward, and
backward for all three gradients), or, when those cannot be built, on torch's (``torch.addmm`` with
a CSR operand, ``torch.sparse.sampled_addmm``).

So optimizer state exists only for active links. The products take their dense operands
transposed (features × batch, contiguous). For an input of [batch, features], the output is
returned as the transpose of such a tensor, so a stack of CsrLinear layers with elementwise ops
between them (an MLP) passes activations and gradients on without copies (``.reshape`` it, since
``.view`` cannot merge its batch and feature dimensions); where a dense linear layer reads it (an
MLP's dense output layer), it is returned contiguous instead (:attr:`CsrLinear.contiguous_output`).
For an input with more dimensions (a sequence model's [batch, tokens, features]), the output is
contiguous, as nn.Linear's is: the model's code splits it into heads and may need the features
innermost (DeepSeek-V2's rotary embedding views pairs of them as complex numbers); the copy costs
a few percent of a LLaMA-style block's training step (benchmarks/RESULTS.md). ``weight`` is a
dense view (zeros at inactive positions) and the state_dict holds ``weight``, ``bias`` and
``mask`` exactly as the masked backend does, so checkpoints move between backends;
:meth:`from_masked` / :meth:`to_masked` convert without loss. A topology change rebuilds the
structure and carries each kept link's value and optimizer state across (:meth:`set_topology`,
:meth:`remap_state`).
"""
from __future__ import annotations

import json
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from sparsify import csr_kernels
from sparsify.errors import SparsifyError
from sparsify.sparse_linear import SparseLinear
from sparsify.topology import bits

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# backend auto: a layer is csr at or below the density up to which csr measured faster than masked for
# its shape (csr_density_limit). SPARSIFY_AUTO_CSR_DENSITY fixes that limit instead (the tests use 0.05).
AUTO_DENSITY_ENV = "SPARSIFY_AUTO_CSR_DENSITY"
CALIBRATION_DENSITIES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
CALIBRATION_BATCH = 32  # rows of the calibration's input: the papers' batch
_limits: dict[str, float] = {}


def _structure(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """CSR of the mask, CSR of its transpose, and the order taking row-major values to the transpose's:
    four indices a link, int32 where they fit (16 bytes with its value, where a masked layer takes 5
    a position: below about 25% density csr also takes less memory)."""
    out_features, in_features = mask.shape
    rows, cols = bits.coordinates(mask)  # row-major
    crow = torch.zeros(out_features + 1, dtype=torch.int64, device=mask.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    order = torch.argsort(cols * out_features + rows)
    ccol = torch.zeros(in_features + 1, dtype=torch.int64, device=mask.device)
    ccol[1:] = torch.cumsum(torch.bincount(cols, minlength=in_features), 0)
    # int32 indices where they fit: the CPU kernels (MKL) take int32 and would convert on every call
    index = torch.int32 if mask.numel() < 2**31 else torch.int64
    return {"crow": crow.to(index), "col": cols.to(index), "ccol": ccol.to(index), "row_t": rows[order].to(index),
            "order": order.to(index)}


def csr_density_limit(out_features: int, in_features: int) -> float:
    """The largest density of :data:`CALIBRATION_DENSITIES` at which a csr layer of this shape measured
    faster than a masked one (0.0: not even the lowest), for backend auto.

    Measured once per shape, thread count and kernel build (forward and backward of one layer at
    batch :data:`CALIBRATION_BATCH`, masked against csr at rising densities until csr is no longer
    faster; about 0.1-1 s per shape), kept for the process and in ``calibration.json`` beside the
    compiled kernels' cache, so later runs on the machine read it. In a distributed run every rank
    takes rank 0's limit, so all ranks build the same layers."""
    limit = _local_density_limit(out_features, in_features)
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        shared = torch.tensor([limit], dtype=torch.float64, device=device)
        dist.broadcast(shared, src=0)
        limit = float(shared)
    return limit


def _local_density_limit(out_features: int, in_features: int) -> float:
    fixed = os.environ.get(AUTO_DENSITY_ENV)
    if fixed:
        try:
            return float(fixed)
        except ValueError:
            raise SparsifyError(f"{AUTO_DENSITY_ENV}={fixed!r} is not a number: set it to a density such as 0.05, "
                                "or unset it to let backend auto measure") from None
    compiled = csr_kernels.ops() is not None
    key = f"{out_features}x{in_features}|threads {torch.get_num_threads()}|{'compiled' if compiled else 'torch'}"
    if key not in _limits:
        path = csr_kernels.cache_dir().parent / "calibration.json"
        stored = _read_json(path)
        if key not in stored:
            stored = _read_json(path)  # the file may have changed while measuring; keep others' entries
            stored[key] = calibrate(out_features, in_features)
            _write_json(path, stored)
        _limits[key] = float(stored[key])
    return _limits[key]


def calibrate(out_features: int, in_features: int, clock=time.perf_counter) -> float:
    """Measure (see :func:`csr_density_limit`): the fastest of 3 runs of a training step's products."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(CALIBRATION_BATCH, in_features, generator=generator, requires_grad=True)
    grad = torch.randn(CALIBRATION_BATCH, out_features, generator=generator)

    def fastest(layer: nn.Module) -> float:
        best = float("inf")
        for _ in range(4):  # the first run warms up
            start = clock()
            layer(x).backward(grad)
            best = min(best, clock() - start)
        return best

    def mask(density: float) -> torch.Tensor:
        return torch.rand(out_features, in_features, generator=generator) < density

    linear = nn.Linear(in_features, out_features)
    masked = fastest(SparseLinear.from_linear(linear, mask=mask(0.5)))  # a masked step's cost is the dense one
    limit = 0.0
    for density in CALIBRATION_DENSITIES:
        if fastest(CsrLinear.from_masked(SparseLinear.from_linear(linear, mask=mask(density)))) >= masked:
            break
        limit = density
    return limit


def _read_json(path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json(path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(temporary, path)
    except OSError:  # a read-only home: the measurement still holds for this process
        pass


def _transposed(a: torch.Tensor) -> torch.Tensor:
    """``a.t()`` as a contiguous tensor, copying only when ``a`` is not already laid out that way (with
    the compiled kernels' tiled copy where they take ``a``: about twice the rate of torch's)."""
    t = a.t()
    if t.is_contiguous():
        return t
    kernels = csr_kernels.ops() if a.is_contiguous() and csr_kernels.supported(a) else None
    return kernels.transposed(a) if kernels is not None else t.contiguous()


class _CsrLinearFunction(torch.autograd.Function):
    """The products run on transposed operands (features × batch, contiguous), the layout the sparse
    kernels take without a copy. The output is returned as the transpose of such a tensor, so the
    next CsrLinear (after elementwise ops, which keep the layout) takes it without a copy either."""

    @staticmethod
    def forward(ctx, x, values, bias, layer, contiguous):
        s = layer._csr
        xt = _transposed(x)
        kernels = csr_kernels.ops() if csr_kernels.supported(values) and (bias is None or bias.dtype == values.dtype) \
            else None
        ctx.save_for_backward(xt, values)
        ctx.layer, ctx.has_bias, ctx.kernels = layer, bias is not None, kernels
        if kernels is not None and xt.dtype == values.dtype:  # one call: the product and the bias
            y = kernels.spmm(s["crow"], s["col"], values, None, xt, bias, layer.out_features)
            return _transposed(y.t()) if contiguous else y
        weight = torch.sparse_csr_tensor(s["crow"], s["col"], values, (layer.out_features, layer.in_features),
                                         check_invariants=False)
        # the output is allocated transposed rather than returned as a view of yt: a custom Function
        # returning a view refuses in-place changes to it (Falcon adds its bias in place)
        y = torch.empty_strided((xt.shape[1], layer.out_features), (1, xt.shape[1]), dtype=values.dtype,
                                device=values.device)
        if bias is None:  # beta=0: the output is not read, so it needs no zero fill
            torch.addmm(y.t(), weight, xt, beta=0.0, out=y.t())
        else:
            torch.addmm(bias.unsqueeze(1).expand(-1, xt.shape[1]), weight, xt, out=y.t())
        return _transposed(y.t()) if contiguous else y

    @staticmethod
    def backward(ctx, grad_y):
        xt, values = ctx.saved_tensors
        layer, s, kernels = ctx.layer, ctx.layer._csr, ctx.kernels
        grad_x = grad_values = grad_bias = None
        gyt = _transposed(grad_y)
        if kernels is not None and gyt.dtype == values.dtype == xt.dtype:
            if ctx.needs_input_grad[0]:
                grad_x = kernels.spmm(s["ccol"], s["row_t"], values, s["order"], gyt, None, layer.in_features)
            with_bias = ctx.has_bias and ctx.needs_input_grad[2]
            if ctx.needs_input_grad[1] or with_bias:
                grad_values, grad_bias = kernels.sampled(s["crow"], s["col"], gyt, xt, with_bias)
                grad_values = grad_values if ctx.needs_input_grad[1] else None
                grad_bias = grad_bias if with_bias else None
        else:
            if ctx.needs_input_grad[0]:
                transposed = torch.sparse_csr_tensor(s["ccol"], s["row_t"], values.index_select(0, s["order"]),
                                                     (layer.in_features, layer.out_features), check_invariants=False)
                # into a fresh tensor with beta=0 (not read): torch.sparse.mm would zero-fill its
                # result and copy it once more, about a quarter of this product's time at batch 32
                grad_xt = gyt.new_empty(layer.in_features, gyt.shape[1])
                grad_x = torch.addmm(grad_xt, transposed, gyt, beta=0.0, out=grad_xt).t()
            if ctx.needs_input_grad[1]:
                pattern = torch.sparse_csr_tensor(s["crow"], s["col"], torch.zeros_like(values),
                                                  (layer.out_features, layer.in_features), check_invariants=False)
                # beta=0: the pattern's (zero) values are not read; a third faster than the default beta=1
                grad_values = torch.sparse.sampled_addmm(pattern, gyt, xt.t(), beta=0.0).values()
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = gyt.sum(1)
        if layer.capture_dense_grad:  # a gradient-based topology update is due: the dense gradient, once
            dense = gyt @ xt.t()
            layer.dense_grad = dense if layer.dense_grad is None else layer.dense_grad + dense
        return grad_x, grad_values, grad_bias, None, None


class CsrLinear(nn.Module):
    """A sparse linear layer stored as CSR: ``values`` of the active links, ``mask``, ``bias``.

    >>> from sparsify.sparse_linear import SparseLinear
    >>> layer = CsrLinear.from_masked(SparseLinear.from_linear(nn.Linear(4, 3), mask=torch.eye(3, 4, dtype=torch.bool)))
    >>> layer.values.shape, layer.weight.shape
    (torch.Size([3]), torch.Size([3, 4]))
    """

    backend = "csr"
    # True: a dense linear layer reads this layer's output (the rewrite sets it from the plan), so a 2-d
    # output is returned contiguous: torch's linear reads the transposed layout several times slower
    # (10x for 10 outputs at batch 256), more than the copy costs
    contiguous_output = False

    def __init__(self, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = mask.shape
        self.register_buffer("mask", mask.to(torch.bool).clone())
        self.values = nn.Parameter(weight.detach()[self.mask].clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._csr = _structure(self.mask)
        self.capture_dense_grad = False
        self.dense_grad: torch.Tensor | None = None

    @classmethod
    def from_masked(cls, layer: SparseLinear) -> "CsrLinear":
        """The same layer (weights, bias, mask) with CSR storage; gradients and optimizer state are not carried."""
        new = cls(layer.mask, layer.weight.detach() * layer.mask, None if layer.bias is None else layer.bias)
        new.contiguous_output = layer.contiguous_output
        return new

    def to_masked(self) -> SparseLinear:
        """The same layer with the masked backend."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        layer = SparseLinear.from_linear(linear, mask=self.mask.clone())
        layer.contiguous_output = self.contiguous_output
        return layer

    def to_linear(self) -> nn.Linear:
        return self.to_masked().to_linear()

    # -- the views and the protocol the evolution uses (shared with SparseLinear) ------------------

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (zeros at inactive positions), differentiable through ``values``."""
        dense = self.values.new_zeros(self.out_features, self.in_features)
        return dense.index_put((self._csr_rows(), self._csr["col"]), self.values)

    def _csr_rows(self) -> torch.Tensor:
        """Each link's row (int64), from the row offsets: not stored, as only updates and exports read it."""
        crow = self._csr["crow"].long()
        return torch.repeat_interleave(torch.arange(self.out_features, device=crow.device), crow.diff(),
                                       output_size=self.values.shape[0])

    @property
    def trainable(self) -> nn.Parameter:
        """The parameter the optimizer updates (one value per active link)."""
        return self.values

    def dense_weight_grad(self) -> torch.Tensor | None:
        """The gradient of the last backward as a dense ``[out, in]`` tensor (zeros at inactive positions)."""
        if self.values.grad is None:
            return None
        dense = self.values.grad.new_zeros(self.out_features, self.in_features)
        return dense.index_put((self._csr_rows(), self._csr["col"]), self.values.grad)

    @torch.no_grad()
    @torch.no_grad()
    def apply_mask(self) -> None:
        """Adopt changes made to ``mask`` in place (``layer.mask[...] = False``): links taken out of it
        lose their values, links put into it start at 0. Inactive positions have no storage, so with
        an unchanged mask there is nothing to do."""
        links = self._csr_rows() * self.in_features + self._csr["col"].long()
        if links.numel() == bits.count(self.mask) and bool(self.mask.reshape(-1)[links].all()):
            return
        self.set_topology(self.mask.clone(), torch.zeros_like(self.mask))

    @torch.no_grad()
    def rescale_to_fan_in(self) -> None:
        degree = self.mask.sum(1).clamp_min(1)
        self.values.mul_((self.in_features / degree).sqrt().to(self.values.dtype)[self._csr_rows()])

    @torch.no_grad()
    def set_topology(self, mask: torch.Tensor, regrown: torch.Tensor) -> torch.Tensor:
        """Adopt ``mask``: kept links keep their value, regrown ones start at 0. Returns, for each new
        link, the index of its old value (-1 for a new link), for :meth:`remap_state`."""
        mask = mask.to(self.mask.device, torch.bool)
        old = self._csr_rows() * self.in_features + self._csr["col"].long()  # row-major, ascending
        new = bits.flat_indices(mask).to(mask.device)
        source = torch.full_like(new, -1)
        if old.numel():
            at = torch.searchsorted(old, new).clamp_max_(old.numel() - 1)
            source = torch.where(old[at] == new, at, source)
        source[regrown.to(mask.device).reshape(-1)[new]] = -1
        grad = None if self.values.grad is None else self._gather(self.values.grad, source)
        if source.shape[0] == self.values.shape[0]:
            self.values.data = self._gather(self.values.data, source)
            self.values.grad = grad
        else:  # a new number of links: resize the Parameter in place (optimizers and hooks keep the object)
            self._resize_values(self._gather(self.values.detach(), source), grad)
        self.mask.copy_(mask)
        self._csr = _structure(self.mask)
        return source

    def _resize_values(self, values: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Give ``values`` a new length. Assigning .data would leave the parameter's cached gradient
        accumulator, which an earlier graph may still hold, at the old length; swapping in a new
        tensor does not, but needs the parameter held only by its module and optimizers."""
        fresh = nn.Parameter(values, requires_grad=self.values.requires_grad)
        fresh.grad = grad
        try:
            torch.utils.swap_tensors(self.values, fresh)
        except RuntimeError as exc:
            raise SparsifyError(
                f"a csr layer ({self.out_features}x{self.in_features}) must change its number of links "
                f"({self.values.shape[0]} -> {values.shape[0]}, a density schedule), but its parameter is held "
                "elsewhere (DistributedDataParallel registers it once): use backend masked for this layer") from exc

    @staticmethod
    def _gather(old: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        new = old.new_zeros(source.shape[0])
        kept = source >= 0
        new[kept] = old[source[kept]]
        return new

    def remap_state(self, value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """An optimizer state tensor of the old links, moved to the new ones (zero for new links)."""
        return self._gather(value, source)

    # -- state_dict: the same keys as the masked backend ----------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "mask"] = self.mask

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key in ("weight", "mask") + (("bias",) if self.bias is not None else ()):
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
        if any(k.startswith(prefix) for k in missing_keys):
            return
        weight, mask = state_dict[prefix + "weight"], state_dict[prefix + "mask"].to(torch.bool)
        if tuple(weight.shape) != (self.out_features, self.in_features) or weight.shape != mask.shape:
            error_msgs.append(f"{prefix}weight: shape {tuple(weight.shape)} and mask {tuple(mask.shape)} do not fit "
                              f"a {self.out_features}x{self.in_features} layer")
            return
        with torch.no_grad():
            self.mask.copy_(mask)
            self._csr = _structure(self.mask)
            self.values.data = weight.to(self.values.device, self.values.dtype)[self.mask].clone()
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._csr = _structure(self.mask)  # on the mask's new device
        return result

    @property
    def active_links(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.active_links / self.mask.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:  # the compiled kernels read only the columns the links name
            raise RuntimeError(f"CsrLinear: the input has {shape[-1]} features in its last dimension, the layer "
                               f"takes {self.in_features}")
        # 2-d: the transposed layout, which the next CsrLinear of an MLP takes without a copy
        contiguous = x.dim() != 2 or self.contiguous_output
        y = _CsrLinearFunction.apply(x.reshape(-1, shape[-1]), self.values, self.bias, self, contiguous)
        return y if x.dim() == 2 else y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, backend=csr")
