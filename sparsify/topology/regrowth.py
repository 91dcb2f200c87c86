"""Link regrowth: scores of inactive positions and the growth of an exact number of new links.

Every predictor takes the mask ``[out, in]`` (rows: output neurons u, columns: input neurons j)
and returns a float score of the same shape, zero on active positions. ``regrow`` then adds
exactly ``count`` links among inactive positions: the highest scores (hard) or a sample ∝ score
(soft); when fewer positive scores exist than links to grow, the rest are drawn uniformly among
the inactive zero-score positions. It never picks an active position.

Cannistraci-Hebb predictors score a missing link (u, j) by the L3 paths u–b–v–j (b an input
neuron linked to u, v an output neuron linked to j, b–v a link) and the *local community* they
form: a node z on such a path has internal degree di_z (its links into the community: for b,
|N(b) ∩ N(j)|; for v, |N(v) ∩ N(u)|) and external degree de_z = deg(z) − di_z − 1.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch

from sparsify.topology import bits
from sparsify.topology.selection import select

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

PATH_CHUNK = 1 << 21
# At or below this density, on layers of at least SPARSE_PRODUCTS_SIZE positions, the count and
# score products take the mask as a CSR matrix (CPU): their cost then follows the links.
# benchmarks/topology.py measures both forms (RESULTS.md): CSR takes 0.47-0.80x the dense time at
# 1%, 0.70-0.96x at 2%, and 1.02-2.25x at 5%. On smaller layers both take milliseconds and the
# CSR conversions outweigh the gain.
SPARSE_PRODUCTS = 0.02
SPARSE_PRODUCTS_SIZE = 1 << 20


def _sparse_products(mask: torch.Tensor) -> bool:
    return (mask.device.type == "cpu" and mask.numel() >= max(SPARSE_PRODUCTS_SIZE, 1)
            and bits.count(mask) <= SPARSE_PRODUCTS * mask.numel())


def _common_neighbours(mask: torch.Tensor, a: torch.Tensor, sparse: bool):
    """``A·Aᵀ`` [out, out] and ``Aᵀ·A`` [in, in]: the neighbours two nodes share; exact integers.

    With ``sparse``, also returns A and Aᵀ as CSR matrices for the products that follow.
    """
    if not sparse:
        counted = _integer_products(mask) if mask.device.type == "cpu" and min(mask.shape) >= 16 else None
        if counted is not None:
            return counted[0].to(a.dtype), counted[1].to(a.dtype), None, None
        with _exact_matmul(a.device):
            return a @ a.t(), a.t() @ a, None, None
    out_features, in_features = mask.shape
    r, c = bits.coordinates(mask)  # row-major
    a_t = torch.zeros(in_features, out_features, dtype=a.dtype)  # from the indices: copying a.t() reads strided
    a_t.view(-1)[c * out_features + r] = 1.0
    rows, cols = _csr_pair(r, c, mask.shape, a.dtype)  # [out, in], [in, out]
    return rows @ a_t, cols @ a, rows, cols


def _integer_products(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``A·Aᵀ`` and ``Aᵀ·A`` of a CPU mask as int8 products summed in int32: exact, and 2-4x faster
    than the float32 products on CPUs with int8 dot-product instructions (``benchmarks/topology.py
    --counts``). None where ``torch._int_mm`` is missing or refuses the operands.
    Only for layers 16 wide or more: with a dimension of 1, torch 2.13's CPU ``_int_mm`` returns
    wrong counts (a [n, 1] operand's strides are ambiguous), and small layers gain nothing."""
    a = mask.to(torch.int8)
    a_t = a.t().contiguous()
    try:
        return torch._int_mm(a, a_t), torch._int_mm(a_t, a)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def _csr_pair(r: torch.Tensor, c: torch.Tensor, shape: tuple[int, int],
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A mask and its transpose as CSR matrices of ones, from the mask's row-major coordinates."""
    out_features, in_features = shape
    order = torch.argsort(c * out_features + r)  # column-major
    ones = torch.ones(c.numel(), dtype=dtype)

    def csr(major, minor, size):
        crow = torch.zeros(size[0] + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(major, minlength=size[0]), 0)
        return torch.sparse_csr_tensor(crow, minor, ones, size, check_invariants=False)

    return csr(r, c, (out_features, in_features)), csr(c[order], r[order], (in_features, out_features))


def random_scores(mask: torch.Tensor, *, weight: torch.Tensor | None = None,
                  grad: torch.Tensor | None = None) -> torch.Tensor:
    """SET: the same score for every inactive position, so regrowth is uniform.

    >>> random_scores(torch.tensor([[True, False]])).tolist()
    [[0.0, 1.0]]
    """
    return (~mask).float()


def gradient_scores(mask: torch.Tensor, *, weight: torch.Tensor | None = None,
                    grad: torch.Tensor | None = None) -> torch.Tensor:
    """RigL: ``|dense gradient|`` on inactive positions (the last backward before the update).

    >>> gradient_scores(torch.tensor([[True, False]]), grad=torch.tensor([[5., -2.]])).tolist()
    [[0.0, 2.0]]
    """
    if grad is None:
        raise ValueError("the gradient regrowth predictor needs the dense gradient of the weight")
    return grad.detach().abs().float() * ~mask


@contextlib.contextmanager
def _exact_matmul(device: torch.device):
    """Count matrices must be exact: no TF32 on CUDA while they are computed."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _node_terms(common: torch.Tensor, degree: torch.Tensor, numerator_di: bool,
                transposed: bool = False) -> torch.Tensor:
    """From ``common`` [seed, z] = |N(seed) ∩ N(z)| (di_z): (1+di)/(1+de) or 1/(1+de) where di > 0.

    1 + de_z = deg(z) − di_z (the link to the seed is the −1), at least 1. Nodes off the local
    community (di = 0) get 1 + de = inf, so their term is exactly 0. Reuses ``common``'s memory.
    ``common`` is symmetric, so ``transposed`` gives the terms as [z, seed] without a copy.
    """
    degree = degree[:, None] if transposed else degree[None, :]
    external = torch.sub(degree, common).clamp_min_(1)  # 1 + de_z
    external.masked_fill_(common == 0, math.inf)
    if numerator_di:
        return common.add_(1).div_(external)
    del common
    return external.reciprocal_()


def _node_based(mask: torch.Tensor, numerator_di: bool, dtype: torch.dtype) -> torch.Tensor:
    a = mask.to(dtype)  # [out, in]
    sparse = _sparse_products(mask)
    common_out, common_in, rows, cols = _common_neighbours(mask, a, sparse)
    # f_out [u, v]: v an output neuron; f_in [j, b]: b an input neuron (as [b, j] for CSR products)
    f_out = _node_terms(common_out, a.sum(1), numerator_di, transposed=sparse)
    f_in = _node_terms(common_in, a.sum(0), numerator_di, transposed=sparse)
    del common_out, common_in
    if sparse:  # the same two products, with A on the left as CSR
        scores = rows @ f_in  # Σ_{b ∈ N(u)} F[j, b]
        del f_in
        scores.add_((cols @ f_out).t())  # + Σ_{v ∈ N(j)} F[u, v]
        return scores.masked_fill_(mask, 0.0)
    with _exact_matmul(a.device):
        scores = f_out @ a  # Σ_{v ∈ N(j)} F[u, v]
        del f_out
        scores.addmm_(a, f_in.t())  # + Σ_{b ∈ N(u)} F[j, b]
    return scores.masked_fill_(mask, 0.0)


def ch2_l3n(mask: torch.Tensor, *, weight: torch.Tensor | None = None, grad: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CH2-L3n (CHTs, node-based): ``Σ_{z ∈ LC(u,j)} (1 + di_z) / (1 + de_z)``, once per node z.

    Matrix form, A = mask as floats: DD = A·Aᵀ, F_D = (DD+1)/(max(deg_v − DD − 1, 0)+1) where
    DD > 0, likewise F_T from Aᵀ·A, and S = F_D·A + (F_T·Aᵀ)ᵀ. Four matmuls; at a density of at
    most ``SPARSE_PRODUCTS`` on the CPU, A enters them as a CSR matrix, so they cost in proportion
    to the links times a layer width instead of the product of three widths.

    Example: rows u0: {b0, b2}, u1: {b1, b2}, u2: {b0, b1, b3}. The missing (u0, b1) has the
    paths u0–b0–u2–b1 and u0–b2–u1–b1, so LC = {b0, u2, b2, u1}. b0: deg 2, di = |N(b0) ∩ N(b1)|
    = |{u2}| = 1, de = 0; u2: deg 3, di = |N(u2) ∩ N(u0)| = |{b0}| = 1, de = 1; b2: di 1, de 0;
    u1: di 1, de 0. Score 2/1 + 2/2 + 2/1 + 2/1 = 7.

    >>> m = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    >>> ch2_l3n(m).tolist()
    [[0.0, 7.0, 0.0, 3.0], [7.0, 0.0, 0.0, 3.0], [0.0, 0.0, 8.0, 0.0]]
    """
    return _node_based(mask, True, dtype)


def ch3_l3n(mask: torch.Tensor, *, weight: torch.Tensor | None = None, grad: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CH3-L3n (node-based): ``Σ_{z ∈ LC(u,j)} 1 / (1 + de_z)``, the matrix form of :func:`ch2_l3n`
    with numerator 1.

    Example (the graph of :func:`ch2_l3n`): for (u0, b1), LC = {b0 (de 0), u2 (de 1), b2 (de 0),
    u1 (de 0)}: 1 + 1/2 + 1 + 1 = 3.5.

    >>> m = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    >>> ch3_l3n(m).tolist()
    [[0.0, 3.5, 0.0, 1.5], [3.5, 0.0, 0.0, 1.5], [0.0, 0.0, 4.0, 0.0]]
    """
    return _node_based(mask, False, dtype)


def ch3_l3p(mask: torch.Tensor, *, weight: torch.Tensor | None = None, grad: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float32, chunk: int = PATH_CHUNK) -> torch.Tensor:
    """CH3-L3p (CHT, path-based): ``Σ_{paths u–b–v–j} 1 / sqrt((1 + de_b)(1 + de_v))``.

    The L3 paths are enumerated from the sparse links, ``chunk`` paths at a time (memory bounded
    by the chunk), so the cost follows the number of paths, about N·d³.

    Example (the graph of :func:`ch2_l3n`): (u0, b1) has two paths, u0–b0–u2–b1 with de_b0 = 0,
    de_u2 = 1, and u0–b2–u1–b1 with de_b2 = de_u1 = 0: 1/sqrt(1·2) + 1/sqrt(1·1) ≈ 1.7071.

    >>> m = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    >>> [[round(x, 4) for x in row] for row in ch3_l3p(m).tolist()]
    [[0.0, 1.7071, 0.0, 0.7071], [1.7071, 0.0, 0.0, 0.7071], [0.0, 0.0, 2.0, 0.0]]
    """
    out_features, in_features = mask.shape
    a = mask.to(dtype)
    # [u, v]: |N(u) ∩ N(v)|; [b, j]: |N(b) ∩ N(j)|
    common_out, common_in, _, _ = _common_neighbours(mask, a, _sparse_products(mask))
    deg_out, deg_in = mask.sum(1), mask.sum(0)  # output neurons' degrees, input neurons'
    # 1/sqrt(1 + de) = 1/sqrt(deg(z) − di_z) for a middle node z given the seed across from it;
    # clamped at 1 where no path can use the entry (an active (u, j), masked at the end)
    g_out = torch.sub(deg_out.to(dtype)[None, :], common_out).clamp_min_(1).rsqrt_().reshape(-1)  # [u, v]
    g_in = torch.sub(deg_in.to(dtype)[:, None], common_in).clamp_min_(1).rsqrt_().reshape(-1)  # [b, j]
    del common_out, common_in
    row_links = mask.nonzero()  # (u, b), sorted by u: the first hop
    by_row = torch.cat([deg_out.new_zeros(1), deg_out.cumsum(0)])  # CSR offsets of each u's inputs
    col_links = mask.t().nonzero()  # (b, v), sorted by b
    by_col = torch.cat([deg_in.new_zeros(1), deg_in.cumsum(0)])
    # paths starting with the link (u, b): Σ_{v ∈ N(b)} deg(v)
    per_first = (a.t() @ deg_out.to(dtype)).round().long()[row_links[:, 1]]
    scores = torch.zeros(out_features * in_features, dtype=dtype, device=mask.device)
    for lo, hi in _spans(per_first, chunk):
        u, b = row_links[lo:hi, 0], row_links[lo:hi, 1]
        pos, (u, b) = _expand(by_col[b], deg_in[b], u, b)  # second hop b–v
        v = col_links[pos, 1]
        w_v = g_out[u * out_features + v]
        # third hop v–j; paths back to u's own inputs (v = u, or j ∈ N(u)) land on active
        # positions, which are zeroed at the end: cheaper than filtering every path
        pos, (u_at, b_at, w_v) = _expand(by_row[v], deg_out[v], u * in_features, b * in_features, w_v)
        j = row_links[pos, 1]
        _accumulate(scores, u_at + j, w_v.mul_(g_in[b_at + j]))
    return scores.view(out_features, in_features).masked_fill_(mask, 0.0)


def _accumulate(out: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``out[index] += values`` with repeated indices summed, in the same order on every run: CUDA's
    ``index_add_`` adds with atomics in whatever order its threads arrive (float sums then differ
    in the last bit from run to run, and ties between scores with them), so off the CPU the values
    are summed by ``index_put_(accumulate=True)``, which sorts the indices first."""
    if out.device.type == "cpu":
        out.index_add_(0, index, values)
    else:
        out.index_put_((index,), values, accumulate=True)


def _spans(costs: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose summed cost stays within ``budget`` (one item at least)."""
    ends = torch.cumsum(costs, 0)
    spans, lo, base = [], 0, 0
    while lo < len(costs):
        hi = int(torch.searchsorted(ends, base + budget, right=True))
        hi = max(hi, lo + 1)
        spans.append((lo, hi))
        base, lo = int(ends[hi - 1]), hi
    return spans


def _expand(starts: torch.Tensor, counts: torch.Tensor, *carried: torch.Tensor):
    """Positions ``starts[i] + 0..counts[i]-1`` for every i, and each carried tensor repeated to match."""
    total = int(counts.sum())
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=counts.device) - torch.repeat_interleave(first, counts, output_size=total)
    positions = torch.repeat_interleave(starts, counts, output_size=total) + local
    return positions, tuple(torch.repeat_interleave(t, counts, dim=0, output_size=total) for t in carried)


def regrow(mask: torch.Tensor, scores: torch.Tensor, count: int, generator: torch.Generator, *,
           mode: str = "hard") -> torch.Tensor:
    """The mask with exactly ``count`` new links at inactive positions.

    ``hard``: the highest scores (ties at random). ``soft``: a sample without replacement ∝ score.
    Either way, positions with score 0 are used only when the positive ones run out, uniformly.

    >>> g = torch.Generator().manual_seed(0)
    >>> m = torch.tensor([[True, False, False], [False, False, True]])
    >>> regrow(m, torch.tensor([[9., 1., 4.], [3., 0., 9.]]), 2, g).int().tolist()
    [[1, 0, 1], [1, 0, 1]]
    """
    if mode not in ("hard", "soft"):
        raise ValueError(f"regrowth mode must be 'hard' or 'soft', got {mode!r}")
    if count <= 0:
        return mask.clone()
    inactive = ~mask
    free = bits.count(inactive)
    if count > free:
        raise ValueError(f"cannot grow {count} links: only {free} positions are inactive")
    grown = select(scores.float(), count, generator, eligible=inactive,
                   temperature=1.0 if mode == "soft" else float("inf"))
    return mask | grown


REGROWTH_PREDICTORS = {
    "random": random_scores,
    "gradient": gradient_scores,
    "CH3_L3p": ch3_l3p,
    "CH2_L3n": ch2_l3n,
    "CH3_L3n": ch3_l3n,
}
