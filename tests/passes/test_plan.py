import pytest
import torch
from torch import nn

import sparsify
from sparsify.csr_linear import CsrLinear
from sparsify.errors import PlanError
from sparsify.passes.capture import capture
from sparsify.passes.find_linears import find_linears
from sparsify.passes.plan import plan
from sparsify.policy import load_policy
from sparsify.sparse_linear import SparseLinear

from model_zoo import load_example


def llama_sites():
    m = load_example("llama")
    model = m.build_model()
    return model, find_linears(model, capture(model, m.example_inputs()))


def test_first_match_wins_skip_and_type_of_enclosing_module():
    model, sites = llama_sites()
    policy = load_policy({"version": 1, "rules": [
        {"match": {"name": "lm_head"}, "skip": True},
        {"match": {"regex": r"layers\.0\..*"}, "density": 0.5},
        {"match": {"type": "Attention"}, "density": 0.2},
        {"match": {"type": "MLP"}, "sparsity": 0.9},
        {"match": {"name": "does.not.exist"}, "density": 0.3},
    ]})
    result = plan(model, sites, policy)
    spec = {n: (d.spec.density if d.spec else None) for n, d in result.decisions.items()}
    assert spec["lm_head"] is None
    assert spec["layers.0.self_attn.q_proj"] == 0.5 and spec["layers.0.mlp.up_proj"] == 0.5
    assert spec["layers.1.self_attn.v_proj"] == 0.2
    assert spec["layers.1.mlp.down_proj"] == pytest.approx(0.1)
    assert len(result.sparse) == 14
    assert result.warnings() == ["rules[4] name='does.not.exist' matches no linear layer"]


def test_unmatched_layers_default_to_skip_or_defaults():
    model, sites = llama_sites()
    skip = plan(model, sites, load_policy({"version": 1, "rules": [{"match": {"name": "lm_head"}, "density": 0.5}]}))
    assert list(skip.sparse) == ["lm_head"]
    every = plan(model, sites, load_policy({"version": 1, "defaults": {"density": 0.5}, "unmatched": "sparsify"}))
    assert len(every.sparse) == 15


def test_policy_matching_no_layer_is_an_error():
    model, sites = llama_sites()
    with pytest.raises(PlanError, match="makes no layer sparse.*layers.0.self_attn.q_proj"):
        plan(model, sites, load_policy({"version": 1, "rules": [{"match": {"name": "nope"}, "density": 0.5}]}))


def test_density_leaving_no_link_is_an_error():
    model, sites = llama_sites()
    with pytest.raises(PlanError, match=r"lm_head \(128x64\): density 1e-05 leaves no link"):
        plan(model, sites, load_policy({"version": 1, "rules": [{"match": {"name": "lm_head"}, "density": 1e-5}]}))


def test_init_parameters_must_belong_to_the_topology():
    model, sites = llama_sites()
    policy = load_policy({"version": 1, "unmatched": "sparsify",
                          "defaults": {"density": 0.3, "init": {"model": "ER", "beta": 0.1}}})
    with pytest.raises(PlanError, match=r"init.beta is not a parameter of the ER topology \(ER takes no parameters\)"):
        plan(model, sites, policy)
    policy = load_policy({"version": 1, "unmatched": "sparsify",
                          "defaults": {"density": 0.3, "init": {"model": "BRF", "beta": 0.1}}})
    with pytest.raises(PlanError, match=r"init.beta is not a parameter of the BRF topology \(BRF takes degrees, r\)"):
        plan(model, sites, policy)


def test_csti_for_any_layer_of_a_model_whose_linear_reads_the_raw_input():
    from sparsify.passes.couple import couple
    m = load_example("mlp")
    model = m.build_model()
    cap = capture(model, m.example_inputs())
    sites = find_linears(model, cap)
    coupling = couple(cap, sites)
    hidden = load_policy({"version": 1, "rules": [{"match": {"regex": "fc[12]"}, "density": 0.1,
                                                   "init": {"model": "CSTI"}}]})
    planned = plan(model, sites, hidden, coupling)
    assert planned.raw_input_layers == ["fc1"]  # fc2 takes fc1's input features, tiled
    assert planned.sparse["fc2"].init == {"model": "CSTI", "weights": "rescale"}
    embedded = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    cap = capture(embedded, torch.tensor([[1, 2]]))
    sites = find_linears(embedded, cap)
    bad = load_policy({"version": 1, "rules": [{"match": {"name": "1"}, "density": 0.5, "init": {"model": "CSTI"}}]})
    with pytest.raises(PlanError, match=r"layer 1: init model CSTI correlates the model's raw input features .* "
                                        r"no linear layer of this model reads its input directly"):
        plan(embedded, sites, bad, couple(cap, sites))


def test_a_model_is_sparsified_once():
    import sparsify

    m = load_example("mlp")
    policy = {"version": 1, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.1}]}
    model, _ = sparsify.sparsify(m.build_model(), policy, m.example_inputs())
    with pytest.raises(PlanError, match="layer fc1 is already sparse: sparsify\\(\\) was applied to this model before"):
        sparsify.sparsify(model, policy, m.example_inputs())


def test_under_fsdp_backend_csr_is_refused_and_auto_stays_masked():
    """The whole transform: the rewrite follows the plan's backend."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))

    def policy(backend, distributed):
        return {"version": 1, "rules": [{"match": {"name": "0"}, "density": 0.05, "backend": backend}],
                "training": {"distributed": distributed}}

    with pytest.raises(PlanError, match=r"layer 0: backend csr cannot be sharded by FSDP \(training.distributed: "
                                        r"fsdp\).*use backend masked"):
        sparsify.sparsify(net(), policy("csr", "fsdp"), torch.randn(2, 64))
    model, _ = sparsify.sparsify(net(), policy("auto", "fsdp"), torch.randn(2, 64))
    assert type(model[0]) is SparseLinear  # auto picks csr at 5% density, but not to be sharded
    model, _ = sparsify.sparsify(net(), policy("auto", "ddp"), torch.randn(2, 64))
    assert type(model[0]) is CsrLinear
