"""``sparsify inspect``: a model's linear sites, coupling groups, capture and the policy's decisions."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from sparsify.errors import SparsifyWarning
from sparsify.evolution import describe_spec
from sparsify.model_file import load_model_file
from sparsify.passes.linearize import summary_lines
from sparsify.passes.pipeline import Analysis, analyze
from sparsify.policy import Policy, load_policy
from sparsify.topology.initial import link_count


@dataclass
class InspectReport:
    analysis: Analysis
    policy_source: str | None

    def rows(self) -> list[dict]:
        rows = []
        plan = self.analysis.plan
        for name, site in self.analysis.sites.sites.items():
            decision = plan.decisions[name] if plan else None
            spec = decision.spec if decision else None
            rows.append({
                "name": name, "out": site.out_features, "in": site.in_features,
                "parameters": site.parameters, "calls": site.calls,
                "rule": decision.rule_text if decision else None,
                "density": spec.density if spec else None,
                "initial_density": spec.initial_density if spec else None,
                "active_links": link_count(site.out_features, site.in_features, spec.initial_density) if spec else None,
                "method": spec.method if spec else None,
                "init": spec.init["model"] if spec else None,
                "evolution": describe_spec(spec) if spec else None,
            })
        return rows

    def evolution(self) -> list[dict]:
        """The topology evolution the rewrite inserts (``sparsify_evolution``): layers per schedule."""
        schedules: dict[str, list[str]] = {}
        for r in self.rows():
            if r["evolution"] is not None:
                schedules.setdefault(r["evolution"], []).append(r["name"])
        return [{"layers": names, "schedule": text} for text, names in schedules.items()]

    def warnings(self) -> list[str]:
        return self.analysis.plan.warnings() if self.analysis.plan else []

    def to_json(self) -> dict:
        coupling = self.analysis.coupling.to_json()
        return {
            "capture": self.analysis.capture.describe(),
            "policy": self.policy_source,
            "sites": self.rows(),
            "excluded": [{"name": n, "reason": r} for n, r in sorted(self.analysis.sites.excluded.items())],
            "linearized": [{"name": n, "was": w} for n, w in sorted(self.analysis.linearized.items())],
            "groups": coupling["groups"],
            "boundaries": coupling["boundaries"],
            "evolution": self.evolution(),
            "unmatched_rules": self.warnings(),
            "notes": coupling["notes"],
        }

    def print(self, console: Console | None = None) -> None:
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:
                console = Console(highlight=False, width=200)
        console.print(f"[bold]capture:[/bold] {self.analysis.capture.describe()}")
        for line in summary_lines(self.analysis.linearized):
            console.print("[bold]linearized:[/bold] " + escape(line))
        table = Table(title=f"linear sites ({len(self.analysis.sites.sites)})", title_justify="left")
        table.add_column("name", no_wrap=True)
        for col, just in ( ("shape (out x in)", "right"), ("parameters", "right"),
                          ("calls", "right"), ("rule", "left"), ("density", "right"), ("method", "left")):
            table.add_column(col, justify=just)
        for r in self.rows():
            density = "dense" if r["density"] is None else f"{r['density']:.4g}"
            if r["initial_density"] is not None and r["initial_density"] != r["density"]:
                density = f"{r['initial_density']:.4g} -> {density}"
            table.add_row(r["name"], f"{r['out']} x {r['in']}", f"{r['parameters']:,}", str(r["calls"]),
                          r["rule"] or "-", density, r["method"] or "-")
        console.print(table)
        sites = self.analysis.sites
        if sites.excluded:
            console.print("[bold]excluded[/bold]")
            for name, why in sorted(sites.excluded.items()):
                console.print(f"  {name}: {why}")
        coupling = self.analysis.coupling
        console.print(f"[bold]coupling groups ({len(coupling.groups)})[/bold]")
        for line in coupling.group_lines():
            console.print(f"  {line}", markup=False)
        console.print(f"[bold]boundaries ({len(coupling.boundaries)})[/bold]")
        for line in coupling.boundary_lines():
            console.print(f"  {line}", markup=False)
        for note in sorted(set(coupling.notes)):
            console.print(f"[yellow]note:[/yellow] {note}", markup=True)
        if self.analysis.plan is not None:
            console.print("[bold]topology evolution[/bold] (module sparsify_evolution, at optimizer steps once "
                          "handle.attach(optimizer, total_steps=...) registers the optimizer)")
            for entry in self.evolution():
                console.print(f"  {', '.join(entry['layers'])}: {entry['schedule']}", markup=False)
        for warning in self.warnings():
            console.print(f"[yellow]warning:[/yellow] {warning}")


def plan(model: nn.Module, policy: str | Path | dict | Policy | None, example_inputs: Any) -> InspectReport:
    """Capture ``model``, find its coupling groups and plan ``policy``'s rules onto it, changing nothing:
    the planning half of :func:`sparsify.sparsify`, and what ``sparsify inspect`` prints. ``model`` may
    be built on the meta device (weights without storage), so a model too big to allocate is planned
    in seconds; ``example_inputs`` then need only the right shapes and dtypes (see docs/capture.md).

    >>> with torch.device("meta"):  # doctest: +SKIP
    ...     model = LlamaForCausalLM(config)
    >>> sparsify.plan(model, "policy.yaml", {"input_ids": torch.zeros(1, 16, dtype=torch.long)}).print()  # doctest: +SKIP
    """
    policy = load_policy(policy) if policy is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsifyWarning)  # the report lists them itself
        analysis = analyze(model, example_inputs, policy)
    return InspectReport(analysis, policy.source if policy else None)


def inspect_model(model_path: str, policy_path: str | None = None) -> InspectReport:
    """Load model.py (and a policy), capture and analyze the model, plan the rules; no rewrite."""
    logging.captureWarnings(True)
    model_file = load_model_file(model_path)
    return plan(model_file.build_model(), policy_path or None, model_file.example_inputs())
