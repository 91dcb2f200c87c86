"""Property-based tests: the policy loader on random documents, and one topology update (removal
then regrowth, every score and predictor, hard and soft) on random shapes, densities and seeds."""
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from sparsify.errors import PolicyError
from sparsify.policy import METHODS, Policy, load_policy
from sparsify.topology.initial import erdos_renyi, link_count
from sparsify.topology.regrowth import REGROWTH_PREDICTORS, regrow
from sparsify.topology.removal import REMOVAL_SCORES, remove

# --- the policy loader ----------------------------------------------------------------------------

KEYS = ["version", "seed", "rules", "defaults", "unmatched", "training", "export", "match", "name", "regex", "type",
        "density", "sparsity", "skip", "method", "init", "model", "removal", "regrowth", "zeta", "delta", "start",
        "end", "update", "every", "unit", "backend", "t_end", "percolation", "density_decay", "kind", "epochs",
        "lr", "optimizer", "onnx", "compact", "sparse_matmul", "mode", "score", "predictor", "r", "alpha", "early_stop"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 200), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["fc1", "fc[1-3]", "fc[1-", "(", ".*", "CHTs", "SET", "ER", "BRF", "soft",
                                     "hard", "steps", "epochs", "sgd", "lion", "masked", "csr", "auto", "", "1e-3"]),
                    st.text(max_size=6))
documents = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)), max_leaves=25)
near_valid = st.fixed_dictionaries(
    {"version": st.sampled_from([1, 1, 1, 2, "1"]),
     "rules": st.lists(st.fixed_dictionaries(
         {"match": st.one_of(st.fixed_dictionaries({"name": st.sampled_from(["fc1", "fc2", 3])}),
                             st.fixed_dictionaries({"regex": st.sampled_from(["fc[1-3]", "fc[", ".*"])}),
                             st.dictionaries(st.sampled_from(["name", "regex", "type", "kind"]), scalars, max_size=2))},
         optional={"density": st.one_of(st.floats(-0.5, 1.5), scalars), "method": st.sampled_from(list(METHODS) + ["CHTS"]),
                   "sparsity": st.floats(-0.5, 1.5), "update": st.dictionaries(st.sampled_from(["every", "unit"]), scalars),
                   "skip": scalars, "init": st.dictionaries(st.sampled_from(["model", "r", "beta"]), scalars)}),
         max_size=3)},
    optional={"training": st.dictionaries(st.sampled_from(["epochs", "lr", "optimizer", "batch_size"]), scalars),
              "seed": scalars, "unmatched": scalars})


def check_loader(doc) -> None:
    """Load ``doc`` as a dict and as YAML text: a Policy, or a PolicyError whose message says where."""
    for source in (doc, yaml.safe_dump(doc)):
        try:
            policy = load_policy(source) if isinstance(source, dict) else load_policy(_write(source))
        except PolicyError as exc:
            assert str(exc).strip(), "a PolicyError must say what is wrong"
            continue
        assert isinstance(policy, Policy)
        for rule in policy.rules:  # a valid policy resolves every rule to a full spec
            if not rule.skip:
                spec = policy.resolve(rule)
                assert 0 < spec.density <= 1 and 0 < spec.initial_density <= 1


TMP = Path(tempfile.mkdtemp(prefix="sparsify-policy-"))


def _write(text: str) -> Path:
    path = TMP / "p.yaml"
    path.write_text(text)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents)
def test_policy_loader_on_random_documents(doc):
    if not isinstance(doc, dict):
        with pytest.raises(PolicyError):
            load_policy(_write(yaml.safe_dump(doc)))
        return
    check_loader(doc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=near_valid)
def test_policy_loader_on_nearly_valid_documents(doc):
    check_loader(doc)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("version: 1\nrules:-{}[]\"'#&*!|>%@`,?=~") + ["\t", "é"]),
                    max_size=80))
def test_policy_loader_on_random_yaml_text(text):
    try:
        load_policy(_write(text))
    except PolicyError as exc:
        assert str(exc).strip()


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=120),
                      st.builds(lambda prefix, tail: prefix + tail,
                                st.sampled_from([b"version: 1\n", b"version: 1\ndefaults:\n  density: ", b"\xef\xbb\xbf"]),
                                st.binary(max_size=60))))
def test_policy_loader_on_arbitrary_bytes(data):
    """Any bytes at all, text or not: a Policy or one PolicyError with a message, nothing else."""
    path = TMP / "p.yaml"
    path.write_bytes(data)
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        assert str(exc).strip() and str(path) in str(exc)
    else:
        assert isinstance(policy, Policy)


# --- one topology update ---------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 24), inp=st.integers(1, 24), density=st.floats(0.05, 0.95), seed=st.integers(0, 10_000),
       score=st.sampled_from(sorted(REMOVAL_SCORES)), predictor=st.sampled_from(sorted(REGROWTH_PREDICTORS)),
       removal_mode=st.sampled_from(["hard", "soft"]), regrowth_mode=st.sampled_from(["hard", "soft"]),
       zeta=st.floats(0.0, 1.0))
def test_one_update_keeps_the_link_count_and_regrows_only_new_positions(out, inp, density, seed, score, predictor,
                                                                        removal_mode, regrowth_mode, zeta):
    g = torch.Generator().manual_seed(seed)
    links = link_count(out, inp, density)
    if links == 0:
        return
    mask = erdos_renyi(out, inp, density, g)
    assert int(mask.sum()) == links
    weight = torch.randn(out, inp, generator=g) * mask
    grad = torch.randn(out, inp, generator=g)
    count = round(zeta * links)
    kept = remove(mask, REMOVAL_SCORES[score](weight, mask, grad=grad), count, g, mode=removal_mode, delta=0.6)
    assert int(kept.sum()) == links - count and not (kept & ~mask).any()  # exactly count removed, nothing added
    scores = REGROWTH_PREDICTORS[predictor](kept, weight=weight * kept, grad=grad)
    assert scores.shape == mask.shape and torch.isfinite(scores).all() and (scores >= 0).all()
    grown = regrow(kept, scores, count, g, mode=regrowth_mode)
    assert int(grown.sum()) == links and not (kept & ~grown).any()  # same count back; kept links stay
    assert int((grown & ~kept).sum()) == count  # the regrown links were all inactive before
