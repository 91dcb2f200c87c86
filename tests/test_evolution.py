"""The topology evolution inside a transformed model: schedules, invariants, optimizer hygiene, resume."""
import copy
import warnings

import pytest
import torch
from torch import fx, nn

import sparsify
from sparsify.errors import SparsifyError
from sparsify.evolution import MOMENTS
from sparsify.policy import METHODS
from sparsify.topology.initial import link_count
from sparsify.topology.percolation import percolate

from conftest import NO_CUDA
from model_zoo import load_example

EVERY = {"version": 1, "unmatched": "sparsify"}


def mlp(sizes=(12, 24, 24, 24, 4)):
    torch.manual_seed(0)
    return load_example("mlp").MLP(sizes)


def policy(method, density=0.25, every=10, **fields):
    return {**EVERY, "seed": 3, "defaults": {"density": density, "method": method,
                                             "update": {"every": every, "unit": "steps"}, **fields}}


def batches(n, size=(16, 12), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(*size, generator=g)
        yield x, (x[:, :classes].argmax(1) if x.dim() == 2 else torch.randint(0, classes, size[:1], generator=g))


class Checker:
    """Checks every invariant of an update as it is recorded."""

    def __init__(self, handle, optimizer):
        self.handle, self.optimizer, self.updates = handle, optimizer, 0
        self.before = {n: s.module.mask.clone() for n, s in handle.sites.items()}
        handle.evolution.listeners.append(self)

    def __call__(self, record):
        self.updates += 1
        evolution = self.handle.evolution
        for name, row in record["layers"].items():
            layer = self.handle.sites[name].module
            old, new = self.before[name], layer.mask
            # density equals the schedule exactly
            assert row["links"] == int(new.sum()) == link_count(layer.out_features, layer.in_features,
                                                                 evolution.scheduled_density(name, record["step"]))
            # every link counted: nothing regrown on top of an active link, nothing lost
            assert int(old.sum()) - row["pruned"] - row["removed"] - row["percolated_links"] + row["regrown"] \
                == row["links"], (name, row)
            assert int((new & ~old).sum()) <= row["regrown"]
            # inactive weights, gradients and moments are zero; regrown links start at zero
            assert not layer.weight[~new].any()
            assert not layer.weight[new & ~old].any()
            if layer.weight.grad is not None:
                assert not layer.weight.grad[~new].any()
            for key, value in self.optimizer.state.get(layer.weight, {}).items():
                if key in MOMENTS:
                    assert not value[~new].any(), (name, key)
            self.before[name] = new.clone()


def train(model, handle, optimizer, steps, data=None, accumulate=1, device="cpu"):
    losses = []
    for x, y in data if data is not None else batches(steps * accumulate):
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y) / accumulate
        loss.backward()
        losses.append(float(loss.detach()))
        if len(losses) % accumulate == 0:
            optimizer.step()
            optimizer.zero_grad()
    return losses


@pytest.mark.parametrize("method", [m for m in METHODS if m != "static"])
def test_invariants_hold_over_two_thousand_steps_for_every_method(method, device):
    model, handle = sparsify.sparsify(mlp(), policy(method), torch.randn(2, 12))
    model.to(device)  # as the CLI does: sparsified on the CPU, trained on its device
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle.attach(optimizer, total_steps=2000)
    checker = Checker(handle, optimizer)
    losses = train(model, handle, optimizer, 2000, device=device)
    last = handle.evolution.last_update("fc1")
    assert checker.updates == len(handle.history) > 0
    if METHODS[method]["early_stop"] is None:  # CHT may freeze layers early (tested below)
        assert checker.updates == last // 10
    assert all(torch.isfinite(torch.tensor(losses)))
    for site in handle.sites.values():  # the final density is the policy's, exactly
        assert site.module.active_links == link_count(site.module.out_features, site.module.in_features, 0.25)
    if method not in ("GMP",):
        assert sum(r["layers"].get("fc2", {}).get("regrown", 0) for r in handle.history) > 0
    if METHODS[method]["density_decay"]["kind"] != "none":
        assert sum(r["layers"].get("fc2", {}).get("pruned", 0) for r in handle.history) > 0


def test_coupled_layers_percolate_together_over_two_thousand_steps(monkeypatch, device):
    """LLaMA-style decoder with RoPE and grouped-query attention under CHTs at 10%: after every
    percolation, gate/up rows are live together, q rows only with a live k partner, and a column of
    down or o only while the rows feeding it have input."""
    m = load_example("llama")
    model, x = m.build_model(), m.example_inputs()
    # removal by |W|: links of neurons that stop mattering go first, so neurons empty and percolate
    model, handle = sparsify.sparsify(model, policy("CHTs", density=0.1, every=20, removal={"score": "WM"}), x)
    model.to(device)
    graph = handle.neuron_graph()
    seen = []

    def checked(masks, g):
        result = percolate(masks, g)
        out = result.masks
        live = {n: mk.any(1) for n, mk in out.items()}
        for n, pairs in g.paired.items():  # RoPE's rotated pairs are one unit, live while either row is
            either = live[n][pairs[:, 0]] | live[n][pairs[:, 1]]
            live[n][pairs[:, 0]], live[n][pairs[:, 1]] = either, either
        for p in g.products:
            assert torch.equal(live[p.a][p.pairs[:, 0]], live[p.b][p.pairs[:, 1]])
        for c in g.contractions:
            q_live, k_live = live[c.q][c.pairs[:, 0]], live[c.k][c.pairs[:, 1]]
            assert bool((~q_live | k_live).all())
            for row in torch.nonzero(live[c.k]).flatten().tolist():  # a live k row has a live q partner
                assert bool(q_live[c.pairs[:, 1] == row].any())
        for c in g.chains:
            used = out[c.dst][:, c.columns].any(0)
            assert bool((~used | live[c.src][c.rows]).all())
        seen.append(result.total_removed)
        return result

    monkeypatch.setattr("sparsify.evolution.percolate", checked)
    assert graph.contractions and graph.products and graph.chains
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    handle.attach(optimizer, total_steps=2000)
    checker = Checker(handle, optimizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(2000):
        tokens = torch.randint(0, 128, (4, 9), generator=g).to(device)
        logits = model(tokens[:, :-1])
        nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert checker.updates == len(seen) == 74
    assert sum(seen) > 0  # percolation did remove links
    assert sum(r["layers"][n]["percolated_links"] for r in handle.history for n in r["layers"]) == sum(seen)


def test_static_policy_never_changes_the_topology_and_needs_no_schedule():
    model, handle = sparsify.sparsify(mlp(), {**EVERY, "defaults": {"density": 0.25}}, torch.randn(2, 12))
    masks = {n: s.module.mask.clone() for n, s in handle.sites.items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle.attach(optimizer, total_steps=50)
    train(model, handle, optimizer, 50)
    assert handle.history == [] and all(torch.equal(masks[n], s.module.mask) for n, s in handle.sites.items())


@pytest.mark.parametrize("make", [lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
                                  lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
                                  lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)])
def test_moments_of_changed_links_are_reset(make, device):
    model, handle = sparsify.sparsify(mlp(), policy("SET", density=0.3, every=5), torch.randn(2, 12))
    model.to(device)
    optimizer = make(model.parameters())
    handle.attach(optimizer, total_steps=100)
    Checker(handle, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known optimizers: no warning
        for x, y in batches(100):
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
            for site in handle.sites.values():  # inactive weights stay exactly zero between updates too
                assert not site.module.weight[~site.module.mask].any()
    state = optimizer.state[handle.sites["fc2"].module.weight]
    assert any(key in MOMENTS for key in state)


def test_unknown_optimizer_state_is_named_in_a_warning():
    model, handle = sparsify.sparsify(mlp(), policy("SET", every=5), torch.randn(2, 12))
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.01)
    handle.attach(optimizer, total_steps=20)
    with pytest.warns(RuntimeWarning, match=r"Adagrad keeps state 'sum' .* weight of fc1"):
        train(model, handle, optimizer, 20)


def test_dense_gradient_is_captured_only_before_a_rigl_update():
    model, handle = sparsify.sparsify(mlp(), policy("RigL", every=7), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=100)
    layer = handle.sites["fc2"].module
    armed = []
    for x, y in batches(100):
        nn.functional.cross_entropy(model(x), y).backward()
        armed.append(layer.capture_dense_grad)
        if layer.capture_dense_grad:  # the dense gradient covers inactive positions too
            assert layer.dense_grad is not None and layer.dense_grad[~layer.mask].abs().sum() > 0
        else:
            assert layer.dense_grad is None
        optimizer.step()
        optimizer.zero_grad()
    assert [i for i, a in enumerate(armed, 1) if a] == [r["step"] for r in handle.history] == list(range(7, 75, 7))


def test_gradient_accumulation_counts_optimizer_steps_and_sums_dense_gradients(device):
    """The masked layer's weight gradient and the dense gradient it keeps for RigL equal those of a
    dense layer whose weight is the masked one."""
    model, handle = sparsify.sparsify(mlp(), policy("RigL", every=5), torch.randn(2, 12))
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=40)
    data = [(x.to(device), y.to(device)) for x, y in batches(20)]
    layer = handle.sites["fc1"].module
    for i, (x, y) in enumerate(data[:16], 1):  # four optimizer steps of four micro-batches
        (nn.functional.cross_entropy(model(x), y) / 4).backward()
        if i % 4 == 0:
            optimizer.step()
            optimizer.zero_grad()
    assert handle.evolution.step_index == 4 and handle.history == []
    expected = torch.zeros_like(layer.weight)
    effective = (layer.weight * layer.mask).detach().requires_grad_()
    for x, y in data[16:20]:
        nn.functional.cross_entropy(model(x), y).div(4).backward()
        h = torch.relu(torch.nn.functional.linear(x, effective, layer.bias))
        rest = model.fc4(torch.relu(model.fc3(torch.relu(model.fc2(h)))))
        expected += torch.autograd.grad(nn.functional.cross_entropy(rest, y) / 4, effective)[0]
    assert torch.allclose(layer.dense_grad, expected, atol=1e-6)
    optimizer.step()
    assert handle.evolution.step_index == 5 and len(handle.history) == 1


def test_eval_mode_and_no_grad_do_not_evolve():
    model, handle = sparsify.sparsify(mlp(), policy("RigL", every=1), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=10)
    with torch.no_grad():
        model(torch.randn(3, 12))
    assert not any(s.module.capture_dense_grad for s in handle.sites.values())
    model.eval()
    nn.functional.cross_entropy(model(torch.randn(3, 12)), torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    assert handle.evolution.step_index == 0 and handle.history == []
    model.train()
    train(model, handle, optimizer, 3)
    assert handle.evolution.step_index == 3 and len(handle.history) == 3


def test_explicit_step_without_the_hook():
    model, handle = sparsify.sparsify(mlp(), policy("SET", every=5), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    assert handle.attach(optimizer, total_steps=30, hook=False) is None
    for x, y in batches(30):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.evolution.step()
    assert [r["step"] for r in handle.history] == [5, 10, 15, 20, 25]  # SET: T_end = the whole run


def test_schedule_errors_are_clear():
    model, handle = sparsify.sparsify(mlp(), policy("SET"), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(SparsifyError, match="call handle.attach"):
        handle.evolution.step()
    with pytest.raises(SparsifyError, match="total_steps must be a positive"):
        handle.attach(optimizer, total_steps=0)
    with pytest.raises(SparsifyError, match="does not hold the weight of fc1"):
        handle.attach(torch.optim.SGD(model.fc4.parameters(), lr=0.1), total_steps=10)
    model, handle = sparsify.sparsify(mlp(), policy("SET", update={"every": 1, "unit": "epochs"}), torch.randn(2, 12))
    with pytest.raises(SparsifyError, match="pass steps_per_epoch"):
        handle.attach(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


def test_cht_early_stop_freezes_a_layer_whose_regrowth_repeats_its_removal():
    # at density 0.9 of a tiny layer, the links regrown are mostly the ones just removed
    model, handle = sparsify.sparsify(mlp((6, 8, 8, 8, 3)), policy("CHT", density=0.9, every=2,
                                                                  early_stop={"overlap": 0.2}),
                                      torch.randn(2, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=100)
    train(model, handle, optimizer, 100, data=batches(100, size=(16, 6), classes=3))
    frozen = {n for r in handle.history for n, row in r["layers"].items() if row["frozen"]}
    assert frozen
    for name in frozen:  # a frozen layer is never updated again
        first = next(i for i, r in enumerate(handle.history) if r["layers"].get(name, {}).get("frozen"))
        assert all(name not in r["layers"] for r in handle.history[first + 1:])
        assert handle.history[first]["layers"][name]["overlap"] > 0.2


def test_metrics_of_every_update():
    model, handle = sparsify.sparsify(mlp(), policy("CHTs", density=0.1), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=200, steps_per_epoch=20)
    train(model, handle, optimizer, 200)
    first, last = handle.history[0], handle.history[-1]
    assert first["step"] == 10 and first["epoch"] == 0.5 and 0 < last["anp"] <= 1
    row = first["layers"]["fc2"]  # (the last update's cosine zeta removes nothing, so it has no delta)
    assert set(row) >= {"density", "scheduled_density", "pruned", "removed", "percolated_links",
                        "percolated_neurons", "regrown", "overlap", "itop", "frozen", "zeta", "delta"}
    itops = [r["layers"]["fc2"]["itop"] for r in handle.history]
    assert itops == sorted(itops) and itops[-1] > 0.1  # explored positions only grow
    deltas = [r["layers"]["fc2"]["delta"] for r in handle.history if "delta" in r["layers"]["fc2"]]
    assert 0.5 <= deltas[0] < deltas[-1] <= 0.75 and deltas == sorted(deltas)
    # the preset's official temperature ramp: T = delta / (1 - delta) rises linearly 1 -> 3 over T_end = 150
    temperatures = [(r["step"], r["layers"]["fc2"]["delta"] / (1 - r["layers"]["fc2"]["delta"])) for r in handle.history
                    if "delta" in r["layers"]["fc2"]]
    assert all(t == pytest.approx(1 + 2 * step / 150) for step, t in temperatures) and len(temperatures) >= 10


def test_graph_module_and_state_dict_carry_the_evolution():
    gm = fx.symbolic_trace(mlp())
    gm, handle = sparsify.sparsify(gm, policy("SET", every=3), torch.randn(2, 12))
    assert "sparsify_evolution" in gm.code
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=30)
    train(gm, handle, optimizer, 10)
    state = gm.state_dict()
    assert int(state["sparsify_evolution.step_count"]) == 10 and int(state["sparsify_evolution.total_steps"]) == 30
    assert state["sparsify_evolution.rng_state"].dtype == torch.uint8
    clone = copy.deepcopy(gm)
    assert clone.sparsify_evolution.layer("fc1") is clone.fc1


def test_explored_positions_take_one_bit_each_and_load_from_a_state_saved_unpacked():
    model, handle = sparsify.sparsify(mlp(), policy("SET", density=0.2, every=5), torch.randn(2, 12))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    handle.attach(optimizer, total_steps=40)
    ever = {n: s.module.mask.clone() for n, s in handle.sites.items()}
    for x, y in batches(40):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, site in handle.sites.items():
            ever[name] |= site.module.mask
    itops = handle.history[-1]["layers"]
    for i, (name, site) in enumerate(handle.sites.items()):
        state = handle.evolution.state[i]
        assert state.ever.dtype == torch.uint8 and state.ever.numel() == -(-site.module.mask.numel() // 8)
        assert itops[name]["itop"] == pytest.approx(ever[name].float().mean().item())
        assert itops[name]["itop"] > 0.2  # beyond the 0.2 density: the topology moved
    # a state saved when each position took a byte (bool, the mask's shape) loads packed
    saved = model.state_dict()
    for i, name in enumerate(handle.sites):
        saved[f"sparsify_evolution.state.{i}.ever"] = ever[name]
    fresh, fresh_handle = sparsify.sparsify(mlp(), policy("SET", density=0.2, every=5), torch.randn(2, 12))
    fresh.load_state_dict(saved)
    for i, state in enumerate(fresh_handle.evolution.state):
        assert torch.equal(state.ever, handle.evolution.state[i].ever)


def resumable_run(steps, stop=None, checkpoint=None, device=torch.device("cpu")):
    """A CHTs run on the MLP with AdamW on ``device``; optionally stopped after ``stop`` steps (returns a
    checkpoint) or resumed from ``checkpoint``. Returns (losses, masks, checkpoint)."""
    torch.manual_seed(0)  # seeds every device's generator
    model, handle = sparsify.sparsify(mlp(), policy("CHTs", density=0.2, every=7), torch.randn(2, 12))
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle.attach(optimizer, total_steps=steps)
    data = [(x.to(device), y.to(device)) for x, y in batches(steps)]
    start = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        start = checkpoint["step"]
    losses, masks = [], []
    for i in range(start, stop or steps):
        x, y = data[i]
        x = nn.functional.dropout(x, 0.1)  # uses the global RNG (the device's): it must resume too
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        masks.append(torch.cat([s.module.mask.flatten() for s in handle.sites.values()]))
    saved = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
             "rng": torch.get_rng_state(), "step": stop or steps}
    if device.type == "cuda":
        saved["cuda_rng"] = torch.cuda.get_rng_state(device)
    return losses, masks, saved


def test_interrupted_and_resumed_run_is_bitwise_identical(device):
    losses, masks, _ = resumable_run(120, device=device)
    first_losses, first_masks, checkpoint = resumable_run(120, stop=53, device=device)
    rest_losses, rest_masks, _ = resumable_run(120, checkpoint=checkpoint, device=device)
    resumed = first_losses + rest_losses
    assert len(resumed) == len(losses) == 120
    assert all(torch.equal(a, b) for a, b in zip(losses, resumed))
    assert all(torch.equal(a, b) for a, b in zip(masks, first_masks + rest_masks))
    assert not torch.equal(masks[0], masks[-1])  # the topology did evolve


def seeded_masks(device: str) -> list[dict]:
    """SET with sparse weight init on a model already on ``device`` when sparsified: the initial masks
    and weights, then the masks and weights after each of 20 updates made from the same weights (no
    optimizer step between them), all on the CPU."""
    spec = policy("SET", density=0.2, every=1, init={"model": "ER", "weights": "swi"})
    model, handle = sparsify.sparsify(mlp().to(device), spec, torch.randn(2, 12, device=device))
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {device}
    handle.attach(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=30, hook=False)
    def state():
        return {n: (s.module.mask.to("cpu", copy=True), s.module.weight.detach().to("cpu", copy=True))
                for n, s in handle.sites.items()}

    states = [state()]
    for _ in range(20):
        handle.evolution.step()
        states.append(state())
    assert len(handle.history) == 20
    return states


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_one_seed_gives_the_same_weights_and_masks_on_the_cpu_and_on_cuda():
    """The initial masks and weights are drawn on the CPU, and an update's selection runs on the CPU
    from the evolution's CPU generator: with removal by |W| and uniform regrowth, the same weights give
    the same masks on both devices."""
    on_cpu, on_cuda = seeded_masks("cpu"), seeded_masks("cuda")
    for before, after in zip(on_cpu, on_cuda):
        for name, (mask, weight) in before.items():
            assert torch.equal(mask, after[name][0]) and torch.equal(weight, after[name][1]), name
    assert not torch.equal(on_cpu[0]["fc2"][0], on_cpu[-1]["fc2"][0])  # the topology did change


def test_a_schedule_with_no_update_is_refused_or_warned():
    model, handle = sparsify.sparsify(mlp(), policy("GMP", every=50), torch.randn(2, 12))
    with pytest.raises(SparsifyError, match=r"layer fc1 must prune from density 1 to 0.25, but no update fits: "
                                            r"every 50 steps, and updates stop at step 30"):
        handle.attach(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=40)
    model, handle = sparsify.sparsify(mlp(), policy("SET", every=50), torch.randn(2, 12))
    with pytest.warns(RuntimeWarning, match=r"no topology update fits in 40 steps for fc1 \(every 50 steps, "
                                            r"updates stop at step 40\), fc2"):
        handle.attach(torch.optim.SGD(model.parameters(), lr=0.1), total_steps=40)


def test_ems_starts_five_points_above_grows_then_cuts_to_the_target():
    """EM&S at 10%: 15% until 60% of T_end, 12.5% after, exactly 10% from the last update on."""
    model, handle = sparsify.sparsify(mlp(), policy("CHTs", density=0.1, density_decay={"kind": "ems"}),
                                      torch.randn(2, 12))
    layer = handle.sites["fc2"].module
    assert layer.active_links == link_count(24, 24, 0.15)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle.attach(optimizer, total_steps=200, steps_per_epoch=20)  # T_end 150: updates at 10, ..., 140
    checker = Checker(handle, optimizer)
    train(model, handle, optimizer, 200)
    links = {r["step"]: r["layers"]["fc2"]["links"] for r in handle.history}
    assert sorted(links) == list(range(10, 150, 10)) and checker.updates == 14
    assert all(links[s] == link_count(24, 24, 0.15) for s in range(10, 100, 10))  # step <= 0.6 * 150
    assert all(links[s] == link_count(24, 24, 0.125) for s in (100, 110, 120, 130))
    assert links[140] == link_count(24, 24, 0.1) == layer.active_links and handle.at_target()
    removed = handle.history[0]["layers"]["fc2"]
    assert removed["zeta"] is None and removed["removed"] == link_count(24, 24, 0.15) - link_count(24, 24, 0.1)
