"""Shrink pass: hidden neurons that carry nothing are removed, so weights become physically smaller.

A *unit* is one hidden feature between linear layers: row c of every layer that feeds column c of
a consumer ``dst`` through elementwise operations only (an MLP's fc1 → act → fc2; LLaMA's
act(gate) · up → down), with nothing but ``dst`` reading those rows. One fused layer may hold
several factors (Phi-3's ``gate, up = gate_up_proj(x).chunk(2, -1)``): its rows multiplied together
form the unit, and they go together, the kept rows in their order; since the model's code may
split the layer at a fixed index, that change is run on the samples and kept only when the
outputs are unchanged, after trying the module's integer attribute equal to the old width set to
the new one (``split(self.hidden)``). A unit goes when

- column c of ``dst`` has no weight left: nothing reads the feature, its rows are dropped;
- every feeding row has no input weight: the feature is a constant (act(bias), or a product of
  such constants), measured on the sample inputs and folded into ``dst``'s bias;
- one factor of a product has no input and no bias and the feature measured exactly zero on every
  sample (act(0) · up = 0 for the activations used in gated MLPs): dropped, nothing to fold.

The factors may be several layers' (a per-channel recurrence's r, k and v: sigmoid(r) · state with
state_t = decay · state_{t-1} + k_t · v_t). A parameter applied to the features one slice per feature
(the decay; a depthwise convolution's filters and bias, whose channel counts are set to match) loses
the slices of the units that go. Each unit's change is run on the sample inputs and kept only when the
model runs and its outputs are unchanged (as for heads, below); otherwise it is undone and the
reason reported.

Attention keeps one head size, so its dimensions go by whole heads, and under grouped-query
attention by whole groups (a kv head with the q heads sharing it), which keeps the q/kv ratio. A
group goes when its output reaches nothing: o's columns of its q heads have no weight left, or its
v rows have no input weight, so every head of the group outputs v's bias (the attention weights sum
to one), which is folded into o's bias. Its q, k and v rows and o's columns are then dropped
together, RoPE pairs included since they stay inside a head. Where part of every head's key is
one set of rows all heads read (DeepSeek's multi-head latent attention: each head's k_nope beside a
rotary part shared by all), those rows stay, and the heads' own rows go; q, k and v heads may then
be of different sizes (q 192 rows, k_nope 128, v 128 in DeepSeek-V3). A model that reads the head count
from the tensors (``view(B, T, -1, head_dim)``, as Hugging Face models do) runs with fewer heads
as it is; where it does not, a parameter of the attention's module with one value per q head
(gpt-oss's attention sinks) is cut to the kept heads, checked as below. Each attention's change
is run on the sample inputs and kept only when the outputs are
unchanged (within 1e-5, or 1e-5 of the largest output when outputs exceed 1); otherwise it is
undone and the reason reported. q, k and v may be runs of one fused layer's rows (GPT-2's
c_attn), or interleaved in it head by head (GPT-NeoX): its kept rows stay in their order, and
when the model splits the fused output by a width its module holds (``split(self.split_size)``),
the first integer attribute of that module equal to the old width with which the outputs match
is set to the new one (the report names it). Where the attention's module holds the head counts
its views read (Falcon's num_heads and num_kv_heads, with grouped-query attention from one fused
layer), its integer attributes named for heads that equal the old counts are set to the new ones
together, checked the same way. Where the code fixes the head count (nanoGPT's
``view(B, T, self.n_head, C // self.n_head)``, LLaMA's reference ``repeat_kv``), the module
holding the attention's layers is replaced by its graph with the head sizes rewritten
(passes.retrace), checked the same way. Dimensions within a head (q/k dims dead in every head
with their RoPE partners, v dims with
o's columns) would change the head size q, k, v and a shared rotary embedding agree on, and are
not shrunk. The residual stream is never touched.

The pass works on plain ``nn.Linear`` layers (call it on a copy whose SparseLinear layers were
made dense with ``to_linear``) and replaces the changed layers in place.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from torch.utils._pytree import tree_leaves

from sparsify.errors import SparsifyError, first_line
from sparsify.inputs import ExampleInputs, other_rows
from sparsify.passes.capture import replace_module
from sparsify.passes.couple import ACTIVATIONS, ADDITIVE, DEPTHWISE, MULTIPLICATIVE, UNARY, Attention, Coupling
from sparsify.passes.graph_pass import GraphPass
from sparsify.passes.retrace import owner_of, traced_with_fewer_heads
from sparsify.passes.rewrite import observe_inputs

ELEMENTWISE = ACTIVATIONS | UNARY | ADDITIVE | MULTIPLICATIVE | {DEPTHWISE}  # each feature on its own
HEAD_TOLERANCE = 1e-5  # max abs change of the model's outputs allowed when an attention loses heads (scaled_limit)


def scaled_limit(tolerance: float, reference: Iterable) -> float:
    """A check's limit on the max abs difference: ``tolerance`` for outputs up to 1 in magnitude,
    ``tolerance`` of the largest output beyond. Two models of the same function (the trained
    model and its export, a model with and without its dead heads) compute float32 sums of the
    same products in different orders (the csr backend's sparse kernels against dense
    products, a [n, 1568] product against a [n, 40] one, PyTorch against onnxruntime), so their
    rounding differs by a few ulps of the outputs' size: logits near 10 differed by 1.3e-5 and
    logits near 80 by 9e-5 with no neuron wrong, while a wrongly dropped neuron moves them by
    orders more."""
    scale = max((float(t.detach().abs().max()) for t in reference
                 if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()), default=1.0)
    return tolerance * max(1.0, scale)


@dataclass
class Unit:
    """The hidden features between ``sources`` and ``dst`` and what the pass did with them."""

    sources: tuple[str, ...]
    dst: str
    width: int
    kept: list[int] = field(default_factory=list)
    unused: int = 0  # dropped: nothing read them
    folded: int = 0  # dropped: constant, folded into dst's bias
    zero: int = 0  # dropped: a factor without input made them zero
    rewritten: dict[str, int] = field(default_factory=dict)  # module attributes set to the new split width

    @property
    def removed(self) -> int:
        return self.width - len(self.kept)

    def to_json(self) -> dict:
        return {"layers": list(self.sources), "into": self.dst, "neurons": self.width, "kept": len(self.kept),
                "unused": self.unused, "folded": self.folded, "zero": self.zero, "rewritten": dict(self.rewritten)}


@dataclass
class Heads:
    """The heads of one attention (q, k, v -> o) and which the pass kept."""

    sources: tuple[str, str, str]
    dst: str
    heads: int
    kv_heads: int
    kept: list[int]  # q heads
    kept_kv: list[int]
    folded: int  # groups whose constant output (v's bias) went into o's bias
    rewritten: dict[str, int] = field(default_factory=dict)  # module attributes set to the new split width
    traced: str | None = None  # the module replaced by its graph with the sizes rewritten (passes.retrace)
    narrowed: list[str] = field(default_factory=list)  # parameters with one value per q head, cut to the kept heads

    def to_json(self) -> dict:
        return {"layers": list(self.sources), "into": self.dst, "heads": self.heads, "kv_heads": self.kv_heads,
                "kept": len(self.kept), "kept_kv": len(self.kept_kv), "folded": self.folded,
                "rewritten": dict(self.rewritten), "traced": self.traced, "narrowed": list(self.narrowed)}


@dataclass
class Shrink:
    units: list[Unit]
    skipped: dict[str, str]  # dst -> why its features were left as they are
    parameters_before: int
    parameters_after: int
    heads: list[Heads] = field(default_factory=list)


def _unit_rows(coupling: Coupling, g, width: int) -> np.ndarray | str:
    """[width, r]: the rows of ``g.src`` feeding each input column of ``g.dst``, or why there are none.
    r is 1 when its rows map one to one onto the columns; a fused gate/up layer (Phi-3's
    ``gate, up = gate_up_proj(x).chunk(2, -1)``, then ``act(gate) * up``) has r = 2: the chain maps
    one factor's rows, and the layer's product with itself pairs each with the other's."""
    out = coupling.sites.sites[g.src].out_features
    not_one_to_one = f"{g.src}'s features do not map one to one onto its input"
    if out == width:
        return g.mapping[:, None] if np.array_equal(g.mapping, np.arange(width)) else not_one_to_one
    products = [m.pairs for m in coupling.groups if m.kind == "mul" and m.a == m.b == g.src]
    if g.mapping.min() < 0 or len(np.unique(g.mapping)) != width or not products:
        return not_one_to_one
    partners: dict[int, set[int]] = {}
    for a, b in np.concatenate(products).tolist():
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    rows = [sorted({int(r)} | partners.get(int(r), set())) for r in g.mapping]
    if len({len(r) for r in rows}) != 1 or not np.array_equal(np.sort(np.concatenate(rows)), np.arange(out)):
        return not_one_to_one  # each row of the layer feeds exactly one column, the same number per column
    return np.array(rows)


def _units(coupling: Coupling) -> tuple[dict[str, list], dict[str, str]]:
    """dst -> [(chain group feeding it feature by feature, elementwise; its rows per column
    (_unit_rows))]; and why other consumers are skipped."""
    by_dst: dict[str, list] = {}
    skipped: dict[str, str] = {}
    sites = coupling.sites.sites
    for g in coupling.groups:
        if g.kind == "chain":
            by_dst.setdefault(g.dst, []).append(g)
    units = {}
    for dst, chains in by_dst.items():
        width = sites[dst].in_features
        why = None
        rows = []
        for g in chains:
            rows.append(_unit_rows(coupling, g, width))
            if not set(g.trail) <= ELEMENTWISE:
                why = f"its input comes from {g.src} through {' -> '.join(g.trail)}"
            elif isinstance(rows[-1], str):
                why = rows[-1]
            elif (g.src, "out") in coupling.boundaries:
                why = f"{g.src}'s output is also read elsewhere ({', '.join(sorted(coupling.boundaries[(g.src, 'out')]))})"
            else:
                sources = {c.src for c in chains}
                others = [o for o in coupling.groups_of(g.src)  # other readers of g.src's output
                          if (o.kind == "chain" and o.src == g.src and o.dst != dst)
                          or (o.kind == "mul" and not set(o.sites) <= sources) or o.kind == "dot"]
                if others:
                    why = f"{g.src}'s output also goes into a {others[0].kind} group"
            if why:
                break
        if (dst, "in") in coupling.boundaries and why is None:
            why = f"its input is also {', '.join(sorted(coupling.boundaries[(dst, 'in')]))}"
        if why:
            skipped[dst] = why
        else:
            units[dst] = list(zip(chains, rows))
    return units, skipped


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


@torch.no_grad()
def shrink(model: nn.Module, coupling: Coupling, samples: list) -> Shrink:
    """Remove the hidden units of ``model`` that carry nothing (see the module docstring), in place."""
    before = sum(p.numel() for p in model.parameters())
    chains_of, skipped = _units(coupling)
    seen = observe_inputs(model, list(chains_of), samples)
    units = []
    reference = None
    for dst, chains in chains_of.items():
        sources = tuple(g.src for g, _ in chains)
        d = model.get_submodule(dst)
        layers = [model.get_submodule(s) for s in sources]
        if not isinstance(d, nn.Linear) or not all(isinstance(s, nn.Linear) for s in layers):
            skipped[dst] = "its layers are not plain nn.Linear (make sparse layers dense first)"
            continue
        fused = [s for (_, rows), s in zip(chains, sources) if rows.shape[1] > 1]
        if fused and not samples:
            skipped[dst] = f"{fused[0]} holds several factors of its input: no sample inputs to check its shrinking on"
            continue
        rows_of = [torch.as_tensor(rows, device=d.weight.device) for _, rows in chains]  # per source, [width, r]
        unit = Unit(sources, dst, d.in_features)
        read = d.weight.ne(0).any(0)  # [in]: the column still has a weight
        # per source, [width]: every row feeding the column has no input weight / one such row has no bias either
        silent = [s.weight.eq(0).all(1)[r].all(1) for s, r in zip(layers, rows_of)]
        biasless = [(s.weight.eq(0).all(1) if s.bias is None else s.weight.eq(0).all(1) & s.bias.eq(0))[r].any(1)
                    for s, r in zip(layers, rows_of)]
        product = sum(r.shape[1] for r in rows_of) > 1  # the column is a product of several rows (act(gate) * up)
        values = seen.get(dst)
        observed = values is not None and len(values) > 0
        if observed:
            constant_cols = values.eq(values[:1]).all(0)
            zero_cols = values.eq(0).all(0)
        bias = d.bias.clone() if d.bias is not None else torch.zeros(d.out_features, dtype=d.weight.dtype,
                                                                     device=d.weight.device)
        for c in range(unit.width):
            if not bool(read[c]):
                unit.unused += 1
                continue
            all_silent = all(bool(s[c]) for s in silent)
            if observed and all_silent and bool(constant_cols[c]):
                bias += d.weight[:, c] * values[0, c]
                unit.folded += 1
                continue
            if observed and product and bool(zero_cols[c]) and any(bool(b[c]) for b in biasless):
                unit.zero += 1
                continue
            unit.kept.append(c)
        if unit.removed == 0:
            units.append(unit)
            continue
        if samples and reference is None:
            reference = _outputs(model, samples)
        keep = torch.tensor(unit.kept, dtype=torch.long, device=d.weight.device)
        kept_rows = {name: rows[keep].flatten().sort().values for name, rows in zip(sources, rows_of)}
        cuts = _parameter_cuts(coupling, sources, {n: r.tolist() for n, r in kept_rows.items()})
        if isinstance(cuts, str):
            skipped[dst] = f"{unit.removed} dead neuron(s) kept: {cuts}"
            continue
        previous = dict(zip((*sources, dst), (*layers, d)))
        for name, layer in zip(sources, layers):
            rows = kept_rows[name]  # in the layer's order: chunk() still splits it alike
            replace_module(model, name, _linear(layer.weight[rows], None if layer.bias is None else layer.bias[rows]))
        needs_bias = d.bias is not None or unit.folded > 0
        replace_module(model, dst, _linear(d.weight[:, keep], bias if needs_bias else None))
        undo = _cut_parameters(model, cuts)
        why = _check_unit(model, unit, fused, samples, reference) if samples else None
        if why is not None:
            for name, layer in previous.items():
                replace_module(model, name, layer)
            undo()
            skipped[dst] = why
            continue
        units.append(unit)
    heads = _shrink_heads(model, coupling, samples, skipped)
    return Shrink(units, skipped, before, sum(p.numel() for p in model.parameters()), heads)


def _head_rows(heads, head_dim: int) -> torch.Tensor:
    """The rows (or columns) of ``heads``, each ``head_dim`` wide, in order."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _outputs(model: nn.Module, samples: list) -> list[torch.Tensor]:
    return [t for batch in samples for t in tree_leaves(ExampleInputs.of(batch).call(model))
            if isinstance(t, torch.Tensor)]


def _check_unit(model: nn.Module, unit: Unit, fused: list[str], samples: list, reference: list) -> str | None:
    """None when the model with ``unit``'s neurons gone still matches ``reference`` on ``samples``
    (where one fused layer holds several factors, after trying the width attribute its module splits
    it by: ``unit.rewritten`` then names it), else why not."""
    what = f"{unit.removed} dead neuron(s) of {', '.join(unit.sources)} kept"
    hint = ("split its output by its size, e.g. chunk(2, -1)" if fused else
            "read the width of these features from the tensors, not from a fixed size")
    check = lambda: _checked(model, samples, reference, what, hint)  # noqa: E731
    why = check()
    if why is None or not fused:
        return why
    widths = _split_widths(model, fused[0], unit.width, len(unit.kept), check)
    if widths is None:
        parent = fused[0].rpartition(".")[0] or "the model"
        return f"{why}; nor with an integer attribute of {parent} equal to {unit.width} set to {len(unit.kept)}"
    unit.rewritten = widths
    return None


def _parameter_cuts(coupling: Coupling, sources: tuple[str, ...], kept_rows: dict[str, list[int]]
                    ) -> dict[tuple[str, int], torch.Tensor] | str:
    """The slices to keep of the parameters applied to the features of ``sources`` one slice per
    feature (a per-channel decay, a depthwise convolution): {(name, dim): kept indices}, or why
    they cannot follow the rows kept."""
    cuts: dict[tuple[str, int], torch.Tensor] = {}
    for site in sources:
        kept = set(kept_rows[site])
        for p in coupling.parameters.get(site, []):
            if p.dim is None:
                return f"{p.name} is applied to {site}'s features, one slice to several features"
            readers = sorted(s for s, params in coupling.parameters.items() if any(q.name == p.name for q in params))
            if not set(readers) <= set(sources):
                return f"{p.name} is applied to the features of {site} and of {', '.join(set(readers) - set(sources))}"
            slices = torch.tensor([j for j, f in enumerate(p.mapping.tolist()) if f < 0 or f in kept], dtype=torch.long)
            if (p.name, p.dim) in cuts and not torch.equal(cuts[(p.name, p.dim)], slices):
                return f"{p.name} is applied to features of {', '.join(sources)} that are not kept alike"
            cuts[(p.name, p.dim)] = slices
    return cuts


def _cut_parameters(model: nn.Module, cuts: dict[tuple[str, int], torch.Tensor]):
    """Keep the given slices of each parameter (or buffer), in place; a depthwise convolution whose
    weight is cut gets its channel counts set to match. Returns the function that undoes it all."""
    saved: list[tuple[nn.Module, str, object]] = []
    for (name, dim), slices in cuts.items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        cut = old.detach().index_select(dim, slices.to(old.device))
        saved.append((parent, leaf, old))
        setattr(parent, leaf, nn.Parameter(cut, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else cut)
        if isinstance(parent, nn.modules.conv._ConvNd) and leaf == "weight" and dim == 0 \
                and parent.groups == parent.in_channels == parent.out_channels == old.shape[0]:
            for attr in ("groups", "in_channels", "out_channels"):
                saved.append((parent, attr, getattr(parent, attr)))
                setattr(parent, attr, len(slices))

    def undo() -> None:
        for parent, attr, value in reversed(saved):
            setattr(parent, attr, value)
    return undo


@dataclass
class _HeadLayout:
    """Where an attention's heads sit: the rows of each q head, and of each kv head's k and v, in
    their sites. Separate layers, runs of one fused layer (GPT-2's c_attn) and heads interleaved in
    one (GPT-NeoX's q, k, v of head 0, then of head 1, ...) are all blocks of rows."""

    o: str
    head_dim: int  # q's rows per head
    share: dict[int, list[int]]  # kv head -> the q heads sharing it
    blocks: dict[str, list[np.ndarray]]  # role (q, k, v) -> rows of each of its heads, in head order
    o_width: int  # o's input columns per q head: v's head size

    def width(self, role: str) -> int:
        """The rows of one head of ``role`` (q, k or v)."""
        return len(self.blocks[role][0])

    @property
    def uniform(self) -> bool:
        """Whether q, k and v heads are all head_dim wide, the one head size the fallbacks rewrite."""
        return all(self.width(role) == self.head_dim for role in self.blocks)


def _blocks(features: np.ndarray, head_dim: int) -> list[np.ndarray] | None:
    """Sorted features cut into heads: runs of ``head_dim`` consecutive rows, or None."""
    if len(features) == 0 or len(features) % head_dim:
        return None
    runs = np.sort(features).reshape(-1, head_dim)
    return list(runs) if np.all(np.diff(runs, axis=1) == 1) else None


def _head_layout(coupling: Coupling, attention: Attention, layers: dict[str, nn.Module]):
    """(o, why not, layout) of an attention: ``why not`` is None when its heads can go, else the
    reason; None when the attention does not feed a linear layer."""
    dot = next((g for g in coupling.groups if g.kind == "dot" and (g.q, g.k) == (attention.q, attention.k)), None)
    chain = next((g for g in coupling.groups if g.kind == "chain" and g.src == attention.v and "attention" in g.trail),
                 None)
    shared = [g for g in coupling.groups if g.kind == "dot" and g.q == attention.q and g.k in attention.shared]
    if dot is None or chain is None or len(shared) != len(attention.shared):
        return None
    o = chain.dst
    if not all(isinstance(layers.get(n), nn.Linear) for n in (attention.q, attention.k, attention.v, o)):
        return o, "attention: its layers are not plain nn.Linear", None
    out, hd = layers[o], dot.head_dim
    not_heads = (o, "attention: its projections are not laid out as whole heads of one size", None)
    # each q head contracts head_dim rows: with its kv head's k rows, and with the rows of keys every
    # head reads alike (DeepSeek's rotary part), which stay whole
    q_heads, kv_heads, _ = dot.heads()
    k_width = hd - sum(len(np.unique(g.pairs[:, 1])) for g in shared)
    q_blocks = _blocks(np.unique(np.concatenate([g.pairs[:, 0] for g in (dot, *shared)])), hd)
    k_blocks = _blocks(np.unique(dot.pairs[:, 1]), k_width) if k_width > 0 else None
    if q_blocks is None or k_blocks is None or (len(q_blocks), len(k_blocks)) != (q_heads, kv_heads) \
            or out.in_features % len(q_blocks):
        return not_heads
    o_width = out.in_features // len(q_blocks)
    q_head = {int(r): i for i, b in enumerate(q_blocks) for r in b}
    k_head = {int(r): i for i, b in enumerate(k_blocks) for r in b}
    share_sets: dict[int, set[int]] = {}
    for qf, kf in dot.pairs:
        share_sets.setdefault(k_head[int(kf)], set()).add(q_head[int(qf)])
    share = {g: sorted(share_sets[g]) for g in sorted(share_sets)}
    if sorted(h for hs in share.values() for h in hs) != list(range(len(q_blocks))) or len(share) != len(k_blocks):
        return not_heads  # each q head reads exactly one kv head
    group_of = {h: g for g, hs in share.items() for h in hs}
    # o's columns of q head i read the v rows of i's kv head, a run of o_width rows per kv head
    v_blocks: dict[int, np.ndarray] = {}
    for i in range(len(q_blocks)):
        rows = chain.mapping[i * o_width:(i + 1) * o_width]
        if rows.min() < 0 or not np.all(np.diff(rows) == 1) or not np.array_equal(
                v_blocks.setdefault(group_of[i], rows), rows):
            return o, f"attention: {o}'s input columns do not follow the heads of {attention.v}", None
    blocks = {"q": q_blocks, "k": k_blocks, "v": [v_blocks[g] for g in range(len(k_blocks))]}
    sites = {"q": attention.q, "k": attention.k, "v": attention.v}
    rows_of: dict[str, list[np.ndarray]] = {}
    for role, site in sites.items():
        rows_of.setdefault(site, []).extend(blocks[role])
    if not all(np.array_equal(np.sort(np.concatenate(runs)), np.arange(layers[site].out_features))
               for site, runs in rows_of.items()):  # every row of each site is one head's, once
        return not_heads
    for site, runs in rows_of.items():
        across = sorted(_across_heads(coupling, site, runs))
        if across:
            return o, f"attention: {site}'s output is also read across heads ({'; '.join(across)})", None
    return o, None, _HeadLayout(o, hd, share, blocks, o_width)


def _across_heads(coupling: Coupling, site: str, runs: list[np.ndarray]) -> set[str]:
    """The reasons ``site``'s output is a boundary, less the reductions that never combine features
    of two of ``runs`` (its heads' rows): a norm over each head's features alone (Qwen3's and
    Gemma3's q_norm and k_norm) is unchanged for every head kept when whole heads go."""
    head = np.full(max(int(r.max()) for r in runs) + 1, -1)
    for i, r in enumerate(runs):
        head[r] = i
    reasons = set(coupling.boundaries.get((site, "out"), ()))
    for reason, together in coupling.reduced.get(site, {}).items():
        rows = [row[row >= 0] for row in together]
        if reason in reasons and all(len(np.unique(head[r])) == 1 for r in rows if len(r)):
            reasons.discard(reason)
    return reasons


def _checked(model: nn.Module, samples: list, reference: list, what: str, hint: str) -> str | None:
    """None when ``model``'s outputs on ``samples`` are within the scaled HEAD_TOLERANCE of
    ``reference``, else why not: ``what`` was kept, and for a model that does not run, ``hint``."""
    try:
        diff = max((float((a - b).abs().max()) for a, b in zip(reference, _outputs(model, samples)) if a.numel()),
                   default=0.0)
    except Exception as exc:  # the model's own code refused the new sizes
        return f"{what}, the model does not run without them ({first_line(exc)}); {hint}"
    limit = scaled_limit(HEAD_TOLERANCE, reference)
    if not diff <= limit:
        return f"{what}, the outputs moved by {diff:.3g} without them (limit {limit:.3g})"
    return None


def _split_widths(model: nn.Module, site: str, old: int, new: int, check) -> dict[str, int] | None:
    """A fused q/k/v layer is split by a width its module holds (GPT-2's ``split_size``): try each
    integer attribute of the layer's parent equal to ``old`` set to ``new``, alone, and keep the
    first with which ``check()`` passes. Returns {dotted attribute: new} or None (all restored)."""
    parent_name = site.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    for attr, value in list(vars(parent).items()):
        if attr.startswith("_") or type(value) is not int or value != old:
            continue
        setattr(parent, attr, new)
        if check() is None:
            return {f"{parent_name}.{attr}" if parent_name else attr: new}
        setattr(parent, attr, old)
    return None


def _head_counts(model: nn.Module, owner: str, old: tuple[int, int], new: tuple[int, int], check) -> tuple[dict, str]:
    """The attention's module holds its head counts and its views read them (Falcon's num_heads and
    num_kv_heads): set its integer attributes named for heads (not for their size: head_dim) that
    equal the old q or kv head count to the new count, together, and keep them when ``check()``
    passes. Returns ({dotted attribute: new}, "") or, all restored, ({}, what was tried; "" when no
    attribute matched)."""
    module = model.get_submodule(owner)
    counts = dict(zip(old[::-1], new[::-1]))  # q's count wins where both counts are equal
    changes = {a: counts[v] for a, v in vars(module).items()
               if not a.startswith("_") and type(v) is int and "head" in a.lower()
               and not {"dim", "size"} & set(a.lower().split("_")) and v in counts and counts[v] != v}
    if not changes:
        return {}, ""
    saved = {a: getattr(module, a) for a in changes}
    for attr, value in changes.items():
        setattr(module, attr, value)
    named = {f"{owner}.{a}" if owner else a: v for a, v in changes.items()}
    if check() is None:
        return named, ""
    for attr, value in saved.items():
        setattr(module, attr, value)
    return {}, ", ".join(f"{a} set to {v}" for a, v in named.items())


def _narrow_per_head(model: nn.Module, owner: str, heads: int, kept: list[int], check) -> list[str]:
    """The attention's module holds a parameter with one value per q head (gpt-oss's attention sinks,
    ``sinks.reshape(1, -1, 1, 1)`` beside the scores): cut each such parameter of its own (not of its
    layers) to the kept heads, and keep the cut when ``check()`` passes. Returns the dotted names
    cut, or [] with every parameter restored."""
    if not owner:
        return []
    module = model.get_submodule(owner)
    saved = {}
    for name, param in list(module.named_parameters(recurse=False)):
        dims = [d for d, size in enumerate(param.shape) if size == heads]
        if len(dims) == 1:
            saved[name] = param
            cut = param.detach().index_select(dims[0], torch.as_tensor(kept))
            setattr(module, name, nn.Parameter(cut, requires_grad=param.requires_grad))
    if saved and check() is None:
        return [f"{owner}.{name}" for name in saved]
    for name, param in saved.items():
        setattr(module, name, param)
    return []


def _through_graph(model: nn.Module, qkv: tuple[str, str, str], o: str, heads: tuple[int, int],
                   kept: tuple[int, int], head_dim: int, before: dict[str, nn.Module], samples: list, check,
                   why: str, roles: dict, kept_heads: list[int]) -> tuple[str | None, str | None]:
    """Replace the module owning an attention by its graph asking for ``kept`` of ``heads`` (q heads,
    kv heads; passes.retrace),
    with the shrunk layers now in ``model`` in it. Returns (None, its name) when ``check()`` passes,
    else (``why`` and why not, None) with the owner put back; the old layers in ``before`` are in
    ``model`` again either way."""
    shrunk = {name: model.get_submodule(name) for name in before}
    for name, layer in before.items():  # captured as it was: with the old sizes, the model runs
        replace_module(model, name, layer)
    owner = owner_of((*qkv, o))
    if not owner:
        return why + "; nor through its graph: the attention's layers are not inside one submodule", None
    try:
        graph = traced_with_fewer_heads(model, owner, qkv, o, heads, kept, head_dim, shrunk, samples[0], roles,
                                        kept_heads)
    except RuntimeError as exc:
        return f"{why}; nor through its graph: {exc}", None
    original = model.get_submodule(owner)
    replace_module(model, owner, graph)
    failed = check()
    if failed is None:
        return None, owner
    replace_module(model, owner, original)
    return f"{why}; nor through its graph with the sizes rewritten ({failed})", None


def _dead_groups(share: dict, blocks: dict, o_width: int, v: nn.Linear, out: nn.Linear) -> dict[int, torch.Tensor | None]:
    """The head groups nothing reads (o's columns of their heads empty) or whose v rows lost every
    input: group -> its constant contribution to o's output (v's bias through o), if any."""
    dead: dict[int, torch.Tensor | None] = {}
    for g, heads in share.items():
        cols = _head_rows(heads, o_width)
        rows = torch.as_tensor(blocks["v"][g])
        if out.weight[:, cols].eq(0).all():
            dead[g] = None
        elif v.weight[rows].eq(0).all():
            constant = v.bias is not None and bool(v.bias[rows].ne(0).any())
            dead[g] = out.weight[:, cols] @ v.bias[rows].repeat(len(heads)) if constant else None
    return dead


def _why_none_go(dead: dict, share: dict) -> str | None:
    """Why no group can go, or None; keeps one group when all are dead (``dead`` changes in place):
    an attention without heads is not a valid model."""
    if len(dead) == len(share):
        dead.pop(min(dead))
        if not dead:
            return "attention: its only head group is dead, and an attention keeps at least one"
    if not dead:
        return "attention: no whole head (grouped-query group) is dead; dimensions within heads are not shrunk"
    return None


def _swap_in_kept_heads(model: nn.Module, layers: dict, sites: dict[str, str], blocks: dict, heads_of: dict,
                        o: str, o_width: int, bias: torch.Tensor, folded: int) -> dict[str, list[torch.Tensor]]:
    """Replace q, k, v by their kept rows and o by its kept columns (with ``bias``, where dead groups'
    constants were folded). Returns each q/k/v site's kept rows, role by role."""
    rows_of: dict[str, list[torch.Tensor]] = {}
    for role, site in sites.items():
        rows_of.setdefault(site, []).append(torch.as_tensor(np.concatenate([blocks[role][h] for h in heads_of[role]])))
    for site, parts in rows_of.items():
        layer, rows = layers[site], torch.cat(parts).sort().values
        replace_module(model, site, _linear(layer.weight[rows], None if layer.bias is None else layer.bias[rows]))
    out = layers[o]
    replace_module(model, o, _linear(out.weight[:, _head_rows(heads_of["q"], o_width)],
                                     bias if out.bias is not None or folded else None))
    return rows_of


def _try_split_width(model: nn.Module, layout, blocks: dict, sites: dict[str, str], rows_of: dict, check,
                     why: str) -> tuple[str | None, dict[str, int]]:
    """Roles of one fused layer, as wide as each other before and after: try its split width."""
    fused = [site for site in rows_of if len(rows_of[site]) > 1]
    old_widths = {len(blocks[role]) * layout.width(role) for role, site in sites.items() if site in fused}
    if not (len(fused) == 1 and len(old_widths) == 1 and len({len(r) for r in rows_of[fused[0]]}) == 1):
        return why, {}
    old, new = old_widths.pop(), len(rows_of[fused[0]][0])
    widths = _split_widths(model, fused[0], old, new, check)
    if widths is not None:
        return None, widths
    parent = fused[0].rpartition(".")[0] or "the model"
    return why + f"; nor with an integer attribute of {parent} equal to {old} set to {new}", {}


def _shrink_attention(model: nn.Module, coupling: Coupling, attention: Attention, samples: list, reference: dict,
                      skipped: dict[str, str]) -> Heads | None:
    """Drop the dead head groups of one attention when the model still runs and matches after (see
    :func:`_shrink_heads`); else say why in ``skipped`` and return None. ``reference`` caches the
    model's outputs before any change."""
    layers = {n: model.get_submodule(n) for n in coupling.sites.sites}
    found = _head_layout(coupling, attention, layers)
    if found is None:
        return None
    o, why_not, layout = found
    if why_not is not None or not samples:
        skipped[o] = why_not or "attention: no sample inputs to check a change of heads on"
        return None
    share, blocks, ow = layout.share, layout.blocks, layout.o_width
    counts = (sum(len(h) for h in share.values()), len(share))  # q heads, kv heads
    owner = owner_of((attention.q, attention.k, attention.v, o))  # the module holding the attention
    sites = {"q": attention.q, "k": attention.k, "v": attention.v}
    out = layers[o]
    dead = _dead_groups(share, blocks, ow, layers[attention.v], out)
    why_none = _why_none_go(dead, share)
    if why_none is not None:
        skipped[o] = why_none
        return None
    bias = out.bias.clone() if out.bias is not None else out.weight.new_zeros(out.out_features)
    constants = [c for c in dead.values() if c is not None]
    for c in constants:
        bias += c
    folded = len(constants)
    kept_kv = [g for g in share if g not in dead]
    kept = sorted(h for g in kept_kv for h in share[g])
    if "outputs" not in reference:
        reference["outputs"] = _outputs(model, samples)
    heads_of = {"q": kept, "k": kept_kv, "v": kept_kv}
    before = {n: layers[n] for n in (*sites.values(), o)}
    rows_of = _swap_in_kept_heads(model, layers, sites, blocks, heads_of, o, ow, bias, folded)
    check = lambda: _checked(model, samples, reference["outputs"], f"attention: {len(dead)} dead head group(s) kept",  # noqa: E731
                             "read the head count from the tensors, e.g. view(B, T, -1, head_dim)")
    why = check()
    narrowed: list[str] = []
    if why is not None:
        narrowed = _narrow_per_head(model, owner, counts[0], kept, check)
        why = None if narrowed else why
    rewritten: dict[str, int] = {}
    if why is not None:
        why, rewritten = _try_split_width(model, layout, blocks, sites, rows_of, check, why)
    if why is not None:  # the head counts its module holds
        attributes, tried = _head_counts(model, owner, counts, (len(kept), len(kept_kv)), check)
        if attributes:
            why, rewritten = None, attributes
        elif tried:
            why += f"; nor with {tried}"
    traced = None
    if why is not None and not layout.uniform:
        why += (f"; its graph is not rewritten: its heads are {layout.width('q')} rows of q, {layout.width('k')} "
                f"of k and {layout.width('v')} of v, and the rewrite knows one head size")
    elif why is not None:  # try its graph, with the sizes rewritten
        roles = {role: (np.concatenate(blocks[role]), np.concatenate([blocks[role][h] for h in heads_of[role]]))
                 for role in sites}
        why, traced = _through_graph(model, (attention.q, attention.k, attention.v), o, counts,
                                     (len(kept), len(kept_kv)), layout.head_dim, before, samples, check, why,
                                     roles, kept)
    if why is not None:
        for name, layer in before.items():
            replace_module(model, name, layer)
        skipped[o] = why
        return None
    skipped.pop(o, None)
    return Heads((attention.q, attention.k, attention.v), o, *counts, kept, kept_kv, folded, rewritten, traced,
                 narrowed)


@torch.no_grad()
def _shrink_heads(model: nn.Module, coupling: Coupling, samples: list, skipped: dict[str, str]) -> list[Heads]:
    """Drop the dead heads (whole grouped-query groups) of every attention, keeping each change only
    when the model's outputs on ``samples`` stay within HEAD_TOLERANCE. The checks also run the
    first sample with another number of rows: a graph captured for the model must take any."""
    other = other_rows(ExampleInputs.of(samples[0])) if samples else None
    samples = samples + [other] if other is not None else samples
    reference: dict = {}  # the model's outputs before any change, computed once a change is tried
    done = [_shrink_attention(model, coupling, attention, samples, reference, skipped) for attention in coupling.attentions]
    return [heads for heads in done if heads is not None]


SHRINK = GraphPass("shrink", shrink, SparsifyError)
