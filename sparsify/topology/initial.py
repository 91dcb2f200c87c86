"""Initial sparse topologies: boolean masks ``[out, in]`` with exactly ``link_count`` active links.

The mask is a bipartite graph: input neurons are columns, output neurons are rows. Every model
takes ``(out_features, in_features, density, generator)`` plus its own keyword parameters, gives
the same mask for the same generator state, and works for any shape (out ≠ in, and layers so small
that some neurons get no link).
"""
from __future__ import annotations

import numpy as np
import torch

from sparsify.topology.selection import select


RACE_POSITIONS = 1 << 20  # positions BRF ranks at once (bounds its temporaries to tens of MB)


def link_count(out_features: int, in_features: int, density: float) -> int:
    """The number of active links a layer of this shape gets at ``density``: round(density·out·in)."""
    return int(round(density * out_features * in_features))


def spread(total: int, parts: int) -> torch.Tensor:
    """``total`` split over ``parts`` as evenly as integers allow (floor/ceil mix, exact sum).

    >>> spread(7, 3).tolist()
    [2, 2, 3]
    """
    edges = torch.div(torch.arange(parts + 1, dtype=torch.long) * total, parts, rounding_mode="floor")
    return edges[1:] - edges[:-1]


def _ring_distance(centres: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[len(centres), size]`` distance on a ring of ``size`` nodes from each (fractional) centre,
    and a tiny tie-breaker that prefers, of two equally near nodes, the one to the right."""
    offset = torch.remainder(torch.arange(size, dtype=torch.float64)[None, :] - centres[:, None], size)
    return torch.minimum(offset, size - offset), offset * 1e-9


def _nearest(centres: torch.Tensor, size: int, degrees: torch.Tensor) -> torch.Tensor:
    """A bool ``[len(centres), size]`` mask: for each row the ``degrees[row]`` ring nodes nearest
    its centre (of two equally near, the right one). Only a window around each centre is ranked."""
    width = int(degrees.max()) + 3 if len(degrees) else 0
    if width >= size:
        dist, tie = _ring_distance(centres, size)
        return _first_per_row(-dist - tie, degrees)
    window = torch.floor(centres).long()[:, None] - (width // 2) + torch.arange(width)  # [rows, width]
    offset = torch.remainder(window.double() - centres[:, None], size)
    dist = torch.minimum(offset, size - offset)
    pick = _first_per_row(-dist - offset * 1e-9, degrees)
    mask = torch.zeros(len(centres), size, dtype=torch.bool)
    rows = torch.arange(len(centres))[:, None].expand_as(window)
    mask[rows[pick], torch.remainder(window, size)[pick]] = True
    return mask


def _first_per_row(keys: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """A bool mask choosing, in each row, the ``degrees[row]`` entries with the largest keys."""
    order = torch.argsort(keys, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(keys.shape[1]).expand_as(order).contiguous())
    return rank < degrees[:, None]


def _oriented(mask_large_rows: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Back to ``[out, in]`` from a mask built with the larger side as rows."""
    return mask_large_rows if out_features >= in_features else mask_large_rows.t().contiguous()


def erdos_renyi(out_features: int, in_features: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """ER: ``round(density·out·in)`` links at uniformly random positions, without repeats.

    >>> g = torch.Generator().manual_seed(0)
    >>> int(erdos_renyi(3, 4, 0.5, g).sum())
    6
    """
    total = out_features * in_features
    k = link_count(out_features, in_features, density)
    mask = torch.zeros(total, dtype=torch.bool)
    if k >= total:
        return mask.fill_(True).view(out_features, in_features)
    mask[torch.randperm(total, generator=generator)[:k]] = True
    return mask.view(out_features, in_features)


def bipartite_small_world(out_features: int, in_features: int, density: float, generator: torch.Generator,
                          *, beta: float = 0.25) -> torch.Tensor:
    """BSW: a wrapped diagonal band, each link then rewired with probability ``beta``.

    Each node of the larger side gets ``spread(k, large)`` links (floor/ceil of density·small) to
    the nearest nodes of the smaller side around its position scaled by small/large (a ring
    lattice stretched over the rectangle). Each link is then, with probability β, moved to a
    uniformly random position not held by a kept link. β = 0 is the band; β = 1 is ER.

    >>> g = torch.Generator().manual_seed(0)
    >>> bipartite_small_world(4, 4, 0.5, g, beta=0.0).int().tolist()
    [[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 1]]
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"BSW beta must be in [0, 1], got {beta}")
    large, small = max(out_features, in_features), min(out_features, in_features)
    k = link_count(out_features, in_features, density)
    degrees = spread(k, large)
    centres = torch.arange(large, dtype=torch.float64) * small / large
    band = _nearest(centres, small, degrees)
    band = _oriented(band, out_features, in_features)
    if beta == 0.0 or k == 0:
        return band
    rewire = band & (torch.rand(band.shape, generator=generator, dtype=torch.float64) < beta)
    kept = band & ~rewire
    moved = int(rewire.sum())
    new = select(torch.ones(band.shape), moved, generator, eligible=~kept, temperature=0.0)
    return kept | new


def bipartite_receptive_field(out_features: int, in_features: int, density: float, generator: torch.Generator,
                              *, r: float = 0.3, degrees: str = "fixed") -> torch.Tensor:
    """BRF: each output neuron draws inputs near its centre, ∝ (1 + ring distance)^(-(1-r)/r).

    Output ``u`` is centred at ``u·in/out`` on the ring of inputs and draws its inputs without
    replacement. ``r = 0``: the nearest ones, deterministically (of two equally near, the right one); ``r = 1``:
    uniform. ``degrees``: ``fixed`` gives every output floor or ceil of the mean in-degree;
    ``uniform`` gives the in-degrees of a uniformly random placement of the k links.

    >>> g = torch.Generator().manual_seed(0)
    >>> bipartite_receptive_field(2, 6, 0.5, g, r=0.0).int().tolist()
    [[1, 1, 0, 0, 0, 1], [0, 0, 1, 1, 1, 0]]
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"BRF r must be in [0, 1], got {r}")
    k = link_count(out_features, in_features, density)
    if degrees == "fixed":
        deg = spread(k, out_features)
    elif degrees == "uniform":
        deg = erdos_renyi(out_features, in_features, density, generator).sum(1)
    else:
        raise ValueError(f"BRF degrees must be 'fixed' or 'uniform', got {degrees!r}")
    centres = torch.arange(out_features, dtype=torch.float64) * in_features / out_features
    if r == 0.0:
        return _nearest(centres, in_features, deg)
    # a block of rows at a time: the race takes about ten 8-byte temporaries a position, 0.9 GB for
    # a 5632 x 2048 layer at once; the generator's stream is the same split by rows as whole
    mask = torch.empty(out_features, in_features, dtype=torch.bool)
    step = max(1, RACE_POSITIONS // max(in_features, 1))
    for start in range(0, out_features, step):
        dist, _ = _ring_distance(centres[start:start + step], in_features)
        log_w = -((1.0 - r) / r) * torch.log1p(dist)
        race = torch.empty(dist.shape, dtype=torch.float64).exponential_(generator=generator).log_()
        mask[start:start + step] = _first_per_row(log_w - race, deg[start:start + step])
    return mask


def bipartite_scale_free(out_features: int, in_features: int, density: float, generator: torch.Generator,
                         *, partition: str = "random", resort: bool = False) -> torch.Tensor:
    """BSF: a Barabási–Albert graph on in+out nodes, split into the two layers, made bipartite.

    Nodes join one by one, each linking to ``m ≈ k/(in+out)`` earlier nodes chosen ∝ degree, which
    gives power-law degrees. The nodes are then split into inputs and outputs (``partition``:
    ``random``, or ``equal``: by degree rank, dealt alternately so both layers get the same degree
    profile), and each pair of same-layer links (a, b), (c, d) is rewired across as (a, c), (b, d),
    which keeps every degree. Leftover same-layer links move one end to the other layer; the count
    is then made exact (duplicates dropped, missing links added uniformly). ``resort``: rows and
    columns ordered by falling degree, so consecutive layers built this way put their hubs on the
    same middle neurons.
    """
    if partition not in ("random", "equal"):
        raise ValueError(f"BSF partition must be 'random' or 'equal', got {partition!r}")
    k = link_count(out_features, in_features, density)
    n = out_features + in_features
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    src, dst = _barabasi_albert(n, k, rng)
    deg = np.bincount(np.concatenate([src, dst]), minlength=n)
    if partition == "random":
        nodes = rng.permutation(n)
    else:  # deal nodes by falling degree so each layer gets every degree class in proportion
        by_degree = np.argsort(-deg + rng.random(n) * 0.5, kind="stable")
        share = np.floor((np.arange(1, n + 1) * in_features) / n) - np.floor((np.arange(n) * in_features) / n)
        nodes = np.concatenate([by_degree[share == 1], by_degree[share == 0]])
    side = np.zeros(n, dtype=np.int64)  # 0: input, 1: output
    side[nodes[in_features:]] = 1
    local = np.empty(n, dtype=np.int64)
    local[nodes[:in_features]] = np.arange(in_features)
    local[nodes[in_features:]] = np.arange(out_features)
    rows, cols = _make_bipartite(src, dst, side, rng)
    mask = torch.zeros(out_features, in_features, dtype=torch.bool)
    mask[torch.from_numpy(local[rows]), torch.from_numpy(local[cols])] = True
    have = int(mask.sum())
    if have > k:
        mask &= ~select(torch.ones(mask.shape), have - k, generator, eligible=mask, temperature=0.0)
    elif have < k:
        mask |= select(torch.ones(mask.shape), k - have, generator, eligible=~mask, temperature=0.0)
    if resort:
        mask = mask[torch.argsort(mask.sum(1), descending=True, stable=True)]
        mask = mask[:, torch.argsort(mask.sum(0), descending=True, stable=True)]
    return mask


def _barabasi_albert(n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Edges of a preferential-attachment graph on ``n`` nodes with about ``k`` edges (no repeats)."""
    m = max(1, min(n - 1, round(k / n)))
    seed_nodes = m + 1
    src, dst = [], []
    for a in range(seed_nodes):  # a small clique to start from
        for b in range(a):
            src.append(a)
            dst.append(b)
    per_node = spread(max(k - len(src), 0), n - seed_nodes).numpy() if n > seed_nodes else np.zeros(0, int)
    stubs = list(src) + list(dst)  # each node appears once per link: sampling a stub is ∝ degree
    for offset, node in enumerate(range(seed_nodes, n)):
        want = min(int(per_node[offset]), node)
        chosen: set[int] = set()
        while len(chosen) < want:
            draws = rng.integers(0, len(stubs), size=2 * (want - len(chosen))) if stubs else rng.integers(0, node, size=want)
            for d in draws:
                target = stubs[d] if stubs else int(d)
                chosen.add(int(target))
                if len(chosen) == want:
                    break
        for target in chosen:
            src.append(node)
            dst.append(target)
            stubs += [node, target]
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def _make_bipartite(src: np.ndarray, dst: np.ndarray, side: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(output node, input node) of each edge, after degree-keeping rewiring of same-layer edges."""
    a, b = np.where(side[src] == 1, src, dst), np.where(side[src] == 1, dst, src)
    across = side[a] != side[b]
    rows, cols = [a[across]], [b[across]]
    same_in = np.flatnonzero((side[src] == 0) & (side[dst] == 0))
    same_out = np.flatnonzero((side[src] == 1) & (side[dst] == 1))
    same_in, same_out = rng.permutation(same_in), rng.permutation(same_out)
    pairs = min(len(same_in), len(same_out))
    i_a, i_b = src[same_in[:pairs]], dst[same_in[:pairs]]
    o_a, o_b = src[same_out[:pairs]], dst[same_out[:pairs]]
    rows += [o_a, o_b]
    cols += [i_a, i_b]
    outputs, inputs = np.flatnonzero(side == 1), np.flatnonzero(side == 0)
    for left, other in ((same_in[pairs:], outputs), (same_out[pairs:], inputs)):
        if not len(left) or not len(other):
            continue
        keep = src[left]  # keep one end; the other moves to a random node of the other layer
        moved = other[rng.integers(0, len(other), size=len(left))]
        rows.append(moved if other is outputs else keep)
        cols.append(keep if other is outputs else moved)
    return np.concatenate(rows), np.concatenate(cols)


def correlated_sparse(out_features: int, in_features: int, density: float, generator: torch.Generator,
                      *, inputs: torch.Tensor) -> torch.Tensor:
    """CSTI: links where the model's raw input features are most correlated.

    ``inputs`` is ``[samples, n]`` of calibration data: the raw input features. Link (u, j) is
    scored by the |Pearson correlation| of features ``u mod n`` and ``j mod n`` (a feature's own
    diagonal entry and constant features count as 0): a layer that reads the raw input (``in ==
    n``) gets row ``u mod n`` of the correlation matrix, a later or wider layer gets the matrix
    tiled to its shape, as the official MLP runs tile it into every hidden layer. The ``k`` largest
    scores over the whole layer become links, ties broken at random.

    >>> x = torch.tensor([[0., 0., 1.], [1., 1., 0.], [2., 2., 1.], [3., 3., 0.]])
    >>> correlated_sparse(3, 3, 2 / 9, torch.Generator().manual_seed(0), inputs=x).int().tolist()
    [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    >>> correlated_sparse(2, 6, 4 / 12, torch.Generator().manual_seed(0), inputs=x).int().tolist()
    [[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0]]
    """
    x = inputs.detach().reshape(inputs.shape[0], -1).double()
    if x.shape[0] < 2:
        raise ValueError("CSTI needs at least 2 calibration samples to correlate input features")
    n = x.shape[1]
    x = x - x.mean(0)
    norm = x.norm(dim=0)
    corr = (x.t() @ x) / torch.outer(norm, norm).clamp_min(1e-300)
    corr = corr.abs().nan_to_num_(0.0).fill_diagonal_(0.0)
    corr[norm == 0] = 0.0
    corr[:, norm == 0] = 0.0
    scores = corr[torch.arange(out_features) % n][:, torch.arange(in_features) % n]
    return select(scores, link_count(out_features, in_features, density), generator)


CALIBRATED_INIT = {"CSTI"}  # initial topologies computed from the layer's input data

INIT_TOPOLOGIES = {
    "ER": erdos_renyi,
    "BSW": bipartite_small_world,
    "BRF": bipartite_receptive_field,
    "BSF": bipartite_scale_free,
    "CSTI": correlated_sparse,
}
