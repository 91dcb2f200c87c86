"""Couple pass: coupling groups of linear sites, read from the graph's dataflow (never from names).

The pass runs the captured graph once on the example inputs and, beside every real value, an
*index tensor* per linear site: an int32 tensor of the value's shape whose entries say which
output feature of the site each element carries (-1: none). Data-movement ops (view, reshape,
transpose, split, cat, slicing, expand, repeat, slice_scatter, and indexing with constant index
tensors) are executed on the index tensors themselves, so heads, fused projections, rotary
embeddings and grouped-query attention need no special cases; a copy into a view of a buffer
(``key[..., :d].copy_(k_nope)`` into ``new_empty``) writes into the buffer's index tensors through
the same views. The other ops are read by kind:

- contraction (matmul, scaled_dot_product_attention): the features of both operands along the
  contracted dimension are *dot*-coupled pairs (q row i with k row i);
- elementwise product of two sites' features, or of one site's features at different positions
  (a fused gate_up layer's ``act(gate) * up``): *mul*-coupled rows;
- a site's features reaching another site's input: a *chain* (v -> o, up -> down, fc1 -> fc2);
- the same site's features summed with themselves at other positions (q*cos + rotate_half(q)*sin),
  or the two parts of a complex number multiplied by a constant (``view_as_complex(q) * freqs_cis``):
  *paired rows* (RoPE's i and i + head_dim/2, or 2i and 2i + 1);
- residual adds, norms and reductions over features, model outputs, and ops the pass does not
  know: *boundaries*, never percolated.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from sparsify.errors import SparsifyError
from sparsify.passes.capture import Capture
from sparsify.passes.find_linears import Sites
from sparsify.passes.graph_pass import GraphPass

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Op vocabulary, by op name (aten overload name, function name, method name or module class)

STRUCTURAL = {
    "view", "reshape", "_unsafe_view", "transpose", "swapaxes", "swapdims", "permute", "t",
    "contiguous", "clone", "split", "split_with_sizes", "chunk", "unbind", "getitem", "slice",
    "select", "narrow", "unsqueeze", "squeeze", "expand", "expand_as", "broadcast_to", "repeat", "repeat_interleave",
    "cat", "concat", "concatenate", "stack", "flatten", "unflatten", "alias", "detach", "movedim",
    "flip", "roll", "lift_fresh_copy", "view_as", "reshape_as", "Flatten", "Unflatten",
    "slice_scatter", "select_scatter",  # the second operand's elements placed into a copy of the first
    "tensor_split",
}
# a tensor shaped from its input that holds none of its values (a buffer filled in place later)
FRESH = {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like", "ones_like", "full_like"}
COPIES = {"copy_"}  # dst.copy_(src): src's elements written into dst, and into what dst is a view of
VIEWS = {"slice", "select", "narrow", "view", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze",
         "getitem", "alias", "t", "unflatten", "movedim", "split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
ACTIVATIONS = {
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "tanh", "softplus", "elu", "selu",
    "leaky_relu", "mish", "hardswish", "hardsigmoid", "hardtanh", "relu6", "glu", "erf",
    "ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "Softplus", "ELU", "SELU", "LeakyReLU", "Mish",
    "Hardswish", "Hardsigmoid", "Hardtanh", "ReLU6",
}
UNARY = ACTIVATIONS | {
    "neg", "abs", "exp", "log", "sqrt", "rsqrt", "square", "sin", "cos", "reciprocal", "clamp",
    "clip", "to", "_to_copy", "type", "type_as", "float", "half", "double", "bfloat16",
    "dropout", "native_dropout", "Dropout", "Identity", "pow", "masked_fill", "fill_",
    "contiguous", "feature_dropout", "alpha_dropout",
}
ADDITIVE = {"add", "add_", "iadd", "sub", "sub_", "rsub", "where", "maximum", "minimum"}  # elementwise, combining operands
MULTIPLICATIVE = {"mul", "mul_", "imul", "div", "div_", "truediv", "true_divide", "floordiv"}
CONVOLUTIONS = {"conv1d", "Conv1d"}  # followed channel by channel when depthwise (groups = channels: Mamba's)
DEPTHWISE = "depthwise_conv"  # a trail step: each feature mixed over time with itself only
INDEXING = {"index", "index_select"}  # data movement by index tensors: structural when the indices are constants
CONTRACTIONS = {"matmul", "bmm", "baddbmm", "scaled_dot_product_attention"}  # baddbmm: input + b1 @ b2
SCORE_OPS = (UNARY | ADDITIVE | MULTIPLICATIVE | STRUCTURAL
             | {"softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax"})  # q·kᵀ stays attention scores
LINEARS = {"linear", "Linear", "addmm", "mm"}
NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "LayerNorm", "RMSNorm", "GroupNorm"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "norm", "linalg_vector_norm",
              "softmax", "_softmax", "log_softmax", "_log_softmax", "logsumexp", "cumsum", "argmax", "argmin"}
EMBEDDINGS = {"embedding", "Embedding", "EmbeddingBag"}
NO_VALUE = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "size", "dim", "numel", "getattr"}
# ops a complex value's features pass through unchanged (its index tensor: the real view's, [..., 2])
COMPLEX_SAME = {"view_as_complex", "view_as_real", "to", "_to_copy", "type", "type_as", "clone", "contiguous",
                "detach", "alias"}


def op_name(node: fx.Node, gm: fx.GraphModule) -> str:
    """A capture-independent name for the op of ``node`` ('view', 'add', 'Linear', ...)."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return node.target
    target = node.target
    name = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    return name.strip("_") if name in ("__getitem__", "__and__") else name


# ---------------------------------------------------------------------------------------------
# Result objects

def feature_text(site: str, features: np.ndarray, width: int) -> str:
    """'site' for all features, 'site[a:b]' for a contiguous range, 'site{n features}' otherwise."""
    features = np.unique(features)
    if len(features) == width:
        return site
    if len(features) and features[-1] - features[0] + 1 == len(features):
        return f"{site}[{features[0]}:{features[-1] + 1}]"
    return f"{site}{{{len(features)} of {width}}}"


@dataclass
class DotGroup:
    """Rows of two sites contracted together (q·k): head structure and RoPE pairing included."""

    q: str
    k: str
    pairs: np.ndarray  # (n, 2): q feature, k feature; one row per contracted element pair
    head_dim: int
    via: str
    rope: dict[str, np.ndarray] = field(default_factory=dict)  # site -> (n, 2) paired rows
    # the distinct (q rows, k rows) contracted in one slice of the product: one head and its kv head
    slices: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    kind: str = "dot"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.q, self.k)

    def heads(self) -> tuple[int, int, dict[int, list[int]]]:
        """(q heads, kv heads, kv head -> q heads sharing it), heads numbered in row order (also where
        other rows sit between them: Falcon's q, q, k, v per group) and read off the slices the
        product contracted, so a head may contract only part of its rows with this k (DeepSeek's
        q · [k_nope, a rotary part every head shares])."""
        q_sets = sorted({q for q, _ in self.slices}, key=min)
        k_sets = sorted({k for _, k in self.slices}, key=min)
        share: dict[int, set[int]] = {}
        for q, k in self.slices:
            share.setdefault(k_sets.index(k), set()).add(q_sets.index(q))
        return len(q_sets), len(k_sets), {k: sorted(v) for k, v in sorted(share.items())}

    def describe(self, widths: dict[str, int]) -> str:
        q_heads, kv_heads, share = self.heads()
        text = (f"dot    {feature_text(self.q, self.pairs[:, 0], widths[self.q])} . "
                f"{feature_text(self.k, self.pairs[:, 1], widths[self.k])}  via {self.via}: "
                f"head_dim {self.head_dim}, {q_heads} q heads, {kv_heads} kv heads")
        if q_heads != kv_heads:
            text += " (" + "; ".join(f"q {','.join(map(str, qs))} -> kv {k}" for k, qs in share.items()) + ")"
        for site in dict.fromkeys((self.q, self.k)):  # q first, then k: independent of names
            rows = np.concatenate([self.pairs[:, i] for i, s in enumerate((self.q, self.k)) if s == site])
            pairs = self.rope.get(site, np.zeros((0, 2), np.int64))
            pairs = pairs[np.isin(pairs, rows).all(1)]  # the pairs among the rows this product contracts
            if len(pairs):
                text += f"; {site} rows {describe_pairing(pairs, self.head_dim)}"
        return text


@dataclass
class MulGroup:
    """Rows of two sites multiplied elementwise (act(gate)·up)."""

    a: str
    b: str
    pairs: np.ndarray  # (n, 2)
    trails: tuple[tuple[str, ...], tuple[str, ...]]
    kind: str = "mul"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.a, self.b)

    def describe(self, widths: dict[str, int]) -> str:
        a = _wrap(feature_text(self.a, self.pairs[:, 0], widths[self.a]), self.trails[0])
        b = _wrap(feature_text(self.b, self.pairs[:, 1], widths[self.b]), self.trails[1])
        same = "row i with row i" if np.array_equal(self.pairs[:, 0] - self.pairs[0, 0],
                                                    self.pairs[:, 1] - self.pairs[0, 1]) else "permuted rows"
        return f"mul    {a} * {b}  ({len(self.pairs)} rows, {same})"


@dataclass
class ChainGroup:
    """Output features of ``src`` feed input columns of ``dst`` (mapping[j] = src feature or -1)."""

    src: str
    dst: str
    mapping: np.ndarray  # (dst.in_features,)
    trail: tuple[str, ...]
    kind: str = "chain"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.src, self.dst)

    def describe(self, widths: dict[str, int]) -> str:
        used = self.mapping[self.mapping >= 0]
        feats = np.unique(used)
        via = " -> ".join(self.trail) + " -> " if self.trail else ""
        if len(used) == len(feats) and np.all(np.diff(used) == 1):
            how = f"{len(feats)} features, in order"
        elif len(used) == len(feats):
            how = f"{len(feats)} features, permuted"
        else:
            counts = np.unique(np.bincount(used - feats.min())[feats - feats.min()])
            each = str(counts[0]) if len(counts) == 1 else "varying"
            how = f"{len(feats)} features feed {len(used)} columns, {each} each"
        cols = np.flatnonzero(self.mapping >= 0)
        dst = self.dst if len(cols) == len(self.mapping) else f"{self.dst}[in {cols[0]}:{cols[-1] + 1}]"
        return f"chain  {feature_text(self.src, used, widths[self.src])} -> {via}{dst}  ({how})"


def _wrap(text: str, trail: tuple[str, ...]) -> str:
    for op in trail:
        text = f"{op}({text})"
    return text


def describe_pairing(pairs: np.ndarray, head_dim: int) -> str:
    """RoPE's rotate-half pairing (d, d+hd/2), the interleaved one (2d, 2d+1), or a count."""
    lo, hi = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    if head_dim % 2 == 0 and np.all(hi - lo == head_dim // 2) and np.all(lo % head_dim < head_dim // 2):
        return f"paired (d, d+{head_dim // 2}) in each head: rotary, rotate-half"
    if np.all(hi - lo == 1) and np.all(lo % 2 == 0):
        return "paired (2d, 2d+1): rotary, interleaved"
    return f"paired: {len(np.unique(np.stack([lo, hi], 1), axis=0))} pairs"


@dataclass
class FeatureParameter:
    """A parameter (or buffer) applied elementwise to a site's features, one slice per feature (a
    per-channel decay, Mamba's A_log and D, a depthwise convolution's weight and bias): when the
    site loses a row, the parameter loses the slice. ``mapping[j]`` is the feature that slice j along
    ``dim`` meets (-1: none); ``dim`` is None when the parameter is not cut one slice per feature
    (one slice meets several features, as a norm's weight per head dimension meets every head)."""

    name: str
    shape: tuple[int, ...]
    dim: int | None
    mapping: np.ndarray | None = None

    def describe(self, site: str) -> str:
        if self.dim is None:
            return f"{site}: {self.name} {list(self.shape)}, shared by several features"
        used = int((self.mapping >= 0).sum())
        return f"{site}: {self.name} {list(self.shape)}, dim {self.dim} ({used} of {self.shape[self.dim]} slices)"


def feature_parameter(name: str, shape: tuple[int, ...], pairs: np.ndarray) -> FeatureParameter | None:
    """From the (flat element, feature) pairs a parameter met: the dimension along which it holds one
    slice per feature; None when every feature meets the same elements (nothing to cut)."""
    coords = np.stack(np.unravel_index(pairs[:, 0], shape), 1) if len(shape) else np.zeros((len(pairs), 0), np.int64)
    features = pairs[:, 1]
    dims = []
    for d, size in enumerate(shape):
        meets = np.unique(np.stack([features, coords[:, d]], 1), axis=0)
        if size > 1 and len(np.unique(meets[:, 0])) == len(meets) and len(np.unique(meets[:, 1])) > 1:
            dims.append(d)  # the slice along d is a function of the feature, and not always the same
    if not dims:
        return None
    meets = np.unique(np.stack([coords[:, dims[0]], features], 1), axis=0)
    if len(dims) > 1 or len(np.unique(meets[:, 0])) != len(meets):
        return FeatureParameter(name, shape, None)
    mapping = np.full(shape[dims[0]], -1, dtype=np.int64)
    mapping[meets[:, 0]] = meets[:, 1]
    return FeatureParameter(name, shape, dims[0], mapping)


@dataclass(frozen=True)
class Attention:
    """One attention (scaled_dot_product_attention, or softmax(q·kᵀ)·v written out) whose query, key
    and value each come from one site (the same site for all three when one layer projects them
    together, as GPT-2's c_attn does). The key may also hold features of ``shared`` sites that every
    query head reads alike (DeepSeek's multi-head latent attention: each head's key is its own
    k_nope beside one rotary part for all heads)."""

    q: str
    k: str
    v: str
    shared: tuple[str, ...] = ()


@dataclass
class Coupling:
    """Sites, coupling groups and boundaries of one model, with a stable text dump."""

    capture: str
    sites: Sites
    groups: list = field(default_factory=list)
    paired: dict[str, np.ndarray] = field(default_factory=dict)
    boundaries: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (site, 'in'|'out') -> reasons
    # site -> an 'out' boundary reason that is a reduction -> its sets of features reduced together,
    # one row each (-1 pads): a norm over each head's features alone reads every head apart
    reduced: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    parameters: dict[str, list[FeatureParameter]] = field(default_factory=dict)  # site -> applied to its features

    def groups_of(self, site: str) -> list:
        return [g for g in self.groups if site in g.sites]

    def group_lines(self) -> list[str]:
        widths = {n: s.out_features for n, s in self.sites.sites.items()}
        return sorted(g.describe(widths) for g in self.groups)

    def boundary_lines(self) -> list[str]:
        lines = []
        for (site, side), reasons in sorted(self.boundaries.items()):
            lines.append(f"{site}  {side}: {'; '.join(sorted(reasons))}")
        return lines

    def dump(self) -> str:
        """Stable, readable text: sites, excluded linears, groups and boundaries, sorted by name."""
        out = [f"capture: {self.capture}", f"linear sites ({len(self.sites.sites)}):"]
        for s in self.sites.sites.values():
            calls = f"  calls {s.calls}" if s.calls != 1 else ""
            out.append(f"  {s.name}  {s.in_features} -> {s.out_features}{'  bias' if s.bias else ''}{calls}")
        if self.sites.excluded:
            out.append(f"excluded ({len(self.sites.excluded)}):")
            out += [f"  {name}: {why}" for name, why in sorted(self.sites.excluded.items())]
        lines = self.group_lines()
        out.append(f"groups ({len(lines)}):")
        out += [f"  {line}" for line in lines]
        lines = self.boundary_lines()
        out.append(f"boundaries ({len(lines)}):")
        out += [f"  {line}" for line in lines]
        lines = sorted(p.describe(site) for site, params in self.parameters.items() for p in params)
        if lines:
            out.append(f"parameters per feature ({len(lines)}):")
            out += [f"  {line}" for line in lines]
        if self.notes:
            out.append("notes:")
            out += [f"  {n}" for n in sorted(set(self.notes))]
        return "\n".join(out) + "\n"

    def to_json(self) -> dict:
        widths = {n: s.out_features for n, s in self.sites.sites.items()}
        groups = []
        for g in self.groups:
            entry = {"kind": g.kind, "sites": list(g.sites), "text": g.describe(widths)}
            if isinstance(g, DotGroup):
                q_heads, kv_heads, share = g.heads()
                entry.update(head_dim=g.head_dim, q_heads=q_heads, kv_heads=kv_heads,
                             kv_shared_by={str(k): v for k, v in share.items()},
                             rope={s: p.tolist() for s, p in g.rope.items()})
            groups.append(entry)
        return {
            "capture": self.capture,
            "groups": sorted(groups, key=lambda e: e["text"]),
            "boundaries": [{"site": s, "side": side, "reasons": sorted(r)}
                           for (s, side), r in sorted(self.boundaries.items())],
            "notes": sorted(set(self.notes)),
        }


# ---------------------------------------------------------------------------------------------
# Propagation

Tags = dict  # site -> _Tag


@dataclass
class _Tag:
    idx: torch.Tensor  # int32, same shape as the value: feature of the site, or -1
    trail: tuple[str, ...] = ()


def _like(real: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` (broadcast to real's shape) laid out with real's strides, so later views behave alike."""
    values = values.to(torch.int32).broadcast_to(real.shape)
    if real.is_contiguous() or not _dense(real):
        return values.contiguous()
    out = torch.empty_strided(real.shape, real.stride(), dtype=torch.int32)
    return out.copy_(values)


def _dense(t: torch.Tensor) -> bool:
    try:
        return torch._prims_common.is_non_overlapping_and_dense(t)
    except Exception:
        return False


def _varies(idx: torch.Tensor, dim: int) -> bool:
    return idx.shape[dim] > 1 and bool((idx != idx.narrow(dim, 0, 1)).any())


def _reduced_together(idx: torch.Tensor, dims: list[int]) -> np.ndarray:
    """The sets of features a reduction over ``dims`` combines, one padded row each (-1: none)."""
    rest = [d for d in range(idx.dim()) if d not in dims]
    rows = idx.permute(rest + list(dims)).reshape(-1, int(np.prod([idx.shape[d] for d in dims], dtype=np.int64)))
    return unique_rows(rows.cpu().numpy())


def _labelled_dims(idx: torch.Tensor) -> list[int]:
    return [d for d in range(idx.dim()) if _varies(idx, d)]


def _slices(a: torch.Tensor, b: torch.Tensor) -> set[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The distinct (a's features, b's features) contracted together in one slice of a product
    (one head of one example), over the positions where both carry a feature."""
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    both = unique_rows(torch.cat([a, b], 1).numpy())
    n = a.shape[-1]
    found = set()
    for row in both:
        x, y = row[:n], row[n:]
        keep = (x >= 0) & (y >= 0)
        if keep.any():
            found.add((tuple(np.unique(x[keep]).tolist()), tuple(np.unique(y[keep]).tolist())))
    return found


def _unique_pairs(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    a, b = torch.broadcast_tensors(a, b)
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    pairs = pairs[(pairs >= 0).all(1)]
    return unique_rows(pairs.numpy().astype(np.int64)) if len(pairs) else np.zeros((0, 2), np.int64)


_ROW_HASH = np.random.default_rng(0).integers(1, 2**62, size=4096, dtype=np.int64) | 1


def unique_rows(rows: np.ndarray) -> np.ndarray:
    """``np.unique(rows, axis=0)`` for an integer array, by sorting one hash per row instead of the rows.

    An index tensor repeats the same features at every position of every example, so a few distinct
    rows hide among many: numpy's row sort costs time in their number and width, a hash sort only in
    their number. The result is checked row by row against the input and falls back to numpy's
    own sort on a hash collision, so it is exactly numpy's.

    >>> unique_rows(np.array([[2, 1], [0, 5], [2, 1]]))
    array([[0, 5],
           [2, 1]])
    """
    if rows.ndim != 2 or rows.shape[1] > len(_ROW_HASH) or len(rows) < 2:
        return np.unique(rows, axis=0)
    rows = rows.astype(np.int64, copy=False)
    with np.errstate(over="ignore"):
        keys = rows @ _ROW_HASH[:rows.shape[1]]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    distinct = rows[first]
    if not np.array_equal(distinct[inverse.reshape(-1)], rows):
        return np.unique(rows, axis=0)
    return distinct[np.lexsort(distinct.T[::-1])]  # rows in numpy's order: by the first column, then the next


class _Propagator(fx.Interpreter):
    """Runs the graph on real inputs and propagates site index tensors beside the values.

    A value computed from the inputs and every index tensor are dropped once the last node that reads
    them has run, so the memory held is one layer's working set at the example inputs' size, not every
    activation of the model (a copy into a view of a buffer reads the buffer and its views: they live until then).
    """

    def __init__(self, gm: fx.GraphModule, sites: Sites):
        super().__init__(gm, garbage_collect_values=False)
        self.sites = sites
        self.release = self._last_uses()  # node -> the nodes whose values and tags it reads last
        self.tags: dict[fx.Node, Any] = {}
        self.data: dict[fx.Node, bool] = {}  # whether the value depends on the model's inputs
        self.chains: dict[tuple[str, str], tuple[np.ndarray, tuple]] = {}
        self.dots: dict[tuple[str, str], tuple[list, int, str]] = {}
        self.muls: dict[tuple[str, str], tuple[list, tuple]] = {}
        self.paired: dict[str, list[np.ndarray]] = {}
        self.boundaries: dict[tuple[str, str], set[str]] = {}
        self.reduced: dict[str, dict[str, list[np.ndarray]]] = {}  # site -> reduction -> features reduced together
        self.notes: list[str] = []
        self.attentions: list[tuple[list[str], list[str], list[str]]] = []  # q, k, v sites of each call
        self.scores: dict[fx.Node, tuple[list[str], list[str]]] = {}  # attention scores: from q·kᵀ of these sites
        self.parameter_index: dict[fx.Node, tuple[str, tuple[int, ...], torch.Tensor] | None] = {}
        # site -> parameter -> (its shape, (n, 2) arrays of (its flat element, the site's feature) met elementwise)
        self.per_feature: dict[str, dict[str, tuple[tuple[int, ...], list[np.ndarray]]]] = {}

    # -- bookkeeping ---------------------------------------------------------------------------
    def _boundary(self, site: str, side: str, reason: str) -> None:
        self.boundaries.setdefault((site, side), set()).add(reason)

    def _scope(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path, kind = list(stack.values())[-1]
        kind = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        return f"{path} ({kind.rsplit('.', 1)[-1]})" if path else ""

    def _where(self, node: fx.Node) -> str:
        scope = self._scope(node)
        return f" in {scope}" if scope else ""

    def _all_tags(self, node: fx.Node) -> list[Tags]:
        found = []
        for a in node.all_input_nodes:
            _collect(self.tags.get(a), found)
        return found

    def _end(self, node: fx.Node, reason: str) -> None:
        for tags in self._all_tags(node):
            for site in tags:
                self._boundary(site, "out", reason)

    def _last_uses(self) -> dict[fx.Node, list[fx.Node]]:
        """For each node, the earlier nodes it is the last reader of. A copy into a chain of views
        (:meth:`_copy_into`) reads the views, the buffer at their root and the views' other inputs."""
        order = {n: i for i, n in enumerate(self.module.graph.nodes)}
        last: dict[fx.Node, fx.Node] = {}
        for node in self.module.graph.nodes:
            read = list(node.all_input_nodes)
            if node.op.startswith("call") and op_name(node, self.module) in COPIES and node.args \
                    and isinstance(node.args[0], fx.Node):
                dst = node.args[0]
                while self._is_view(dst):
                    read += dst.all_input_nodes
                    dst = dst.args[0]
                read.append(dst)
            for a in read:
                if a not in last or order[node] > order[last[a]]:
                    last[a] = node
        release: dict[fx.Node, list[fx.Node]] = {}
        for value, reader in last.items():
            release.setdefault(reader, []).append(value)
        return release

    # -- the interpreter hook ----------------------------------------------------------------
    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        # shaped like data, holding none of it: a fresh buffer, a size (and what is computed from sizes alone)
        fresh = node.op.startswith("call") and op_name(node, self.module) in FRESH | NO_VALUE
        self.data[node] = node.op == "placeholder" or (
            not fresh and any(self.data.get(a, False) for a in node.all_input_nodes))
        self._follow_scores(node)
        try:
            with _one_thread():
                self.tags[node] = self._propagate(node, value)
        except Exception as exc:  # an op we could not follow: stop its features here, safely
            name = op_name(node, self.module) if node.op.startswith("call") else node.op
            self.notes.append(f"could not follow features through {name} ({node.name}): {type(exc).__name__}: {exc}")
            self._end(node, f"opaque op {name}")
            self.tags[node] = None
        for done in self.release.get(node, ()):
            self.tags.pop(done, None)
            if self.data.get(done, False):  # values computed from parameters alone stay: _parameter_index reads them later
                self.env.pop(done, None)
        return value

    def _follow_scores(self, node: fx.Node) -> None:
        """Attention written out (softmax(q·kᵀ / √d) · v): the products of q's and k's features stay
        scores through scaling, masking, softmax, dropout and reshaping, until they weight v."""
        if not node.op.startswith("call") or node in self.scores:
            return
        source = next((a for a in node.all_input_nodes if a in self.scores), None)
        if source is not None and op_name(node, self.module) in SCORE_OPS:
            self.scores[node] = self.scores[source]

    def _propagate(self, node: fx.Node, value: Any) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return None
        if node.op == "output":
            self._end(node, "model output")
            return None
        if node.name in self.sites.node_to_site:
            return self._site_call(node, value)
        name = op_name(node, self.module) if node.op.startswith("call") else node.op
        if name in COPIES and self.tags.get(node.args[1]):
            return self._copy_into(node)
        if not self._all_tags(node):
            return None
        if name in NO_VALUE | FRESH or not _has_tensor(value):
            return None
        if _is_complex(value) or any(self.tags.get(a) and _is_complex(self.env.get(a)) for a in node.all_input_nodes):
            return self._complex(node, value, name)
        if node.name in self.sites.node_to_excluded:
            self._end(node, f"consumed by excluded linear {self.sites.node_to_excluded[node.name]}")
            return None
        if name == "getitem" and isinstance(self._real(node.args[0]), (tuple, list)):
            parent = self.tags.get(node.args[0])
            return parent[node.args[1]] if parent is not None else None
        if name in STRUCTURAL:
            return self._structural(node, value)
        if name in INDEXING and not any(self.data.get(a, False) for a in node.all_input_nodes[1:]):
            return self._structural(node, value)  # Falcon's qkv[:, :, :, [-2]]: constant indices
        if name in UNARY and name not in ADDITIVE | MULTIPLICATIVE:
            return self._elementwise(node, value, name, "unary")
        if name in ADDITIVE:
            return self._elementwise(node, value, name, "add")
        if name in MULTIPLICATIVE:
            return self._elementwise(node, value, name, "mul")
        if name in CONTRACTIONS:
            return self._contraction(node, value, name)
        if name in NORMS:
            return self._reduction(node, value, name, self._norm_dims(node, value))
        if name in REDUCTIONS:
            return self._reduction(node, value, name, self._reduce_dims(node))
        if name in CONVOLUTIONS and (follow := self._depthwise(node)) is not None:
            return follow(value)
        if name in LINEARS:
            self._end(node, f"consumed by {name}{self._where(node)} (not a linear site)")
            return None
        if name in EMBEDDINGS:
            return None
        self.notes.append(f"unknown op {name} ({node.name}) stops the features of: "
                          + ", ".join(sorted({s for t in self._all_tags(node) for s in t})))
        self._end(node, f"opaque op {name}")
        return None

    def _real(self, arg: Any) -> Any:
        return fx.node.map_aggregate(arg, lambda a: self.env[a] if isinstance(a, fx.Node) else a)

    # -- rules ---------------------------------------------------------------------------------
    def _site_call(self, node: fx.Node, value: torch.Tensor) -> Tags:
        site = self.sites.sites[self.sites.node_to_site[node.name]]
        x = node.args[0]
        tags = self.tags.get(x) or {}
        covered = torch.zeros(site.in_features, dtype=torch.bool)
        for src, tag in tags.items():
            if not _varies(tag.idx, -1) and tag.idx.shape[-1] > 1:
                continue
            mapping = tag.idx.reshape(-1, site.in_features)[0].numpy().astype(np.int64)
            covered |= torch.from_numpy(mapping >= 0)
            key = (src, site.name)
            if key in self.chains:
                old, _ = self.chains[key]
                mapping = np.where(old >= 0, old, mapping)
            self.chains[key] = (mapping, tag.trail)
        if not bool(covered.all()):
            producer = self._producer(x)
            part = "" if not covered.any() else " (some columns)"
            self._boundary(site.name, "in", f"{producer}{part}")
        out = torch.arange(site.out_features, dtype=torch.int32)
        return {site.name: _Tag(_like(value, out))}

    def _producer(self, node: fx.Node) -> str:
        """Where an input that carries no site's features comes from, for the boundary text."""
        seen = node
        while True:
            if seen.op == "placeholder":
                return "model input"
            name = op_name(seen, self.module) if seen.op.startswith("call") else seen.op
            if name in STRUCTURAL | {"to", "_to_copy", "type", "float", "dropout", "Dropout", "Identity"} \
                    and seen.all_input_nodes:
                seen = seen.all_input_nodes[0]
                continue
            scope = self._scope(seen)
            return f"from {scope}" if scope else f"from {name}"

    def _structural(self, node: fx.Node, value: Any) -> Any:
        in_tags = self._all_tags(node)
        sites = sorted({s for t in in_tags for s in t})
        indexing = op_name(node, self.module) in INDEXING
        results: dict[str, Any] = {}
        for site in sites:
            trail: tuple = ()

            def sub(a: Any) -> Any:
                nonlocal trail
                if not isinstance(a, fx.Node):
                    return a
                real = self.env[a]
                tag = self.tags.get(a)
                if isinstance(tag, dict) and site in tag:
                    trail = trail or tag[site].trail
                    return tag[site].idx
                if isinstance(tag, (list, tuple)):
                    return [t[site].idx if isinstance(t, dict) and site in t else _blank(r)
                            for t, r in zip(tag, real)]
                if indexing and real.dtype in (torch.int64, torch.int32, torch.bool) and not self.data.get(a, False):
                    return real  # the index tensor itself
                return _blank(real)

            args = fx.node.map_aggregate(node.args, sub)
            kwargs = fx.node.map_aggregate(node.kwargs, sub)
            try:
                out = self._call(node, args, kwargs)
            except RuntimeError:
                if op_name(node, self.module) not in ("view", "_unsafe_view"):
                    raise
                # the tags' strides can differ from the real tensor's (torch.export drops a
                # contiguous() that was a no-op for it); a reshape keeps the same element order
                out = torch.reshape(args[0], args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
            results[site] = (out, trail)
        return _regroup(value, results)

    def _copy_into(self, node: fx.Node) -> Tags:
        """``dst.copy_(src)`` where dst is a view of a buffer (DeepSeek's key, k_nope and the shared
        rotary part copied into the two halves of an empty tensor): the copy's features are written
        into the buffer's index tensors through the same chain of views, so every later reader of
        the buffer sees them."""
        dst, src = node.args[0], node.args[1]
        chain = []
        while self._is_view(dst) and (op_name(dst, self.module) != "getitem" or self._is_view(dst.args[0])
                                      or isinstance(self.env[dst.args[0]], torch.Tensor)):  # not an output of a tuple
            chain.append(dst)
            dst = dst.args[0]
        root, sources = dst, self.tags[src]
        if not isinstance(sources, dict) or not isinstance(self.tags.get(root) or {}, dict):
            raise TypeError("the copy's source or destination is not one tensor")
        root_tags = dict(self.tags.get(root) or {})
        for site in set(root_tags) | set(sources):
            trail = sources[site].trail if site in sources else ()
            tag = root_tags.setdefault(site, _Tag(_like(self.env[root], torch.tensor(-1)), trail))
            view = tag.idx
            for step in reversed(chain):
                args = fx.node.map_aggregate(step.args, lambda a: view if a is step.args[0] else self._real(a))
                view = self._call(step, args, self._real(step.kwargs))
                if isinstance(view, torch.Tensor) and isinstance(self.tags.get(step) or {}, dict):
                    self.tags[step] = {**(self.tags.get(step) or {}), site: _Tag(view, tag.trail)}
            view.copy_(sources[site].idx if site in sources else torch.tensor(-1, dtype=torch.int32))
        self.tags[root] = root_tags
        self.data[root] = self.data.get(root, False) or self.data.get(src, False)
        return {site: self.tags[chain[0]][site] for site in root_tags} if chain else root_tags

    def _is_view(self, node: fx.Node) -> bool:
        return node.op.startswith("call") and op_name(node, self.module) in VIEWS and isinstance(node.args[0], fx.Node)

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            return self.module.get_submodule(node.target)(*args, **kwargs)
        return node.target(*args, **kwargs)

    def _complex(self, node: fx.Node, value: Any, name: str) -> Tags | None:
        """Features through complex numbers (a rotary embedding à la Meta's LLaMA:
        ``view_as_real(view_as_complex(q.reshape(..., -1, 2)) * freqs_cis)``). A complex value's index
        tensor is its real view's ([..., 2]: the features of the real and imaginary parts), kept through
        the views between real and complex and through casts. A product with a tensor carrying no
        feature mixes each element's two parts: they become paired rows, as RoPE's are. Any other op
        on a complex value ends its features there."""
        tagged = [a for a in node.all_input_nodes if self.tags.get(a)]
        source = tagged[0] if len(tagged) == 1 else None
        was = _is_complex(self.env.get(source))  # whether its index tensor is a real view's
        if name in COMPLEX_SAME and source is node.args[0] and (was, _is_complex(value)) == {
                "view_as_complex": (False, True), "view_as_real": (True, False)}.get(name, (True, True)):
            return {site: _Tag(tag.idx if _is_complex(value) else _like(value, tag.idx), tag.trail)
                    for site, tag in self.tags[source].items()}
        if name in MULTIPLICATIVE and was and _is_complex(value):
            tags = self.tags[source]
            for site, tag in tags.items():
                parts = tag.idx.reshape(-1, 2)
                both = (parts >= 0).all(1) & (parts[:, 0] != parts[:, 1])
                if bool(both.any()):
                    self.paired.setdefault(site, []).append(_unique_pairs(parts[both, 0], parts[both, 1]))
            shape = torch.view_as_real(value).shape
            return {site: _Tag(tag.idx.broadcast_to(shape).contiguous(), tag.trail) for site, tag in tags.items()}
        self._end(node, f"opaque op {name} on complex numbers{self._where(node)}")
        return None

    def _elementwise(self, node: fx.Node, value: torch.Tensor, name: str, kind: str) -> Tags:
        operands = [a for a in _flat_nodes(node.args) + _flat_nodes(node.kwargs.values())
                    if isinstance(self.env.get(a), torch.Tensor)]
        if name == "type_as":
            operands = operands[:1]
        tagged = [(a, self.tags.get(a)) for a in operands if isinstance(self.tags.get(a), dict) and self.tags[a]]
        untagged = [a for a in operands if not (isinstance(self.tags.get(a), dict) and self.tags[a])]
        sites = sorted({s for _, t in tagged for s in t})
        step = (name,) if name in ACTIVATIONS else ()
        out: Tags = {}
        for site in sites:
            tags = [t[site] for _, t in tagged if site in t]
            idx, trail = tags[0].idx, max((t.trail for t in tags), key=len)
            for other in tags[1:]:
                a, b = torch.broadcast_tensors(idx, other.idx)
                differ = (a >= 0) & (b >= 0) & (a != b)
                if bool(differ.any()):
                    pairs = _unique_pairs(a[differ], b[differ])
                    if kind == "mul":  # one fused layer's rows multiplied: gate, up = gate_up(x).chunk(2, -1)
                        self._record_product(site, site, pairs, (tags[0].trail, other.trail))
                        trail, step = tags[0].trail, step + ("mul",)  # the features kept are the first factor's
                    else:  # rows combined additively (RoPE: q*cos + rotate_half(q)*sin)
                        self.paired.setdefault(site, []).append(pairs)
                idx = torch.where(a >= 0, a, b)
            out[site] = _Tag(_like(value, idx), _dedupe(trail + step))
        for a in untagged:  # a parameter scaling or shifting features one by one (a per-channel decay)
            self._per_feature(a, value, out)
        if kind == "add":
            self._additive(node, value, tagged, untagged, out)
        elif kind == "mul" and len(sites) > 1 and len(tagged) > 1:
            self._product(node, tagged, out)
        return out

    def _per_feature(self, node: fx.Node, value: torch.Tensor, out: Tags) -> None:
        """Record which elements of a parameter meet which features of each site in ``out``."""
        found = self._parameter_index(node)
        if found is None:
            return
        name, shape, element = found
        element = element.broadcast_to(value.shape)
        for site, tag in out.items():
            pairs = _unique_pairs(element, tag.idx)
            if len(pairs):
                self.per_feature.setdefault(site, {}).setdefault(name, (shape, []))[1].append(pairs)

    def _parameter_index(self, node: fx.Node) -> tuple[str, tuple[int, ...], torch.Tensor] | None:
        """(name, shape, index of its elements laid out as ``node``'s value) when ``node`` is a
        parameter or buffer of the model, or a value computed from one alone by elementwise and
        data-movement ops (Mamba's ``-exp(A_log)``, a decay viewed as (1, 1, C)); else None."""
        if node in self.parameter_index:
            return self.parameter_index[node]
        value = self.env.get(node)
        found = None
        if not isinstance(value, torch.Tensor) or self.data.get(node, False) or not value.is_floating_point():
            pass
        elif node.op == "get_attr" and value.numel() > 1:
            found = (str(node.target), tuple(value.shape), torch.arange(value.numel(), dtype=torch.int32).view(value.shape))
        elif node.op.startswith("call") and not self._all_tags(node):
            found = self._parameter_moved(node, value)
        self.parameter_index[node] = found
        return found

    def _parameter_moved(self, node: fx.Node, value: torch.Tensor) -> tuple[str, tuple[int, ...], torch.Tensor] | None:
        sources = [a for a in node.all_input_nodes if self._parameter_index(a) is not None]
        if len(sources) != 1:
            return None
        name = op_name(node, self.module)
        param, shape, element = self._parameter_index(sources[0])
        if name in STRUCTURAL and sources[0] is node.args[0]:
            def sub(a: Any) -> Any:
                if a is sources[0]:
                    return element
                return _blank(self.env[a]) if isinstance(a, fx.Node) else a
            moved = self._call(node, fx.node.map_aggregate(node.args, sub), fx.node.map_aggregate(node.kwargs, sub))
            return (param, shape, moved) if isinstance(moved, torch.Tensor) else None
        if name in UNARY | ADDITIVE | MULTIPLICATIVE:
            return param, shape, element.broadcast_to(value.shape)
        return None

    def _depthwise(self, node: fx.Node):
        """For a depthwise convolution over time (groups = channels, one filter each: Mamba's conv1d),
        the function giving its output's tags: each channel's feature goes on, and the filter and bias
        are applied one slice per feature. None for any other convolution."""
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        arg = lambda i: node.args[i] if len(node.args) > i else node.kwargs.get(names[i])  # noqa: E731
        x = self.env[node.args[0]]
        if node.op == "call_module":
            conv = self.module.get_submodule(node.target)
            weight = (f"{node.target}.weight", tuple(conv.weight.shape), torch.arange(conv.weight.numel(),
                                                                                   dtype=torch.int32).view(conv.weight.shape))
            bias = None if conv.bias is None else (f"{node.target}.bias", tuple(conv.bias.shape),
                                                   torch.arange(conv.bias.numel(), dtype=torch.int32))
            groups = conv.groups
        else:
            weight = self._parameter_index(arg(1)) if isinstance(arg(1), fx.Node) else None
            bias = self._parameter_index(arg(2)) if isinstance(arg(2), fx.Node) else None
            groups = arg(6) if arg(6) is not None else 1
        channels = x.shape[-2] if x.dim() >= 2 else 0
        if weight is None or groups != channels or weight[2].dim() != 3 or tuple(weight[2].shape[:2]) != (channels, 1):
            return None
        tags = self.tags.get(node.args[0]) or {}
        if any(_varies(t.idx, -1) for t in tags.values()):
            return None  # features that change along time: not one channel each

        def follow(value: torch.Tensor) -> Tags:
            out: Tags = {}
            for site, tag in tags.items():
                per_channel = tag.idx.narrow(-1, 0, 1)  # (..., C, 1)
                out[site] = _Tag(_like(value, per_channel), _dedupe(tag.trail + (DEPTHWISE,)))
                feature = per_channel.reshape(-1, channels)[0]  # the feature of each channel
                for name, shape, element in (p for p in (weight, bias) if p is not None):
                    pairs = _unique_pairs(element.reshape(channels, -1), feature[:, None])
                    if len(pairs):
                        self.per_feature.setdefault(site, {}).setdefault(name, (shape, []))[1].append(pairs)
            return out
        return follow

    def _additive(self, node: fx.Node, value: torch.Tensor, tagged: list, untagged: list, out: Tags) -> None:
        """A site's features summed with another site's or with data (a residual stream) end there."""
        sites = sorted(out)
        operand_sites = [set(t) for _, t in tagged]
        # two sites' outputs summed (attention and MLP of a parallel block) end there; operands sharing a
        # site (a recurrence adding k*v to its decayed state) carry the same features on
        if len(sites) > 1 and len(tagged) > 1 and not any(a & b for i, a in enumerate(operand_sites)
                                                          for b in operand_sites[i + 1:]):
            for site in sites:
                others = ", ".join(s for s in sites if s != site)
                self._boundary(site, "out", f"summed with {others}{self._where(node)}")
            out.clear()
            return
        for a in untagged:
            real = self.env[a]
            if not self.data.get(a, False) or (real.device.type != "meta" and not bool(real.any())):
                continue  # a constant, or zeros (a recurrence's first state times its decay): no residual
            for site, tag in list(out.items()):
                dims = _labelled_dims(tag.idx)
                offset = value.dim() - real.dim()
                if any(d - offset >= 0 and real.shape[d - offset] > 1 for d in dims):
                    self._boundary(site, "out", f"residual add{self._where(node)}")
                    del out[site]

    def _product(self, node: fx.Node, tagged: list, out: Tags) -> None:
        """Two different sites' features multiplied elementwise: their rows are coupled."""
        ta, tb = tagged[0][1], tagged[-1][1]
        for sa, tag_a in ta.items():
            for sb, tag_b in tb.items():
                if sa == sb:
                    continue
                pairs = _unique_pairs(tag_a.idx, tag_b.idx)
                if len(pairs) and (len(np.unique(pairs[:, 0])) < len(pairs) or len(np.unique(pairs[:, 1])) < len(pairs)):
                    for site, other in ((sa, sb), (sb, sa)):  # a row is not one unit with one partner row
                        self._boundary(site, "out", f"outer product with {other}{self._where(node)}")
                elif len(pairs):
                    self._record_product(sa, sb, pairs, (tag_a.trail, tag_b.trail))
        for site, tag in out.items():
            out[site] = _Tag(tag.idx, _dedupe(tag.trail + ("mul",)))

    def _record_product(self, a: str, b: str, pairs: np.ndarray, trails: tuple) -> None:
        prev = self.muls.get((a, b))
        merged = pairs if prev is None else unique_rows(np.concatenate([prev[0], pairs]))
        self.muls[(a, b)] = (merged, trails)

    def _contraction(self, node: fx.Node, value: torch.Tensor, name: str) -> Tags:
        if name == "scaled_dot_product_attention":
            return self._attention(node, value)
        if name == "baddbmm":  # Bloom's scores: ALiBi + q @ kᵀ; the added input is not contracted
            for site in self.tags.get(node.args[0]) or {}:
                self._boundary(site, "out", f"added to a product by baddbmm{self._where(node)}")
        a_node, b_node = node.args[1:3] if name == "baddbmm" else node.args[:2]
        a, b = self.env[a_node], self.env[b_node]
        if a.dim() < 2 or b.dim() < 2:
            self._end(node, f"opaque op {name}")
            return {}
        ta, tb = self.tags.get(a_node) or {}, self.tags.get(b_node) or {}
        out: Tags = {}
        a_contracted = {s: t for s, t in ta.items() if _varies(t.idx, -1)}
        b_contracted = {s: t for s, t in tb.items() if _varies(t.idx, -2)}
        self._pair_contracted(node, a_contracted, b_contracted, a.shape[-1], "matmul",
                              lambda t: t.idx.select(-2, 0), lambda t: t.idx.select(-1, 0))
        if a_contracted and b_contracted:
            self.scores[node] = (list(a_contracted), list(b_contracted))
        for s, t in ta.items():
            if s not in a_contracted:
                out[s] = _Tag(_like(value, t.idx.narrow(-1, 0, 1)), _dedupe(t.trail + ("matmul",)))
        weighted = [s for s in tb if s not in b_contracted]
        attention = a_node in self.scores and not ta and weighted  # scores · v: attention written out
        if attention:
            self.attentions.append((*self.scores[a_node], weighted))
        for s in weighted:
            t = tb[s]
            idx = t.idx.narrow(-2, 0, 1)
            if s in out:
                idx = torch.where(out[s].idx >= 0, out[s].idx, idx)
            out[s] = _Tag(_like(value, idx), _dedupe(t.trail + ("attention" if attention else "matmul",)))
        return out

    def _pair_contracted(self, node, left: dict, right: dict, size: int, via: str, left_vec, right_vec) -> None:
        for s in left:
            if not right:
                self._boundary(s, "out", f"contracted with non-feature data by {via}{self._where(node)}")
        for s in right:
            if not left:
                self._boundary(s, "out", f"contracted with non-feature data by {via}{self._where(node)}")
        for sa, ta in left.items():
            for sb, tb in right.items():
                a, b = torch.broadcast_tensors(left_vec(ta), right_vec(tb))
                pairs = _unique_pairs(a, b)
                key = (sa, sb)
                prev = self.dots.get(key)
                merged = pairs if prev is None else unique_rows(np.concatenate([prev[0], pairs]))
                self.dots[key] = (merged, size, via, (prev[3] if prev else set()) | _slices(a, b))

    def _attention(self, node: fx.Node, value: torch.Tensor) -> Tags:
        names = ["query", "key", "value"]
        nodes = [node.args[i] if len(node.args) > i else node.kwargs.get(names[i]) for i in range(3)]
        q, k, v = (self.env[n] for n in nodes)
        tq, tk, tv = (dict(self.tags.get(n) or {}) for n in nodes)
        self.attentions.append((list(tq), list(tk), list(tv)))
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:  # enable_gqa: kv heads shared by q heads
            rep = q.shape[-3] // k.shape[-3]
            tk = {s: _Tag(t.idx.repeat_interleave(rep, dim=-3), t.trail) for s, t in tk.items()}
            tv = {s: _Tag(t.idx.repeat_interleave(rep, dim=-3), t.trail) for s, t in tv.items()}
        q_contracted = {s: t for s, t in tq.items() if _varies(t.idx, -1)}
        k_contracted = {s: t for s, t in tk.items() if _varies(t.idx, -1)}
        self._pair_contracted(node, q_contracted, k_contracted, q.shape[-1], "scaled_dot_product_attention",
                              lambda t: t.idx.select(-2, 0), lambda t: t.idx.select(-2, 0))
        for s in set(tq) - set(q_contracted) | set(tk) - set(k_contracted):
            self._boundary(s, "out", f"mixed over positions by attention{self._where(node)}")
        return {s: _Tag(_like(value, t.idx.narrow(-2, 0, 1)), _dedupe(t.trail + ("attention",)))
                for s, t in tv.items()}

    def _norm_dims(self, node: fx.Node, value: Any) -> list[int]:
        x = self.env[node.args[0]]
        if node.op == "call_module":
            m = self.module.get_submodule(node.target)
            shape = getattr(m, "normalized_shape", None)
            n = len(shape) if shape is not None else 1
            if type(m).__name__ == "GroupNorm":
                return list(range(1, x.dim()))
        else:
            shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape", [x.shape[-1]])
            n = len(shape) if isinstance(shape, (list, tuple)) else 1
            if "group_norm" in op_name(node, self.module):
                return list(range(1, x.dim()))
        return list(range(x.dim() - n, x.dim()))

    def _reduce_dims(self, node: fx.Node) -> list[int] | None:
        x = self.env[node.args[0]]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if isinstance(dim, fx.Node):
            dim = self.env[dim]
        if dim is None or not isinstance(dim, (int, list, tuple)):
            return list(range(x.dim()))
        dims = [dim] if isinstance(dim, int) else list(dim)
        return [d % x.dim() for d in dims]

    def _reduction(self, node: fx.Node, value: Any, name: str, dims: list[int]) -> Tags:
        x_node = node.args[0]
        tags = self.tags.get(x_node) or {}
        real = self.env[x_node]
        out: Tags = {}
        result = value[0] if isinstance(value, (tuple, list)) else value
        for site, tag in tags.items():
            if any(_varies(tag.idx, d) for d in dims):
                reason = f"{name} over its features{self._where(node)}"
                self._boundary(site, "out", reason)
                self.reduced.setdefault(site, {}).setdefault(reason, []).append(_reduced_together(tag.idx, dims))
                continue
            idx = tag.idx
            for d in sorted(dims, reverse=True):
                idx = idx.narrow(d, 0, 1)
            if result.dim() < real.dim():
                idx = idx.reshape([s for d, s in enumerate(idx.shape) if d not in dims])
            out[site] = _Tag(_like(result, idx), tag.trail)
        if isinstance(value, (tuple, list)):
            return [out] + [None] * (len(value) - 1)
        return out


@contextlib.contextmanager
def _one_thread():
    """Index tensors are small (one layer's activations at the example inputs' size): intra-op threads
    cost more to wake than the work: seven times the time on a busy 2-core machine (benchmarks/big_models.py coupling)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _is_complex(real: Any) -> bool:
    return isinstance(real, torch.Tensor) and real.is_complex()


def _blank(real: Any) -> Any:
    """A stand-in carrying no feature for a float operand of a data-movement op; other values as is."""
    if isinstance(real, torch.Tensor) and (real.is_floating_point() or real.is_complex()):
        return _like(real, torch.tensor(-1, dtype=torch.int32))
    return real


def _flat_nodes(args: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_aggregate(args, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return found


def _collect(tag: Any, found: list) -> None:
    if isinstance(tag, dict):
        if tag:
            found.append(tag)
    elif isinstance(tag, (list, tuple)):
        for t in tag:
            _collect(t, found)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(_has_tensor(v) for v in value)


def _dedupe(trail: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for op in trail:
        if not out or out[-1] != op:
            out.append(op)
    return tuple(out)


def _regroup(value: Any, results: dict[str, tuple[Any, tuple]]) -> Any:
    """Per-site outputs of a structural op (tensor or tuple of tensors) into tags shaped like ``value``."""
    if isinstance(value, torch.Tensor):
        tags = {}
        for site, (out, trail) in results.items():
            if isinstance(out, torch.Tensor) and bool((out >= 0).any()):
                tags[site] = _Tag(out, trail)
        return tags
    if isinstance(value, (tuple, list)):
        return [_regroup(v, {s: (o[i], t) for s, (o, t) in results.items()}) for i, v in enumerate(value)]
    return None


def couple(cap: Capture, sites: Sites) -> Coupling:
    """Analyze ``cap``'s graph: coupling groups and boundaries of ``sites``."""
    prop = _Propagator(cap.graph_module, sites)
    with torch.no_grad():
        prop.run(*cap.flat_inputs)
    result = Coupling(cap.describe(), sites, notes=prop.notes)
    for site, chunks in prop.paired.items():
        result.paired[site] = unique_rows(np.sort(np.concatenate(chunks), axis=1))
    for (src, dst), (mapping, trail) in prop.chains.items():
        result.groups.append(ChainGroup(src, dst, mapping, trail))
    for (a, b), (pairs, trails) in prop.muls.items():
        result.groups.append(MulGroup(a, b, pairs, trails))
    for (q, k), (pairs, head_dim, via, slices) in prop.dots.items():
        rope = {s: result.paired[s] for s in (q, k) if s in result.paired}
        result.groups.append(DotGroup(q, k, pairs, head_dim, via, rope, sorted(slices)))
    result.boundaries = prop.boundaries
    for site, params in sorted(prop.per_feature.items()):
        if (site, "out") in prop.boundaries:  # its rows never go: nothing to cut with them
            continue
        found = [feature_parameter(name, shape, np.unique(np.concatenate(pairs), axis=0))
                 for name, (shape, pairs) in sorted(params.items())]
        if any(found):
            result.parameters[site] = [p for p in found if p is not None]
    for site, reductions in prop.reduced.items():
        result.reduced[site] = {reason: unique_rows(np.concatenate(rows)) for reason, rows in reductions.items()
                                if len({r.shape[1] for r in rows}) == 1}
    dots = {(g.q, g.k): g for g in result.groups if isinstance(g, DotGroup)}
    for q, k, v in prop.attentions:
        if len(q) != 1 or len(v) != 1:
            continue
        shared = tuple(sorted(s for s in k if len(k) > 1 and _read_by_every_head(dots.get((q[0], s)))))
        own = [s for s in k if s not in shared]
        if len(own) == 1:  # one site may be all three (a fused qkv layer)
            attention = Attention(q[0], own[0], v[0], shared)
            if attention not in result.attentions:
                result.attentions.append(attention)
    return result


def _read_by_every_head(dot: DotGroup | None) -> bool:
    """Whether a key's features are one head's worth that every one of several query heads reads."""
    if dot is None:
        return False
    q_heads, kv_heads, _ = dot.heads()
    return kv_heads == 1 and q_heads > 1


COUPLE = GraphPass("couple", couple, SparsifyError)
