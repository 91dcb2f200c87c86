"""Plan pass: the policy's rules applied to the linear sites (first match wins).

"Where" (the rules' matches) stays separate from "what" (the resolved LayerSpec): the plan
records, for every site, which rule matched and the spec it gets, plus the rules that matched
nothing, so ``sparsify inspect`` can explain every decision.
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from sparsify.csr_linear import CsrLinear, csr_density_limit
from sparsify.errors import PlanError
from sparsify.passes.couple import ChainGroup, Coupling
from sparsify.passes.find_linears import Sites
from sparsify.passes.graph_pass import GraphPass
from sparsify.policy import LayerSpec, Policy, Rule
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.initial import CALIBRATED_INIT, INIT_TOPOLOGIES, link_count

AVAILABLE_BACKENDS = {"masked", "csr"}


def resolved_backend(spec: LayerSpec, shape: tuple[int, int], sharded: bool = False) -> str:
    """The backend a layer of ``shape`` (out, in) gets: the policy's, or for 'auto' the one measured
    faster for that shape at its initial density (:func:`~sparsify.csr_linear.csr_density_limit`);
    masked when FSDP shards the parameters (csr's values cannot be sharded by the layer's rows)."""
    if spec.backend != "auto":
        return spec.backend
    if sharded:
        return "masked"
    return "csr" if spec.initial_density <= csr_density_limit(*shape) else "masked"


@dataclass
class Decision:
    site: str
    rule: Rule | None
    spec: LayerSpec | None  # None: left dense

    @property
    def rule_text(self) -> str:
        if self.rule is None:
            return "(unmatched: defaults)" if self.spec is not None else "(unmatched: skip)"
        return self.rule.describe() + (" skip" if self.rule.skip else "")


@dataclass
class Plan:
    decisions: dict[str, Decision]
    unused_rules: list[Rule] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)
    shadowed: dict[int, list[str]] = field(default_factory=dict)  # unused rule -> layers earlier rules took
    notes: list[str] = field(default_factory=list)  # specs a layer can take but probably should not
    raw_input_layers: list[str] = field(default_factory=list)  # linear layers that read the model's input
    sharded: bool = False  # training.distributed: fsdp, so backend auto resolves to masked
    # sparse layers whose output a dense linear layer reads (a chain of the coupling): the csr backend
    # returns their output contiguous, the layout torch's linear reads fast
    read_by_dense: set[str] = field(default_factory=set)

    @property
    def sparse(self) -> dict[str, LayerSpec]:
        return {n: d.spec for n, d in self.decisions.items() if d.spec is not None}

    def warnings(self) -> list[str]:
        """One line per rule that applies to no linear layer (with the names it may have meant), then
        the notes on layers' specs."""
        return [_unused(rule, self.layer_names, self.shadowed.get(rule.index, [])) for rule in self.unused_rules] \
            + self.notes


def _unused(rule: Rule, names: list[str], shadowed: list[str]) -> str:
    where = f" (line {rule.line})" if rule.line else ""
    if shadowed:
        return (f"{rule.describe()}{where} applies to no linear layer: an earlier rule takes every layer it "
                f"matches ({', '.join(shadowed[:3])}{', ...' if len(shadowed) > 3 else ''}); the first "
                "matching rule wins, so move it up or narrow the earlier rule")
    text = f"{rule.describe()}{where} matches no linear layer"
    if rule.match_kind == "name":
        close = difflib.get_close_matches(rule.pattern, names, n=3, cutoff=0.5)
        return text + (f"; did you mean {', '.join(close)}?" if close else "")
    if rule.match_kind == "regex":
        near = [n for n in names if re.search(rule.pattern, n)]
        if near:
            return text + (f"; it is found inside {', '.join(near[:3])} but must match the whole name "
                           "(add .* at either end)")
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return text + f"; the linear layers are {shown or '(none)'}"


def _enclosing_types(model: nn.Module, name: str) -> tuple[str, ...]:
    """Class names of the layer and of every module containing it, innermost first."""
    types, parts = [], name.split(".")
    for i in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:i]))
        types += [type(module).__name__, f"{type(module).__module__}.{type(module).__qualname__}"]
    return tuple(types)


def init_parameters(model_name: str) -> set[str]:
    """The parameters a policy may give an initial topology (its keyword-only arguments)."""
    fn = INIT_TOPOLOGIES[model_name]
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "inputs"}


def plan(model: nn.Module, sites: Sites, policy: Policy, coupling: Coupling | None = None) -> Plan:
    """Decide, for every site, its rule and spec. Raises PlanError when nothing would be sparse."""
    decisions, used, matching, notes = {}, set(), {}, []
    sharded = policy.training_config().distributed == "fsdp"
    raw = [n for n in sites.sites if coupling is not None
           and "model input" in coupling.boundaries.get((n, "in"), set())]
    for name, site in sites.sites.items():
        types = _enclosing_types(model, name)
        for r in policy.rules:
            if r.matches(name, types):
                matching.setdefault(r.index, []).append(name)
        rule = policy.match(name, types)
        if rule is not None:
            used.add(rule.index)
        if (rule is not None and rule.skip) or (rule is None and policy.unmatched == "skip"):
            decisions[name] = Decision(name, rule, None)
            continue
        spec = policy.resolve(rule)
        note = _check(name, site.out_features, site.in_features, spec, rule, policy, sharded)
        if note:
            notes.append(note)
        _check_weights(name, model.get_submodule(name), rule, policy)
        _check_calibrated(name, spec, rule, policy, coupling, raw)
        decisions[name] = Decision(name, rule, spec)
    unused = [r for r in policy.rules if r.index not in used]
    shadowed = {r.index: matching[r.index] for r in unused if r.index in matching}
    result = Plan(decisions, unused, list(sites.sites), shadowed, notes, raw, sharded)
    if coupling is not None:
        result.read_by_dense = {g.src for g in coupling.groups if isinstance(g, ChainGroup)
                                and g.src in result.sparse and g.dst not in result.sparse}
    if not result.sparse:
        names = ", ".join(list(sites.sites)[:6]) + (", ..." if len(sites.sites) > 6 else "")
        raise PlanError(
            f"{policy.source}: the policy makes no layer sparse. The model's linear layers are: "
            f"{names or '(none)'}. Add a rule that matches them, or set 'unmatched: sparsify'.")
    return result


def _check(name: str, out_features: int, in_features: int, spec: LayerSpec, rule: Rule | None,
           policy: Policy, sharded: bool = False) -> str | None:
    """Raise PlanError for a spec this layer cannot take; return a warning for one it can but probably
    should not."""
    layer = f"{rule.describe() if rule else 'defaults'}: layer {name}"
    where = f"{policy.source}: {layer}"
    if sharded and spec.backend == "csr":
        raise PlanError(f"{where}: backend csr cannot be sharded by FSDP (training.distributed: fsdp), whose "
                        "shards are rows of a dense weight; use backend masked (auto picks masked under fsdp), "
                        "or training.distributed: ddp")
    if spec.init["model"] not in INIT_TOPOLOGIES:
        raise PlanError(f"{where}: initial topology {spec.init['model']!r} is not available; "
                        f"available: {', '.join(INIT_TOPOLOGIES)}")
    given = set(spec.init) - {"model", "weights"}
    allowed = init_parameters(spec.init["model"])
    if given - allowed:
        takes = f"takes {', '.join(sorted(allowed))}" if allowed else "takes no parameters"
        raise PlanError(f"{where}: init.{sorted(given - allowed)[0]} is not a parameter of the "
                        f"{spec.init['model']} topology ({spec.init['model']} {takes})")
    if spec.update is None and spec.density_decay.kind != "none":
        raise PlanError(f"{where}: density_decay {spec.density_decay.kind!r} needs topology updates, but "
                        f"method {spec.method!r} has none; give 'update: {{every: N, unit: steps}}' or a method "
                        "that updates (GMP prunes gradually)")
    note = None
    for which, density in (("density", spec.initial_density), ("final density", spec.density)):
        links = link_count(out_features, in_features, density)
        if links < 1:
            raise PlanError(f"{where} ({out_features}x{in_features}): {which} {density:g} leaves "
                            f"no link (round(density*out*in) = 0); the smallest density that keeps one link is "
                            f"{0.5 / (out_features * in_features):.2g}")
        if links < out_features and note is None:  # (an input neuron without links is only an unused feature)
            note = (f"{layer} ({out_features}x{in_features}): {which} {density:g} gives {links} links for "
                    f"{out_features} output neurons, so at least {out_features - links} output neurons have no "
                    f"input and emit a constant; a density of at least {1 / in_features:.3g} gives each one a link")
    return note


def _check_weights(name: str, layer: nn.Module, rule: Rule | None, policy: Policy) -> None:
    """Initial topologies and link rankings compare weights: a NaN or inf makes them meaningless."""
    if isinstance(layer, (SparseLinear, CsrLinear)):
        raise PlanError(f"layer {name} is already sparse: sparsify() was applied to this model before. "
                        "Transform a fresh model (each model once).")
    weight = layer.weight.detach()
    if weight.is_meta:  # a model planned before it is materialised: no values yet
        return
    bad = ~torch.isfinite(weight)
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        raise PlanError(f"{policy.source}: {rule.describe() if rule else 'defaults'}: layer {name} holds "
                        f"{int(bad.sum())} non-finite weight(s) ({float(weight[tuple(first)])} at {first}); "
                        "sparse topologies rank weights by magnitude and need finite values. Fix the model's "
                        "initialization or the checkpoint it loads.")


def _check_calibrated(name: str, spec: LayerSpec, rule: Rule | None, policy: Policy,
                      coupling: Coupling | None, raw_input_layers: list[str]) -> None:
    """CSTI correlates the model's raw input features: a layer reading them takes the correlation as
    is, a later layer takes it tiled, so some linear layer must read the raw input."""
    if spec.init["model"] not in CALIBRATED_INIT or coupling is None or raw_input_layers:
        return
    where = f"{policy.source}: {rule.describe() if rule else 'defaults'}: layer {name}"
    raise PlanError(f"{where}: init model {spec.init['model']} correlates the model's raw input features "
                    "(the inputs of a linear layer that reads the model input), but no linear layer of this "
                    "model reads its input directly (an embedding or another module comes first). Give "
                    "these layers ER, BSW, BRF or BSF.")


PLAN = GraphPass("plan", plan, PlanError)
