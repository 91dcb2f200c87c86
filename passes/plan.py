"""Plan pass: the policy's rules applied to the linear sites (first match wins).

"Where" (the rules' matches) stays separate from "what" (the resolved LayerSpec): the plan
records, for every site, which rule matched and the spec it gets, plus the rules that matched
nothing, so ``sparsify inspect`` can explain every decision.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from sparsify.errors import PlanError
from sparsify.passes.couple import Coupling
from sparsify.passes.find_linears import Sites
from sparsify.policy import LayerSpec, Policy, Rule
from sparsify.topology.init import INIT_TOPOLOGIES, link_count

AVAILABLE_BACKENDS = {"masked", "csr"}
# backend auto: csr at or below this initial density, masked above (benchmarks/training_step.py)
AUTO_CSR_DENSITY = 0.05


def resolved_backend(spec: LayerSpec) -> str:
    """The backend a layer gets: the policy's, or for 'auto' the one measured faster at its density."""
    if spec.backend != "auto":
        return spec.backend
    return "csr" if spec.initial_density <= AUTO_CSR_DENSITY else "masked"
CALIBRATED_INIT = {"CSTI"}  # initial topologies computed from the layer's input data


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

    @property
    def sparse(self) -> dict[str, LayerSpec]:
        return {n: d.spec for n, d in self.decisions.items() if d.spec is not None}

    def warnings(self) -> list[str]:
        return [f"{r.describe()} matches no linear layer" for r in self.unused_rules]


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
    decisions, used = {}, set()
    for name, site in sites.sites.items():
        rule = policy.match(name, _enclosing_types(model, name))
        if rule is not None:
            used.add(rule.index)
        if (rule is not None and rule.skip) or (rule is None and policy.unmatched == "skip"):
            decisions[name] = Decision(name, rule, None)
            continue
        spec = policy.resolve(rule)
        _check(name, site.out_features, site.in_features, spec, rule, policy)
        _check_calibrated(name, spec, rule, policy, coupling)
        decisions[name] = Decision(name, rule, spec)
    result = Plan(decisions, [r for r in policy.rules if r.index not in used])
    if not result.sparse:
        names = ", ".join(list(sites.sites)[:6]) + (", ..." if len(sites.sites) > 6 else "")
        raise PlanError(
            f"{policy.source}: the policy makes no layer sparse. The model's linear layers are: "
            f"{names or '(none)'}. Add a rule that matches them, or set 'unmatched: sparsify'.")
    return result


def _check(name: str, out_features: int, in_features: int, spec: LayerSpec, rule: Rule | None,
           policy: Policy) -> None:
    where = f"{policy.source}: {rule.describe() if rule else 'defaults'}: layer {name}"
    if spec.init["model"] not in INIT_TOPOLOGIES:
        raise PlanError(f"{where}: initial topology {spec.init['model']!r} is not available; "
                        f"available: {', '.join(INIT_TOPOLOGIES)}")
    given = set(spec.init) - {"model", "rescale"}
    allowed = init_parameters(spec.init["model"])
    if given - allowed:
        takes = f"takes {', '.join(sorted(allowed))}" if allowed else "takes no parameters"
        raise PlanError(f"{where}: init.{sorted(given - allowed)[0]} is not a parameter of the "
                        f"{spec.init['model']} topology ({spec.init['model']} {takes})")
    if spec.update is None and spec.density_decay["kind"] != "none":
        raise PlanError(f"{where}: density_decay {spec.density_decay['kind']!r} needs topology updates, but "
                        f"method {spec.method!r} has none; give 'update: {{every: N, unit: steps}}' or a method "
                        "that updates (GMP prunes gradually)")
    links = link_count(out_features, in_features, spec.initial_density)
    if links < 1:
        raise PlanError(f"{where} ({out_features}x{in_features}): density {spec.initial_density:g} leaves "
                        f"no link (round(density*out*in) = 0); the smallest density that keeps one link is "
                        f"{0.5 / (out_features * in_features):.2g}")


def _check_calibrated(name: str, spec: LayerSpec, rule: Rule | None, policy: Policy,
                      coupling: Coupling | None) -> None:
    if spec.init["model"] not in CALIBRATED_INIT or coupling is None:
        return
    reasons = coupling.boundaries.get((name, "in"), set())
    if "model input" not in reasons:
        where = f"{policy.source}: {rule.describe() if rule else 'defaults'}: layer {name}"
        got = "; ".join(sorted(reasons)) or "another layer's output"
        raise PlanError(f"{where}: init model {spec.init['model']} correlates the model's raw input "
                        f"features, but this layer reads {got}. Use it only for layers that read the "
                        "model input (an MLP's first layer) and give the others ER, BSW, BRF or BSF.")
