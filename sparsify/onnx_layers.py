"""Linear layers for export that keep only a sparse weight's non-zero entries.

- :class:`CompactLinear` stores values + flat positions and rebuilds the dense weight inside the
  graph; onnxruntime folds the rebuild once, at load time, so the file is small and the product
  is the dense one.
- :class:`GatherLinear` never rebuilds the weight: each output neuron gathers the inputs it is
  linked to, multiplies them by its weights and sums. The work follows the links, not the dense
  shape; per link it costs tens of dense multiply-adds, so it pays off in very sparse layers
  (GATHER_DENSITY), most at small batches, where a dense product is bound by reading its weights.

GatherLinear lays the links out as padded rows (ELLPACK): the neurons, sorted by their number of
links, are cut into a few bins, each padded only to its own longest row. Where the cuts go is
chosen by dynamic programming to minimise the gathered elements plus a fixed cost per bin (each
bin is a few more graph nodes). The product takes one of two forms, chosen in the graph by the
number of input rows (an onnx If):

- one row: each bin gathers its inputs from the row with ``torch.gather`` (onnx GatherElements,
  which onnxruntime runs several times faster per element than Gather), multiplies and sums;
- several rows: the input is transposed so that each link gathers a whole column of the batch
  with ``index_select`` (onnx Gather copying contiguous blocks), and each neuron multiplies its
  gathered columns by its weights in one batched matmul. Per row, this is several times faster
  than gathering element by element.
"""
from __future__ import annotations

import torch
from torch import nn

COMPACT_DENSITY = 0.5  # above it, values + indices take more room than the dense weight
GATHER_DENSITY = 0.02  # above it, the gathered product loses to the dense one at batch 32 (benchmarks/gather_density.py)
BIN_COST = 1024  # a bin's fixed cost, in gathered elements: onnxruntime's overhead for its 4-5 nodes
MAX_CUTS = 256  # candidate cut points the search considers (quadratic in them)


def _int32_positions(linear: nn.Linear) -> None:
    if linear.in_features * linear.out_features >= 2**31:
        raise ValueError(f"a {linear.out_features}x{linear.in_features} layer has too many positions "
                         "for int32 indices")


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class CompactLinear(nn.Module):
    """A linear layer stored as its non-zero weights and their flat positions (int32), rebuilt
    into the dense weight inside the graph; onnxruntime folds the rebuild once, at load time."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        _int32_positions(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        flat = linear.weight.detach().flatten()
        positions = torch.nonzero(flat).flatten()
        self.register_buffer("values", flat[positions].clone())
        self.register_buffer("indices", positions.to(torch.int32))
        self.bias = _frozen_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        weight = weight.scatter(0, self.indices.long(), self.values).view(self.out_features, self.in_features)
        return nn.functional.linear(x, weight, self.bias)


def bins(counts: torch.Tensor, bin_cost: int = BIN_COST) -> list[int]:
    """Cut points over ``counts`` sorted ascending: ends of contiguous bins minimising
    sum(len(bin) * max(bin)) + bin_cost * number of bins. Cuts fall only where the count changes
    (optimal; with more than MAX_CUTS such places, at MAX_CUTS of them spread evenly)."""
    ordered = counts.sort().values.tolist()
    ends = [i + 1 for i in range(len(ordered)) if i + 1 == len(ordered) or ordered[i + 1] != ordered[i]]
    if len(ends) > MAX_CUTS:
        ends = [ends[round(k * (len(ends) - 1) / (MAX_CUTS - 1))] for k in range(MAX_CUTS)]
    starts = [0] + ends
    best, previous = [0.0], [0]
    for j in range(1, len(starts)):
        width = max(ordered[starts[j] - 1], 1)  # a bin of link-less rows still gathers one (zero) element
        cost, i = min((best[i] + (starts[j] - starts[i]) * width + bin_cost, i) for i in range(j))
        best.append(cost)
        previous.append(i)
    cuts, j = [], len(starts) - 1
    while j > 0:
        cuts.append(starts[j])
        j = previous[j]
    return cuts[::-1]


class GatherLinear(nn.Module):
    """y = x Wᵀ + b computed from W's non-zero entries only (gather, multiply, sum per bin of
    neurons), with the same outputs as the dense product up to float rounding."""

    def __init__(self, linear: nn.Linear, bin_cost: int = BIN_COST):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        counts = weight.ne(0).sum(1)
        order = torch.sort(counts, stable=True).indices
        self.shapes: list[tuple[int, int]] = []  # (neurons, links per neuron) of each bin
        start = 0
        for end in bins(counts, bin_cost):
            rows = order[start:end]
            width = max(int(counts[rows].max()), 1)
            row, col = torch.nonzero(weight[rows], as_tuple=True)  # row-major: each row's links in order
            slot = torch.arange(len(row)) - torch.searchsorted(row, row)  # position within its row
            columns = torch.zeros(len(rows), width, dtype=torch.long)
            values = torch.zeros(len(rows), width, dtype=weight.dtype)
            columns[row, slot] = col
            values[row, slot] = weight[rows][row, col]
            self.register_buffer(f"columns{len(self.shapes)}", columns.flatten())
            self.register_buffer(f"values{len(self.shapes)}", values.unsqueeze(1))  # [rows, 1, width]
            self.shapes.append((len(rows), width))
            start = end
        self.reorder = not torch.equal(order, torch.arange(self.out_features))
        self.register_buffer("inverse", torch.argsort(order))
        self.bias = _frozen_bias(linear)

    def links(self) -> int:
        """Gathered elements per input row, padding included."""
        return sum(rows * width for rows, width in self.shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if torch.compiler.is_exporting():
            y = torch.cond(flat.shape[0] == 1, self._one_row, self._rows, (flat,))
        else:
            y = self._one_row(flat) if flat.shape[0] == 1 else self._rows(flat)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _one_row(self, flat: torch.Tensor) -> torch.Tensor:
        """The product of a single input row (flat is [1, in_features]). Both branches use every
        buffer in the shape it is stored in: the exporter would store a reshaped buffer a second
        time. The gathered inputs take the values' shape instead, and the sum runs over both of
        its last axes (one ReduceSum, no reshape: 23 nodes per layer of 4 bins, not 27)."""
        row = flat.reshape(-1)
        parts = []
        for b, (rows, width) in enumerate(self.shapes):
            gathered = torch.gather(row, 0, getattr(self, f"columns{b}")).view(rows, 1, width)
            parts.append((gathered * getattr(self, f"values{b}")).sum((1, 2)))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.reorder:
            y = torch.gather(y, 0, self.inverse)
        return y.view(1, -1).expand(flat.shape[0], -1).contiguous()  # [1, out]; as cond's shape and strides

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        """The product of any number of input rows, through the transposed input: each neuron's
        gathered columns [width, n] are multiplied by its weights [1, width] in one batched matmul."""
        columns = flat.t()
        n = flat.shape[0]
        parts = []
        for b, (rows, width) in enumerate(self.shapes):
            gathered = columns.index_select(0, getattr(self, f"columns{b}")).view(rows, width, n)
            parts.append(torch.matmul(getattr(self, f"values{b}"), gathered).view(rows, n))
        y = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.reorder:
            y = y.index_select(0, self.inverse)
        return y.t().contiguous()  # both branches of the cond return the same layout
