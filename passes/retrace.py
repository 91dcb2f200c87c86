"""Fewer heads for an attention whose code fixes the head count.

nanoGPT's attention views q, k and v as ``view(B, T, self.n_head, C // self.n_head)`` and merges
the heads back with ``view(B, T, C)``, where C is the residual width: with fewer heads, its code
no longer runs. This pass replaces the module that owns the attention's layers by its graph,
captured with ``torch.export``, in which the sizes are literals that can be rewritten:

- a split of a fused q/k/v layer's output into parts of the old width (``split(n_embd, dim=2)``)
  splits at the new width;
- a view of q, k or v from ``[..., heads * head_dim]`` to ``[..., heads, head_dim]`` asks for the
  heads kept;
- a view of the attention's output from ``[..., heads, head_dim]`` back to ``[..., heads *
  head_dim]`` on its way into o asks for the new width.

Only sizes on the path from q, k and v to o change; the batch and sequence dimensions stay as
dynamic as torch.export found them, and every other literal is left alone. Under grouped-query
attention, q's views ask for the q heads kept, k's and v's for the kv heads kept, and the
repetition of kv heads follows (``expand`` to ``[.., kv, n_rep, ..]`` and the view merging them
into the q heads, as LLaMA's ``repeat_kv`` writes it). q and k/v come from separate layers, or from
one fused layer sliced at fixed offsets (Phi-3's ``qkv[..., :query_pos]``): each slice that takes
exactly one role's rows is moved to where those rows sit among the rows kept. A tensor from
outside that path holding one value per head (T5's position bias added to the scores, a learned gain
per head) is narrowed to the heads kept where it meets them: the graph is run once on the sample
inputs, and an elementwise op whose operand from q, k or v now has the kept heads where the other
operand has the old count gets that operand's kept heads (``index_select``). The caller checks
the rewritten model's outputs and undoes the change when they moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn
from torch.fx._pytree import tree_flatten_spec

from sparsify.errors import first_line
from sparsify.inputs import ExampleInputs
from sparsify.passes.capture import auto_dynamic, keywords_named, replace_module

VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}
SPLITS = {torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default}
SLICES = {torch.ops.aten.slice.Tensor}
EXPANDS = {torch.ops.aten.expand.default}
TRANSPOSES = {torch.ops.aten.transpose.int, torch.ops.aten.permute.default}
BROADCASTING = {torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor, torch.ops.aten.sub.Tensor,
                torch.ops.aten.mul.Tensor, torch.ops.aten.mul_.Tensor, torch.ops.aten.div.Tensor,
                torch.ops.aten.where.self, torch.ops.aten.masked_fill.Scalar, torch.ops.aten.masked_fill.Tensor,
                torch.ops.aten.scaled_dot_product_attention.default}  # its mask broadcasts against the scores


def _merges_repeats(shape: tuple, size: list, kv_heads: int, q_heads: int) -> bool:
    """Whether a view of ``shape`` to ``size`` merges adjacent kv-head and repeat axes into the q heads
    (``[.., kv, n_rep, ..] -> [.., kv * n_rep, ..]``, as repeat_kv does)."""
    if q_heads not in size or len(shape) != len(size) + 1:
        return False
    i = size.index(q_heads)
    return shape[i] == kv_heads and shape[i + 1] == q_heads // kv_heads


def owner_of(names) -> str:
    """The innermost module holding every one of the dotted layer ``names`` ("" for the model)."""
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _owner_inputs(model: nn.Module, owner: nn.Module, sample) -> tuple[tuple, dict]:
    """The positional and keyword inputs ``owner`` receives when ``model`` runs on ``sample``."""
    seen = []
    hook = owner.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            ExampleInputs.of(sample).call(model)
    finally:
        hook.remove()
    if not seen:
        raise RuntimeError("it never ran on the sample inputs")
    return seen[0]


def _shape(node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _reachable(starts, forward: bool) -> set:
    seen, todo = set(), list(starts)
    while todo:
        node = todo.pop()
        for nxt in (node.users if forward else node.all_input_nodes):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _linear_calls(graph: fx.Graph, rel: str) -> list[fx.Node]:
    """The aten.linear calls of the layer at ``rel`` (its weight read from the graph's attributes)."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default
            and isinstance(n.args[1], fx.Node) and n.args[1].op == "get_attr" and n.args[1].target == f"{rel}.weight"]


def _slice_roles(graph: fx.Graph, sources: list, roles: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Slices of a fused layer's output along its features that take exactly one role's rows
    (``roles``: role -> (its rows, its rows kept)), moved to where the kept rows of that role sit
    among all the rows kept. Returns {slice node: (role, its new arguments)}."""
    kept = np.sort(np.concatenate([rows for _, rows in roles.values()]))
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in SLICES or node.args[0] not in sources:
            continue
        shape = _shape(node.args[0])
        given = node.args[1:5]
        dim, start, end, step = (*given, *(0, None, None, 1)[len(given):])
        start = 0 if start is None else start
        if not shape or dim not in (-1, len(shape) - 1) or step != 1 or not isinstance(start, int) or start < 0 \
                or not isinstance(end, (int, type(None))):
            continue
        end = shape[-1] if end is None else min(end, shape[-1])
        role = next((r for r, (rows, _) in roles.items() if np.array_equal(np.sort(rows), np.arange(start, end))), None)
        if role is None:
            continue
        found[node] = role, (node.args[0], dim, int(np.searchsorted(kept, start)), int(np.searchsorted(kept, end)),
                             *node.args[4:])
    return found


def _copies_before_views(graph: fx.Graph) -> None:
    """A contiguous copy between every transpose or permute and a view or reshape of its output.
    The captured graph drops a ``contiguous()`` it found redundant for its sample sizes; re-captured
    with dynamic sizes for export, the reshape of the transposed tensor is then taken for a view
    and refused (T5's attention output). The copy costs nothing in ONNX (an Identity)."""
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_function" and node.target in VIEWS else None
        if isinstance(source, fx.Node) and source.op == "call_function" and source.target in TRANSPOSES:
            with graph.inserting_before(node):
                copy = graph.call_function(torch.ops.aten.clone.default, (source,),
                                           {"memory_format": torch.contiguous_format})
            node.replace_input_with(source, copy)


def _per_head_operands(gm: fx.GraphModule, inputs: list, path: set, q_heads: int, kept: list[int]) -> int:
    """Run ``gm`` on ``inputs`` (its flat placeholders) and, at every elementwise op on ``path``
    (from q, k, v to o) with an operand from off the path that holds ``q_heads`` values along an
    axis where an operand from the path now holds ``len(kept)``, select that operand's ``kept``
    heads. Returns how many operands were narrowed."""
    graph, fixes = gm.graph, []

    class Narrowing(fx.Interpreter):
        def run_node(self, node):
            if node.op != "call_function" or node.target not in BROADCASTING or node not in path:
                return super().run_node(node)
            values = {a: self.env[a] for a in node.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)}
            ours = [v for a, v in values.items() if a in path]
            for arg, value in values.items():
                if arg in path:
                    continue
                axes = [i for i in range(1, value.dim() + 1) if value.shape[-i] == q_heads
                        and any(o.dim() >= i and o.shape[-i] == len(kept) for o in ours)]
                if len(axes) == 1:
                    fixes.append((node, arg, value.dim() - axes[0]))
                    self.env[arg] = value.index_select(value.dim() - axes[0], torch.tensor(kept, device=value.device))
            result = super().run_node(node)
            for arg, value in values.items():
                self.env[arg] = value  # other users of the operand see it whole
            return result

    try:
        with torch.no_grad():
            Narrowing(gm).run(*inputs, enable_io_processing=False)
    except Exception as exc:
        raise RuntimeError(f"its graph does not run with the heads kept: {first_line(exc)}") from exc
    if fixes:
        gm.register_buffer("_kept_heads", torch.tensor(kept))
    for node, arg, axis in fixes:
        with graph.inserting_before(node):
            index = graph.get_attr("_kept_heads")
            narrowed = graph.call_function(torch.ops.aten.index_select.default, (arg, axis, index))
        node.replace_input_with(arg, narrowed)
    return len(fixes)


@dataclass
class _Paths:
    """Where q, k, v and o sit in the captured graph: their linear calls, and the nodes on the way
    from q, k, v to o (``ahead``), from q alone (``from_q``), from k or v (``from_kv``), and the
    nodes that feed o (``behind``)."""

    calls: dict[str, list[fx.Node]]
    sources: list[fx.Node]
    into: list[fx.Node]
    after: set
    ahead: set
    from_q: set
    from_kv: set
    behind: set = field(default_factory=set)


def _captured_owner(model: nn.Module, owner_name: str, owner: nn.Module, sample) -> tuple[fx.GraphModule, tuple, dict]:
    """``owner`` captured with ``torch.export`` on the inputs it receives when ``model`` runs on
    ``sample`` (every dimension dynamic where it allows); with those inputs."""
    args, kwargs = _owner_inputs(model, owner, sample)
    try:
        with torch.no_grad():
            named = keywords_named(owner, kwargs)
            program = torch.export.export(named, args, kwargs, dynamic_shapes=auto_dynamic(named, args, kwargs), strict=False)
    except Exception as exc:
        raise RuntimeError(f"torch.export cannot capture {owner_name or 'the model'}: {first_line(exc)}") from exc
    return program.module(), args, kwargs


def _paths(graph: fx.Graph, rel: dict[str, str], qkv: tuple[str, str, str], o: str) -> _Paths:
    q, k, v = qkv
    calls = {site: _linear_calls(graph, rel[site]) for site in dict.fromkeys(qkv)}
    sources = [c for found in calls.values() for c in found]
    into = _linear_calls(graph, rel[o])
    if not all(calls.values()) or len(into) != 1:
        raise RuntimeError("its graph does not call q, k and v and then o once each")
    after = _reachable(into, forward=True)
    return _Paths(calls, sources, into, after,
                  ahead=_reachable(sources, forward=True) - after,  # between q, k, v and o
                  from_q=_reachable(calls[q], forward=True) - after,
                  from_kv=_reachable(calls[k] + calls[v], forward=True) - after)


def _move_fused_slices(graph: fx.Graph, paths: _Paths, qkv: tuple[str, str, str], fused_gqa: bool,
                       roles: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> int:
    """Move the slices that cut one fused layer's output into q, k and v to the rows kept (q's and
    k/v's paths then start at the slices). Returns how many slices moved."""
    q, k, v = qkv
    sliced = _slice_roles(graph, paths.sources, roles) if q in (k, v) and roles is not None else {}
    if {role for role, _ in sliced.values()} != {"q", "k", "v"}:
        if fused_gqa:
            raise RuntimeError("grouped-query attention from one fused layer: its graph does not slice q, k and v "
                               "apart at fixed offsets")
        return 0
    for node, (_, new_args) in sliced.items():  # one layer's rows, sliced apart at fixed offsets
        node.args = new_args
    starts = {part: [n for n, (role, _) in sliced.items() if (role == "q") == (part == "q")] for part in ("q", "kv")}
    paths.from_q = (_reachable(starts["q"], forward=True) | set(starts["q"])) - paths.after
    paths.from_kv = (_reachable(starts["kv"], forward=True) | set(starts["kv"])) - paths.after
    return len(sliced)


def _split_args(node: fx.Node, source: fx.Node, width: int, new_width: int) -> tuple | None:
    """A split of a fused layer's output into pieces of ``width``, cut into pieces of ``new_width``."""
    sizes = node.args[1]
    if node.target is torch.ops.aten.split.Tensor and sizes == width:
        return (source, new_width, *node.args[2:])
    if isinstance(sizes, (list, tuple)) and set(sizes) == {width}:
        return (source, [new_width] * len(sizes), *node.args[2:])
    return None


def _resized(node: fx.Node, shape: tuple, paths: _Paths, qkv: tuple[str, str, str], heads: tuple[int, int],
             kept: tuple[int, int], head_dim: int) -> list:
    """The size a view or expand on the way from q, k, v to o asks for with the heads kept."""
    (q_heads, kv_heads), (q_kept, kv_kept) = heads, kept
    q, k, v = qkv
    width, kv_width = q_heads * head_dim, kv_heads * head_dim
    size = list(node.args[1])
    q_only = node in paths.from_q and node not in paths.from_kv
    kv_only = node in paths.from_kv and node not in paths.from_q
    if node.target in EXPANDS:  # kv heads repeated for grouped-query attention: [.., kv, n_rep, ..]
        aligned = (None,) * (len(size) - len(shape)) + shape  # expand aligns the trailing dimensions
        for i in [i for i, (old, new) in enumerate(zip(aligned, size)) if kv_only and old == new == kv_heads
                  and i < len(size) - 1]:
            size[i] = kv_kept
    elif len(size) >= 2 and size[-2:] == [q_heads, head_dim] and shape[-1] == width and (q_only or q in (k, v)):
        size[-2] = q_kept  # q (or a fused layer's q, k and v) into heads
    elif len(size) >= 2 and size[-2:] == [kv_heads, head_dim] and shape[-1] == kv_width and kv_only:
        size[-2] = kv_kept  # k or v into heads
    elif kv_only and q_heads != kv_heads and _merges_repeats(shape, size, kv_heads, q_heads):
        size[size.index(q_heads)] = q_kept  # repeated kv heads merged: [.., kv, n_rep, ..] -> [.., heads, ..]
    elif node in paths.behind and len(shape) >= 2 and shape[-2:] == (q_heads, head_dim) and size[-1] == width:
        size[-1] = q_kept * head_dim  # the heads merged on their way into o
    return size


def _rewrite_head_sizes(graph: fx.Graph, paths: _Paths, qkv: tuple[str, str, str], heads: tuple[int, int],
                        kept: tuple[int, int], head_dim: int) -> int:
    """Make the splits, views and expands between q, k, v and o ask for the heads kept. Returns how
    many nodes changed."""
    width = heads[0] * head_dim
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node not in paths.ahead:
            continue
        source = node.args[0]
        shape = _shape(source)
        if not shape:
            continue
        if node.target in SPLITS and source in paths.sources and shape[-1] % width == 0:  # a fused layer: q_heads == kv_heads
            new_args = _split_args(node, source, width, kept[0] * head_dim)
            if new_args is not None:
                node.args = new_args
                rewritten += 1
            continue
        if node.target not in VIEWS | EXPANDS or not isinstance(node.args[1], (list, tuple)):
            continue
        size = _resized(node, shape, paths, qkv, heads, kept, head_dim)
        if size == list(node.args[1]):
            continue
        node.args = (source, size, *node.args[2:])
        rewritten += 1
    return rewritten


def _linears_as_modules(gm: fx.GraphModule, owner: nn.Module, shrunk: dict[str, nn.Linear]) -> None:
    """Every plain nn.Linear call of the owner becomes a call of its module again (the shrunk layer
    where there is one), so store_sparse finds it; raises when a shrunk layer is not called so."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        weight, bias = node.args[1], node.args[2] if len(node.args) > 2 else None
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            continue
        name = weight.target[:-len(".weight")]
        layer = shrunk.get(name)
        if layer is None:
            layer = _plain_linear(owner, name)
        if layer is None:
            continue
        plain = bias is None if layer.bias is None else (isinstance(bias, fx.Node) and bias.op == "get_attr"
                                                         and bias.target == f"{name}.bias")
        if not plain:
            continue
        replace_module(gm, name, layer)
        with graph.inserting_before(node):
            call = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    missing = set(shrunk) - {n.target for n in graph.nodes if n.op == "call_module"}
    if missing:
        raise RuntimeError(f"its graph does not call {', '.join(sorted(missing))} as a linear layer")
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


def _plain_linear(owner: nn.Module, name: str) -> nn.Linear | None:
    try:
        layer = owner.get_submodule(name)
    except AttributeError:
        return None
    return layer if type(layer) is nn.Linear else None


def traced_with_fewer_heads(model: nn.Module, owner_name: str, qkv: tuple[str, str, str], o: str,
                            heads: tuple[int, int], kept: tuple[int, int], head_dim: int,
                            layers: dict[str, nn.Linear], sample,
                            roles: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                            kept_heads: list[int] | None = None) -> fx.GraphModule:
    """The module ``owner_name`` of ``model`` captured as a graph whose sizes ask for ``kept`` of
    ``heads`` heads (q heads, kv heads), with ``layers`` (dotted name in ``model`` -> the shrunk
    layer) in it. ``roles`` (q, k, v -> (rows, rows kept) in their layer) places the slices of a
    fused layer; ``kept_heads`` (the q heads kept, by index) narrows tensors holding a value per
    head. Raises RuntimeError (why) when the graph cannot be made. ``model`` is not changed."""
    owner = model.get_submodule(owner_name) if owner_name else model
    prefix = owner_name + "." if owner_name else ""
    q, k, v = qkv
    fused_gqa = heads[0] != heads[1] and q in (k, v)
    if fused_gqa and roles is None:
        raise RuntimeError("grouped-query attention from one fused layer needs the rows of q, k and v")
    gm, args, kwargs = _captured_owner(model, owner_name, owner, sample)
    graph = gm.graph
    rel = {n: n[len(prefix):] for n in (*qkv, o)}
    paths = _paths(graph, rel, qkv, o)
    rewritten = _move_fused_slices(graph, paths, qkv, fused_gqa, roles)
    paths.behind = _reachable(paths.into[0].all_input_nodes, forward=False) | set(paths.into[0].all_input_nodes)
    rewritten += _rewrite_head_sizes(graph, paths, qkv, heads, kept, head_dim)
    _linears_as_modules(gm, owner, {rel[name]: layer for name, layer in layers.items()})
    if kept_heads is not None and len(kept_heads) < heads[0]:
        inputs = tree_flatten_spec((args, kwargs), gm._in_spec)  # the graph's placeholders, in order
        rewritten += _per_head_operands(gm, inputs, paths.ahead, heads[0], kept_heads)
    if not rewritten:
        raise RuntimeError("neither a size in its graph nor a tensor with a value per head asks for the head count")
    _copies_before_views(graph)
    graph.lint()
    gm.recompile()
    return gm
