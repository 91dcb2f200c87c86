import copy

import pytest
import torch
from torch import fx, nn

import sparsify
from sparsify.csr_linear import CsrLinear
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.initial import erdos_renyi, link_count

from model_zoo import load_example

EVERY = {"version": 1, "unmatched": "sparsify"}


def test_density_one_gives_identical_outputs():
    for name in ("mlp", "llama", "nanogpt"):
        m = load_example(name)
        model, x = m.build_model(), m.example_inputs()
        expected = model(*x)
        model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 1.0}}, x)
        assert torch.equal(model(*x), expected), name
        assert all(s.module.density == 1.0 for s in handle.sites.values())


def test_exact_link_count_zero_inactive_weights_and_gradients(device):
    m = load_example("llama")
    model, x = m.build_model().to(device), tuple(t.to(device) for t in m.example_inputs())
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.3}}, x)
    assert len(handle.sites) == 15
    model(*x).sum().backward()
    for name, site in handle.sites.items():
        layer = site.module
        assert layer.active_links == round(0.3 * layer.out_features * layer.in_features), name
        assert torch.all(layer.weight[~layer.mask] == 0)
        assert torch.all(layer.weight.grad[~layer.mask] == 0)
        assert layer.weight.grad[layer.mask].abs().sum() > 0


def test_user_class_methods_and_state_dict_survive():
    m = load_example("llama")
    model, x = m.build_model(), m.example_inputs()
    keys = set(model.state_dict())
    model2, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.5}}, x)
    assert model2 is model and type(model).__name__ == "Llama"
    assert isinstance(model.layers[0].self_attn.q_proj, SparseLinear)
    masks = {f"{n}.mask" for n in handle.sites}
    evolution = {f"sparsify_evolution.{k}" for k in ("step_count", "total_steps", "steps_per_epoch", "rng_state")}
    explored = {f"sparsify_evolution.state.{i}.{k}" for i in range(len(handle.sites)) for k in ("ever", "frozen", "csr")}
    assert set(model.state_dict()) == keys | masks | evolution | explored
    clone = copy.deepcopy(model)
    assert torch.equal(clone(*x), model(*x))


def test_seeded_and_reproducible():
    m = load_example("mlp")
    masks = []
    for seed in (0, 0, 1):
        model, handle = sparsify.sparsify(m.build_model(), {**EVERY, "seed": seed, "defaults": {"density": 0.05}},
                                          m.example_inputs())
        masks.append(handle.sites["fc2"].module.mask.clone())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_to_linear_is_lossless():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    mask = erdos_renyi(8, 16, 0.25, torch.Generator().manual_seed(0))
    layer = SparseLinear.from_linear(copy.deepcopy(dense), mask=mask)
    back = layer.to_linear()
    x = torch.randn(4, 16)
    assert torch.equal(back(x), layer(x))
    assert torch.equal(back.weight, dense.weight * mask)
    full = SparseLinear.from_linear(copy.deepcopy(dense)).to_linear()
    assert torch.equal(full.weight, dense.weight) and torch.equal(full.bias, dense.bias)


def test_graph_module_is_rewritten_and_recompiled():
    m = load_example("mlp")
    gm = fx.symbolic_trace(m.build_model())
    x = m.example_inputs()
    gm2, handle = sparsify.sparsify(gm, {**EVERY, "defaults": {"density": 0.05}}, x)
    assert gm2 is gm and isinstance(gm.get_submodule("fc1"), CsrLinear)  # backend auto at 5%: csr
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["sparsify_evolution", "fc1", "fc2", "fc3", "fc4"]  # the evolution runs first
    assert "self.sparsify_evolution()" in gm.code and "sparsify_evolution" in str(gm)
    assert gm.get_submodule("fc1").active_links == link_count(1568, 784, 0.05)
    assert gm(*x).shape == (2, 10)


def test_rescaled_initial_weights_keep_the_dense_row_scale():
    layer = nn.Linear(1000, 50)
    before = layer.weight.detach().pow(2).sum(1).mean()
    model = nn.Sequential(layer)
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.1}}, torch.randn(2, 1000))
    after = handle.sites["0"].module.weight.detach().pow(2).sum(1).mean()
    assert after == pytest.approx(before, rel=0.25)
    kept = nn.Sequential(nn.Linear(1000, 50))
    w = kept[0].weight.detach().clone()
    sparsify.sparsify(kept, {**EVERY, "defaults": {"density": 0.1, "init": {"model": "ER", "weights": "keep"}}},
                      torch.randn(2, 1000))
    assert torch.equal(kept[0].weight[kept[0].mask], w[kept[0].mask])


@pytest.mark.parametrize("weights, std", [("swi", (2 / (0.1 * 1000)) ** 0.5), ("kaiming", (2 / 1000) ** 0.5)])
def test_sparse_and_kaiming_weight_inits_draw_the_official_scales(weights, std):
    model = nn.Sequential(nn.Linear(1000, 200))
    model, handle = sparsify.sparsify(model, {**EVERY, "defaults": {"density": 0.1, "init": {"model": "ER", "weights": weights}}},
                                      torch.randn(2, 1000))
    layer = handle.sites["0"].module
    active = layer.weight[layer.mask]
    assert active.numel() == 20000 and active.std().item() == pytest.approx(std, rel=0.03)
    assert abs(active.mean().item()) < 0.05 * std and int((layer.weight[~layer.mask] != 0).sum()) == 0


def test_cht_methods_default_to_sparse_weight_init_and_chtss_keeps_the_model_s_own():
    specs = {m: sparsify.load_policy({**EVERY, "defaults": {"density": 0.1, "method": m}}).resolve(None)
             for m in ("CHT", "CHTs", "CHTss", "SET", "RigL")}
    assert [specs[m].init["weights"] for m in specs] == ["swi", "swi", "keep", "rescale", "rescale"]
    assert specs["CHTss"].init == {"model": "BRF", "r": 0.3, "degrees": "uniform", "weights": "keep"}


def test_er_exact_counts_any_shape():
    g = torch.Generator().manual_seed(3)
    for out_f, in_f, d in [(1, 1, 1.0), (3, 7, 0.5), (10, 3, 0.01), (64, 128, 0.013)]:
        mask = erdos_renyi(out_f, in_f, d, g)
        assert mask.shape == (out_f, in_f) and int(mask.sum()) == link_count(out_f, in_f, d)


@pytest.mark.parametrize("init", [{"model": "BSW", "beta": 0.0}, {"model": "BRF", "r": 0.0},
                                  {"model": "BSF", "resort": True}])
def test_every_initial_topology_reaches_the_swapped_layer(init):
    from sparsify.topology.initial import INIT_TOPOLOGIES
    from sparsify.passes.rewrite import site_generator
    m = load_example("mlp")
    policy = {"version": 1, "seed": 3, "rules": [{"match": {"name": "fc2"}, "density": 0.01, "init": init}]}
    model, handle = sparsify.sparsify(m.build_model(), policy, m.example_inputs())
    params = {k: v for k, v in init.items() if k != "model"}
    expected = INIT_TOPOLOGIES[init["model"]](1568, 1568, 0.01, site_generator(3, "fc2"), **params)
    assert torch.equal(handle.sites["fc2"].module.mask, expected)


def test_csti_calibrates_on_the_given_batches_and_refuses_constant_inputs():
    m = load_example("mlp")
    policy = {"version": 1, "rules": [{"match": {"name": "fc1"}, "density": 0.001, "init": {"model": "CSTI"}}]}
    g = torch.Generator().manual_seed(0)
    base = torch.randn(256, 392, generator=g)
    batches = [torch.cat([base, base + 0.01 * torch.randn(256, 392, generator=g)], 1)[i:i + 64] for i in range(0, 256, 64)]
    model, handle = sparsify.sparsify(m.build_model(), policy, m.example_inputs(), calibration=batches)
    mask = handle.sites["fc1"].module.mask
    rows, cols = torch.nonzero(mask, as_tuple=True)
    assert len(rows) == round(0.001 * 1568 * 784)
    assert torch.equal(cols, (rows % 784 + 392) % 784)  # each feature links to its near copy
    with pytest.raises(sparsify.SparsifyError, match="CSTI needs calibration data whose input features vary"):
        sparsify.sparsify(m.build_model(), policy, torch.zeros(2, 784))


def test_progress_shows_a_bar_of_the_layers_converted_and_is_off_by_default(capsys):
    m = load_example("mlp")
    sparsify.sparsify(m.build_model(), {**EVERY, "defaults": {"density": 0.3}}, m.example_inputs())
    assert "sparse layers" not in capsys.readouterr().err
    model, handle = sparsify.sparsify(m.build_model(), {**EVERY, "defaults": {"density": 0.3}}, m.example_inputs(),
                                      progress=True)
    err = capsys.readouterr().err
    assert "sparse layers:   0%" in err and "0/4" in err and len(handle.sites) == 4  # the bar clears itself when done


def test_masking_a_layer_keeps_no_float_copy_of_its_mask():
    """The rewrite adds one byte a weight (the bool mask); a cached float mask would add four."""
    layer = SparseLinear.from_linear(nn.Linear(8, 6), mask=erdos_renyi(6, 8, 0.5, torch.Generator().manual_seed(0)))
    assert layer._float_mask is None
    assert torch.all(layer.weight[~layer.mask] == 0) and torch.all(layer.weight[layer.mask] != 0)
