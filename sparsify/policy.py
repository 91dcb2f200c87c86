"""The policy: which linear layers become sparse and how, loaded from YAML and checked against
``schema/policy.schema.json``.

Every error names the file, the line and the key path, and what is allowed::

    policy.yaml:12: rules[1].density: 1.5 is greater than the maximum 1
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

from sparsify.errors import PolicyError

SCHEMA_VERSION = 1

# Each method is a named bundle of explicit fields; a policy's defaults and rules override them
# field by field. The Cannistraci-Hebb methods follow the authors' published recipe (the MLP runs of
# mlp_and_cnn/ for CHT and CHTs, the LLaMA runs of llm/ for CHTss); docs/fidelity.md lists every
# point, its source and what the project does differently.
_DST = {
    "removal": {"score": "WM", "mode": "hard", "delta": {"start": 0.5, "end": 0.75}, "ramp": "delta",
                "zeta": 0.3, "zeta_schedule": "constant", "gamma": 0.01},
    "regrowth": {"predictor": "random", "mode": "hard"},
    "update": {"every": 1, "unit": "epochs"},
    "t_end": 0.75,
    "density_decay": {"kind": "none", "initial_sparsity": 0.5, "start": 0.0, "end": 0.75, "score": "WM",
                      "halved_window": False, "steepness": 6.0},
    "percolation": False,
    "early_stop": None,
}


def _preset(**changes: Any) -> dict:
    spec = copy.deepcopy(_DST)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key].update(value)
        else:
            spec[key] = value
    return spec


METHODS: dict[str, dict] = {
    "static": _preset(update=None, removal={"zeta": 0.0}),
    "SET": _preset(t_end=1.0),
    "RigL": _preset(removal={"zeta_schedule": "cosine"}, regrowth={"predictor": "gradient"},
                    update={"every": 100, "unit": "steps"}),
    "MEST": _preset(removal={"score": "MEST", "zeta": 0.05, "zeta_schedule": "elastic"}, t_end=1.0,
                    density_decay={"kind": "mest"}),
    "GMP": _preset(removal={"zeta": 0.0}, density_decay={"kind": "cubic", "initial_sparsity": 0.0}),
    "GraNet": _preset(regrowth={"predictor": "gradient"}, removal={"zeta_schedule": "cosine"},
                      density_decay={"kind": "cubic", "initial_sparsity": 0.5}),
    # CHT (ICLR 2024 code): hard WM removal, path-based CH3-L3 regrowth, chain removal, early stop
    # at 90% overlap, an update every epoch over the whole run.
    "CHT": _preset(regrowth={"predictor": "CH3_L3p"}, percolation=True, early_stop={"overlap": 0.9}, t_end=1.0),
    # CHTs (MLP recipe): soft RI removal (the CHTs preprint's best on Fashion-MNIST) with the keep-set
    # sampled by |score|^T, T rising linearly 1 -> 3; cosine ("adaptive") zeta 0.3 until 75% of
    # training; soft CH2-L3n regrowth; chain removal.
    "CHTs": _preset(removal={"score": "RI", "alpha": 0.0, "mode": "soft", "ramp": "temperature",
                             "zeta_schedule": "cosine"},
                    regrowth={"predictor": "CH2_L3n", "mode": "soft"}, percolation=True),
    # CHTss (LLaMA recipe): CHTs with gradual pruning from 50% density along a sigmoid by RI; soft WM
    # removal with T rising 1 -> 9, cosine zeta 0.1, CH2-L3n top-k regrowth, an update every 100
    # steps until 75% of training, no chain removal.
    "CHTss": _preset(removal={"score": "WM", "mode": "soft", "delta": {"start": 0.5, "end": 0.9},
                              "ramp": "temperature", "zeta": 0.1, "zeta_schedule": "cosine"},
                     regrowth={"predictor": "CH2_L3n", "mode": "hard"}, update={"every": 100, "unit": "steps"},
                     density_decay={"kind": "sigmoid", "initial_sparsity": 0.5, "score": "RI"}),
}

DEFAULT_SPEC = {"init": {"model": "ER"}, "method": "static", "backend": "auto", "density": None}
# The initial topology a method starts from when no rule and no default names one: the sparse
# Transformer/LLaMA papers pair CHTs and CHTss with the bipartite receptive field (r 0.3; the LLaMA
# runs draw each row's degree at random). The MLP runs' CSTI needs calibration data and a raw input
# whose features correlate, so it is the MLP policies' choice (examples/policies), not a default.
METHOD_INIT: dict[str, dict] = {"CHTs": {"model": "BRF", "r": 0.3},
                                "CHTss": {"model": "BRF", "r": 0.3, "degrees": "uniform"}}
# How a method's links are first weighted when no rule says (init.weights): sparse weight init for
# the Cannistraci-Hebb MLP recipe, the LLaMA recipe's own init kept for CHTss, and the dense
# layer's activation scale for the other methods.
METHOD_WEIGHTS: dict[str, str] = {"CHT": "swi", "CHTs": "swi", "CHTss": "keep"}
# EM&S and MEST's soft memory bound: the density above the target a layer starts at, and (EM&S) the
# extra density regrown after 60% of T_end.
EMS_EXTRA = (0.05, 0.025)
EVOLUTION_KEYS = ("removal", "regrowth", "update", "t_end", "density_decay", "percolation", "early_stop")


@dataclass(frozen=True)
class Ramp:
    """A value ramped from ``start`` at step 0 to ``end`` at T_end (soft removal's δ)."""

    start: float
    end: float


@dataclass(frozen=True)
class Removal:
    """How links are removed at an update (schema: removal)."""

    score: str  # WM | RI | MEST
    mode: str  # hard | soft
    delta: Ramp
    ramp: str  # delta | temperature
    zeta: float
    zeta_schedule: str  # constant | cosine | elastic
    gamma: float  # MEST's gradient weight
    alpha: float | None = None  # RI's blend towards WM

    def score_args(self) -> dict:
        """The keyword arguments its score function takes from it."""
        return {k: v for k, v in (("alpha", self.alpha), ("gamma", self.gamma)) if v is not None}


@dataclass(frozen=True)
class Regrowth:
    """How links are regrown at an update (schema: regrowth)."""

    predictor: str
    mode: str  # hard | soft


@dataclass(frozen=True)
class Update:
    """Every how many steps or epochs the topology is updated (schema: update)."""

    every: int
    unit: str = "steps"  # steps | epochs


@dataclass(frozen=True)
class DensityDecay:
    """Gradual pruning from an initial density to the target (schema: density_decay)."""

    kind: str  # none | cubic | sigmoid | linear | mest | ems
    initial_sparsity: float
    start: float
    end: float
    score: str  # WM | RI
    halved_window: bool
    steepness: float


@dataclass(frozen=True)
class EarlyStop:
    """CHT's topological early stop: freeze a layer once an update's overlap exceeds ``overlap``."""

    overlap: float


@dataclass(frozen=True)
class LayerSpec:
    """Everything one sparse layer needs, fully resolved (no field left to a preset). ``init`` stays
    a mapping: its keys are the chosen topology's own parameters, plus ``model`` and ``weights``."""

    density: float
    init: dict
    method: str
    removal: Removal
    regrowth: Regrowth
    update: Update | None
    t_end: float
    density_decay: DensityDecay
    percolation: bool
    early_stop: EarlyStop | None
    backend: str

    @classmethod
    def from_fields(cls, density: float, init: dict, method: str, backend: str, removal: dict, regrowth: dict,
                    update: dict | None, t_end: float, density_decay: dict, percolation: bool,
                    early_stop: dict | None) -> "LayerSpec":
        """A spec from the merged mappings of a preset, the defaults and a rule (checked by the schema)."""
        removal = {**removal, "delta": Ramp(**removal["delta"])}
        return cls(density=density, init=init, method=method, backend=backend, removal=Removal(**removal),
                   regrowth=Regrowth(**regrowth), update=Update(**update) if update is not None else None,
                   t_end=t_end, density_decay=DensityDecay(**density_decay), percolation=percolation,
                   early_stop=EarlyStop(**early_stop) if early_stop is not None else None)

    @property
    def initial_density(self) -> float:
        """The density the layer starts at: above the target while a density decay is pending."""
        decay = self.density_decay
        if decay.kind in ("cubic", "sigmoid", "linear"):
            return max(self.density, 1.0 - decay.initial_sparsity)
        if decay.kind in ("mest", "ems"):
            return min(1.0, self.density + EMS_EXTRA[0])
        return self.density

    def to_dict(self) -> dict:
        """The spec as the policy's mappings would write it (an unset RI alpha left out)."""
        out = dataclasses.asdict(self)
        if out["removal"]["alpha"] is None:
            del out["removal"]["alpha"]
        return out


@dataclass(frozen=True)
class TrainingConfig:
    """The CLI's training settings: a policy's ``training`` section over the official MLP recipe
    (mlp_and_cnn/run.py of the CHT papers' code, docs/fidelity.md): SGD lr 0.025 with momentum 0.9
    and weight decay 5e-4, batch 32, the rate decayed linearly to 1% of its start over 90% of
    training and held there."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "linear"  # constant | linear | cosine
    lr_end_factor: float = 0.01
    lr_decay_end: float = 0.9
    lr_step: str = "step"  # step | epoch
    lr_warmup_steps: int = 0
    device: str = "cpu"
    distributed: str = "ddp"  # ddp | fsdp: how a run in several processes shares the model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrainingConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Rule:
    """One selection rule: where (match) separate from what (fields)."""

    index: int
    match_kind: str  # 'name' | 'regex' | 'type'
    pattern: str
    skip: bool
    fields: dict
    line: int | None
    label: str | None = None

    def matches(self, name: str, types: tuple[str, ...]) -> bool:
        if self.match_kind == "name":
            return name == self.pattern
        if self.match_kind == "regex":
            return re.fullmatch(self.pattern, name) is not None
        return self.pattern in types

    def describe(self) -> str:
        label = f" ({self.label})" if self.label else ""
        return f"rules[{self.index}]{label} {self.match_kind}={self.pattern!r}"


@dataclass
class Policy:
    """A validated policy. Build it with :func:`load_policy`."""

    rules: list[Rule]
    defaults: dict = field(default_factory=dict)
    unmatched: str = "skip"
    seed: int = 0
    export: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    source: str = "<dict>"
    document: dict = field(default_factory=dict)

    def resolve(self, rule: Rule | None) -> LayerSpec:
        """The full spec for layers matched by ``rule`` (``None``: the unmatched default)."""
        merged = copy.deepcopy(DEFAULT_SPEC)
        for layer in (self.defaults, rule.fields if rule else {}):
            _density_into(merged, layer)
            merged.update({k: copy.deepcopy(v) for k, v in layer.items()
                           if k in ("init", "method", "backend")})
        if not any("init" in layer for layer in (self.defaults, rule.fields if rule else {})):
            merged["init"] = copy.deepcopy(METHOD_INIT.get(merged["method"], merged["init"]))
        merged["init"].setdefault("weights", METHOD_WEIGHTS.get(merged["method"], "rescale"))
        spec = copy.deepcopy(METHODS[merged["method"]])
        for layer in (self.defaults, rule.fields if rule else {}):
            for key in EVOLUTION_KEYS:
                if key in layer:
                    spec[key] = _merge(spec.get(key), layer[key])
        where = rule.describe() if rule else "defaults"
        if merged["density"] is None:
            raise PolicyError(f"{self.source}: {where}: no density or sparsity given "
                              "(set one in the rule or in defaults)")
        return LayerSpec.from_fields(density=merged["density"], init=merged["init"], method=merged["method"],
                                     backend=merged["backend"], **spec)

    def training_config(self) -> TrainingConfig:
        """The training section (checked against the schema at load) over the defaults."""
        return TrainingConfig(**self.training)

    def match(self, name: str, types: tuple[str, ...]) -> Rule | None:
        """The first rule that matches a layer, or None."""
        return next((r for r in self.rules if r.matches(name, types)), None)


def _density_into(merged: dict, layer: dict) -> None:
    if "density" in layer:
        merged["density"] = float(layer["density"])
    elif "sparsity" in layer:
        merged["density"] = round(1.0 - float(layer["sparsity"]), 12)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for k, v in override.items():
            out[k] = _merge(out.get(k), v)
        return out
    return copy.deepcopy(override)


# ---------------------------------------------------------------------------------------------
# Loading and validation

def schema() -> dict:
    """The policy's JSON Schema (2020-12)."""
    text = resources.files("sparsify.schema").joinpath("policy.schema.json").read_text()
    return json.loads(text)


def _unique_key_loader() -> type:
    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def _lines(node: yaml.Node, path: tuple = ()) -> Iterator[tuple[tuple, int, int]]:
    """(key path, line of the key, line of the value), 1-based, for every node of a YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = path + (key.value,)
            yield sub, key.start_mark.line + 1, value.start_mark.line + 1
            yield from _lines(value, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield path + (i,), item.start_mark.line + 1, item.start_mark.line + 1
            yield from _lines(item, path + (i,))


def path_text(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


class _Where:
    """Maps a key path to 'file:line' for messages."""

    def __init__(self, source: str, root: yaml.Node | None):
        self.source = source
        self.key_line: dict[tuple, int] = {}
        self.value_line: dict[tuple, int] = {}
        if root is not None:
            self.value_line[()] = root.start_mark.line + 1
            for path, kline, vline in _lines(root):
                self.key_line[path] = kline
                self.value_line[path] = vline

    def __call__(self, path: tuple, key: bool = False) -> str:
        path = tuple(path)
        table = self.key_line if key else self.value_line
        while path and path not in table:
            path = path[:-1]
        line = table.get(path) or self.value_line.get(path)
        return f"{self.source}:{line}" if line else self.source


def _allowed_keys(node: dict, root: dict) -> list[str]:
    keys: list[str] = []
    stack = [node]
    while stack:
        n = stack.pop()
        keys += list(n.get("properties", {}))
        if "$ref" in n:
            stack.append(_resolve_ref(root, n["$ref"]))
        stack += n.get("allOf", [])
    return sorted(set(keys))


def _resolve_ref(root: dict, ref: str) -> dict:
    node = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _did_you_mean(word: str, choices: list[str]) -> str:
    same_letters = [str(c) for c in choices if str(c).lower() == str(word).lower()]
    close = same_letters or difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_BOUNDS = {"maximum": "is greater than the maximum", "minimum": "is less than the minimum",
           "exclusiveMaximum": "must be less than", "exclusiveMinimum": "must be greater than"}


def _messages(error: jsonschema.ValidationError, root: dict, where: _Where) -> list[str]:
    """Turn one schema error into 'file:line: path: what is wrong; what is allowed' lines."""
    path = tuple(error.absolute_path)
    kind, value = error.validator, error.instance
    if kind in ("additionalProperties", "unevaluatedProperties"):
        allowed = _allowed_keys(error.schema, root)
        unknown = [k for k in value if k not in allowed]
        return [f"{where(path + (k,), key=True)}: {path_text(path + (k,))}: unknown key {k!r}"
                f"{_did_you_mean(k, allowed)} (allowed: {', '.join(allowed)})" for k in unknown]
    at = f"{where(path)}: {path_text(path)}"
    if kind == "enum":
        options = error.validator_value
        return [f"{at}: {value!r} is not one of {', '.join(map(str, options))}{_did_you_mean(value, options)}"]
    if kind == "const":
        return [f"{at}: {value!r} is not supported; this version of sparsify reads {error.validator_value!r}"]
    if kind == "type":
        return [f"{at}: {value!r} is a {_type_name(value)}, expected {error.validator_value}"]
    if kind in _BOUNDS:
        return [f"{at}: {value} {_BOUNDS[kind]} {error.validator_value}"]
    if kind == "required":
        missing = [k for k in error.validator_value if k not in value]
        return [f"{at}: missing required key {k!r}" for k in missing]
    if kind == "not" and isinstance(value, dict) and {"density", "sparsity"} <= set(value):
        return [f"{at}: give density or sparsity, not both"]
    if kind in ("minProperties", "maxProperties") and path and path[-1] == "match":
        return [f"{at}: give exactly one of name, regex, type (got {', '.join(value) or 'none'})"]
    if kind == "minLength":
        return [f"{at}: must not be empty"]
    return [f"{at}: {error.message}"]


def _type_name(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_rules(doc: dict, where: _Where) -> list[str]:
    """Regexes that do not compile (the schema has checked the types; where it found them wrong,
    the regex is skipped here)."""
    problems = []
    rules = doc.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        match = rule.get("match") if isinstance(rule, dict) else None
        regex = match.get("regex") if isinstance(match, dict) else None
        if not isinstance(regex, str):
            continue
        try:
            re.compile(regex)
        except re.error as exc:
            path = ("rules", i, "match", "regex")
            problems.append(f"{where(path)}: {path_text(path)}: {regex!r} is not a valid regular expression: {exc}")
    return problems


def _non_finite(node: Any, where: _Where, path: tuple = ()) -> list[str]:
    """Numbers such as .nan, .inf or 1e999 (read as inf): every bound in the schema lets NaN through."""
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{where(path)}: {path_text(path)}: {node} is not a finite number"]
    if isinstance(node, dict):
        return [m for k, v in node.items() for m in _non_finite(v, where, path + (k,))]
    if isinstance(node, list):
        return [m for i, v in enumerate(node) for m in _non_finite(v, where, path + (i,))]
    return []


def load_policy(policy: "str | Path | dict | Policy") -> Policy:
    """Load a policy from a YAML file path, a dict, or return a Policy as is.

    Raises PolicyError listing every problem with its file, line and key path.
    """
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, dict):
        return _build(copy.deepcopy(policy), _Where("policy", None))
    path = Path(policy)
    source = str(policy)
    if path.is_dir():
        raise PolicyError(f"{source}: is a folder, not a policy file; give the path of a YAML policy") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{source}: no such policy file") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "a policy is a YAML text file") from None
    except OSError as exc:
        raise PolicyError(f"{source}: cannot read the policy file: {exc.strerror}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.load(text, Loader=_unique_key_loader())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise PolicyError(f"{source}{line}: not valid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from None
    if doc is None:
        raise PolicyError(f"{source}: the policy is empty; it needs at least 'version: 1' and rules")
    return _build(doc, _Where(source, root))


def _build(doc: Any, where: _Where) -> Policy:
    if not isinstance(doc, dict):
        raise PolicyError(f"{where(())}: the policy must be a mapping of keys (version, rules, ...), "
                          f"not a {_type_name(doc)}")
    root = schema()
    validator = jsonschema.Draft202012Validator(root)
    problems = []
    for error in validator.iter_errors(doc):
        problems += _messages(error, root, where)
    problems += _check_rules(doc, where)
    problems += _non_finite(doc, where)
    if problems:
        problems = sorted(set(problems), key=_line_of)
        raise PolicyError("invalid policy:\n  " + "\n  ".join(problems))
    rules = []
    for i, r in enumerate(doc.get("rules", [])):
        (kind, pattern), = r["match"].items()
        fields = {k: v for k, v in r.items() if k not in ("match", "skip", "name")}
        rules.append(Rule(i, kind, pattern, bool(r.get("skip", False)), fields,
                          where.key_line.get(("rules", i)), r.get("name")))
    policy = Policy(rules=rules, defaults=doc.get("defaults", {}), unmatched=doc.get("unmatched", "skip"),
                    seed=doc.get("seed", 0), export=doc.get("export", {}), training=doc.get("training", {}),
                    source=where.source, document=doc)
    for rule in [None, *rules]:  # every spec must resolve (a density is given somewhere)
        if rule is None and policy.unmatched == "skip":
            continue
        if rule is not None and rule.skip:
            continue
        policy.resolve(rule)
    return policy


def _line_of(message: str) -> tuple:
    m = re.match(r"[^:]*:(\d+):", message)
    return (int(m.group(1)) if m else 0, message)
