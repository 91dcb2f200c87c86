"""The csr backend: same numbers as the masked one, storage only for active links, evolution carried."""
import copy
import os
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

import sparsify
from sparsify import csr_kernels, csr_linear
from sparsify.csr_linear import CsrLinear
from sparsify.sparse_linear import SparseLinear
from sparsify.topology.initial import erdos_renyi

from model_zoo import load_example


def pair(out_features, in_features, density, bias=True, seed=0):
    torch.manual_seed(seed)
    mask = erdos_renyi(out_features, in_features, density, torch.Generator().manual_seed(seed))
    masked = SparseLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), mask=mask)
    return masked, CsrLinear.from_masked(masked)


@pytest.mark.parametrize("shape,density,bias,batch", [((30, 20), 0.1, True, (7,)), ((64, 128), 0.05, False, (3, 5)),
                                                      ((5, 300), 0.3, True, (2, 1, 4)), ((40, 40), 1.0, True, (6,))])
def test_forward_and_both_gradients_equal_the_masked_backend(shape, density, bias, batch):
    masked, csr = pair(*shape, density, bias)
    assert csr.values.numel() == masked.active_links  # storage only for active links
    x = torch.randn(*batch, shape[1])
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = masked(x1), csr(x2)
    assert torch.allclose(y1, y2, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
    assert torch.allclose(masked.weight.grad[masked.mask], csr.values.grad, atol=1e-5)
    if bias:
        assert torch.allclose(masked.bias.grad, csr.bias.grad, atol=1e-5)


def test_any_input_layout_gives_the_same_numbers_and_chained_layers_pass_the_kernel_layout_on():
    masked, csr = pair(48, 32, 0.1)
    _, after = pair(16, 48, 0.1, seed=1)
    base = torch.randn(6, 32)
    layouts = {"row-major": base.clone(), "transposed view": base.t().contiguous().t(),
               "strided slice": torch.stack([base, base], 2)[:, :, 0], "3-D": base.view(2, 3, 32)}
    expected = masked(base)
    for name, x in layouts.items():
        x = x.clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
        y = csr(x)
        assert torch.allclose(y.reshape(6, 48), expected, atol=1e-5), name
        y.sum().backward()
        assert torch.allclose(x.grad.reshape(6, 32), masked.weight.sum(0).expand(6, 32), atol=1e-5), name
    hidden = csr(base)
    assert hidden.t().is_contiguous()  # the layout the next layer's kernels take, after elementwise ops too
    assert torch.relu(hidden).t().is_contiguous()
    assert torch.allclose(after(torch.relu(hidden)), after.to_masked()(torch.relu(masked(base))), atol=1e-5)
    assert hidden.reshape(-1).shape == (6 * 48,)  # reshape works on it; view(-1) would need a copy


def test_a_sequence_models_output_is_contiguous_as_nn_linears():
    """DeepSeek-V2's rotary embedding views pairs of a projection's features as complex numbers,
    which needs the features innermost."""
    masked, csr = pair(48, 32, 0.1)
    x = torch.randn(2, 3, 32)
    y = csr(x)
    assert y.is_contiguous()
    pairs = torch.view_as_complex(y.view(2, 3, 4, 6, 2))
    assert torch.allclose(torch.view_as_real(pairs).reshape(2, 3, 48), masked(x), atol=1e-5)


def test_a_layer_a_dense_linear_reads_returns_its_output_contiguous():
    """torch's linear reads the transposed layout several times slower; the layers whose output only
    other csr layers read keep it."""
    def build(backend):
        torch.manual_seed(0)
        policy = {"version": 1, "seed": 0, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.1, "backend": backend}]}
        return sparsify.sparsify(load_example("mlp").MLP((32, 64, 64, 64, 10)), policy, torch.randn(2, 32))

    model, handle = build("csr")
    reference, _ = build("masked")
    assert {n: s.module.contiguous_output for n, s in handle.sites.items()} == {"fc1": False, "fc2": False, "fc3": True}
    outputs = {}
    for name in ("fc2", "fc3"):
        model.get_submodule(name).register_forward_hook(lambda _m, _a, y, name=name: outputs.__setitem__(name, y))
    x = torch.randn(8, 32)
    y, expected = model(x), reference(x)
    assert outputs["fc3"].is_contiguous() and outputs["fc2"].t().is_contiguous()
    assert torch.allclose(y, expected, atol=1e-5)
    y.sum().backward()
    expected.sum().backward()
    for name in ("fc1", "fc3"):
        layer, masked = model.get_submodule(name), reference.get_submodule(name)
        assert torch.allclose(layer.values.grad, masked.weight.grad[masked.mask], atol=1e-5)
    assert model.get_submodule("fc3").to_masked().contiguous_output  # carried across backends, both ways
    assert CsrLinear.from_masked(reference.get_submodule("fc3")).contiguous_output


def test_the_output_can_be_changed_in_place_as_a_linear_layer_s_can():
    """Falcon adds its bias to the projection's output in place: a custom Function returning a view
    would refuse that."""
    masked, csr = pair(24, 16, 0.2, bias=False)
    x = torch.randn(2, 3, 16)
    grads = []
    for layer in (masked, csr):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y += 1.0
        y.mul_(2.0).sum().backward()
        grads.append((y.detach(), xi.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5) and torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_conversions_and_state_dicts_move_between_backends_without_loss():
    masked, csr = pair(16, 24, 0.2)
    assert torch.equal(csr.weight, masked.weight) and torch.equal(csr.mask, masked.mask)
    back = csr.to_masked()
    assert torch.equal(back.weight, masked.weight) and torch.equal(back.bias, masked.bias)
    assert set(csr.state_dict()) == set(masked.state_dict()) == {"weight", "bias", "mask"}
    other_masked, other_csr = pair(16, 24, 0.5, seed=1)
    other_csr.load_state_dict(masked.state_dict())  # a masked checkpoint into a csr layer, other density
    assert torch.equal(other_csr.weight, masked.weight) and other_csr.active_links == masked.active_links
    other_masked.load_state_dict(csr.state_dict())
    assert torch.equal(other_masked.weight, masked.weight)


def test_auto_backend_picks_csr_at_low_density_and_masked_above():
    model = load_example("mlp").MLP((32, 64, 64, 64, 4))
    policy = {"version": 1, "rules": [{"match": {"name": "fc1"}, "density": 0.05},
                                      {"match": {"name": "fc2"}, "density": 0.5},
                                      {"match": {"name": "fc3"}, "density": 0.05, "backend": "masked"}]}
    model, handle = sparsify.sparsify(model, policy, torch.randn(2, 32))
    assert isinstance(model.fc1, CsrLinear) and isinstance(model.fc2, SparseLinear)
    assert isinstance(model.fc3, SparseLinear)


def run(backend, method, optimizer, steps=120, seed=0, total=None):
    torch.manual_seed(seed)
    model = load_example("mlp").MLP((24, 48, 48, 48, 4))
    policy = {"version": 1, "seed": 5, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.1, "method": method,
                                                  "backend": backend, "update": {"every": 10, "unit": "steps"}}]}
    model, handle = sparsify.sparsify(model, policy, torch.randn(2, 24))
    opt = optimizer(model.parameters())
    handle.attach(opt, total_steps=total or steps)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 24, generator=g)
        loss = nn.functional.cross_entropy(model(x), x[:, :4].argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, handle, opt


@pytest.mark.parametrize("method", ["SET", "RigL", "CHTs"])
@pytest.mark.parametrize("optimizer", [lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                                       lambda p: torch.optim.Adam(p, lr=3e-3)], ids=["sgd", "adam"])
def test_training_with_evolution_gives_the_masked_loss_curve(method, optimizer):
    """A short run (an update at step 10, ten steps after it). The kernels round differently (a
    sparse sum against a dense one, gradients agree to ~1e-9); over longer runs Adam amplifies
    that, and a tie in a ranking (equal gradients of two inactive links) can pick another link."""
    masked, handle_m, _ = run("masked", method, optimizer, steps=20)
    csr, handle_c, _ = run("csr", method, optimizer, steps=20)
    assert isinstance(handle_c.sites["fc2"].module, CsrLinear)
    assert len(handle_c.history) == len(handle_m.history) == 1
    assert max(abs(a - b) / abs(a) for a, b in zip(masked, csr)) <= 1e-4
    for name in ("fc1", "fc2", "fc3"):
        assert torch.equal(handle_m.sites[name].module.mask, handle_c.sites[name].module.mask)


def test_topology_update_carries_kept_links_values_and_optimizer_state():
    _, handle, opt = run("csr", "SET", lambda p: torch.optim.Adam(p, lr=3e-3), steps=9, total=100)
    layer = handle.sites["fc2"].module
    before_mask, before_weight = layer.mask.clone(), layer.weight.detach().clone()
    state = opt.state[layer.values]
    before_avg = torch.zeros_like(before_weight)
    before_avg[before_mask] = state["exp_avg"]
    x = torch.randn(16, 24)
    nn.functional.cross_entropy(handle.model(x), x[:, :4].argmax(1)).backward()
    expected = 0.9 * before_avg + 0.1 * layer.dense_weight_grad()  # Adam's first moment after this step
    opt.step()  # step 10: the optimizer moves every link, then the topology update
    assert len(handle.history) == 1 and not torch.equal(layer.mask, before_mask)
    after_avg = torch.zeros_like(before_weight)
    after_avg[layer.mask] = opt.state[layer.values]["exp_avg"]
    kept, grown = layer.mask & before_mask, layer.mask & ~before_mask
    assert state["exp_avg"].shape == layer.values.shape
    assert not after_avg[grown].any() and not layer.weight[grown].any()  # regrown: zero value, zero state
    moved = (after_avg - expected).abs() < 1e-9
    in_place = kept & ~moved  # removed and regrown at the same position: fresh too
    assert not after_avg[in_place].any() and not layer.weight[in_place].any()
    row = handle.history[0]["layers"]["fc2"]
    assert int(in_place.sum()) == round(row["overlap"] * row["regrown"])
    assert int((kept & moved).sum()) == int(before_mask.sum()) - row["removed"]  # every kept link kept its state


def gmp_run(backend, steps=60, interrupt_at=None, initial=None):
    """AdamW on a small MLP whose three layers prune (GMP) to 3%; optionally rebuilt and resumed from
    the model's and the optimizer's state_dicts at step ``interrupt_at``. The loss of every step."""
    policy = {"version": 1, "seed": 0, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.03, "method": "GMP",
                                                  "backend": backend, "update": {"every": 5, "unit": "steps"},
                                                  **({"density_decay": {"kind": "cubic", "initial_sparsity": 1 - initial}}
                                                     if initial else {})}]}

    def build():
        torch.manual_seed(0)
        model, handle = sparsify.sparsify(load_example("mlp").MLP((32, 64, 64, 64, 10)), policy, torch.randn(2, 32))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
        handle.attach(optimizer, total_steps=steps)
        return model, handle, optimizer

    model, handle, optimizer = build()
    g = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        if step == interrupt_at:
            saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
            model, handle, optimizer = build()
            model.load_state_dict(saved[0])
            optimizer.load_state_dict(saved[1])
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)  # stays alive into the next step, graph and all
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses, handle, optimizer


@pytest.mark.filterwarnings("ignore::sparsify.SparsifyWarning")
def test_backend_auto_moves_a_pruned_layer_to_csr_mid_training_and_a_resume_replays_it():
    masked, masked_handle, _ = gmp_run("masked")
    auto, handle, optimizer = gmp_run("auto")
    assert all(type(s.module) is SparseLinear for s in masked_handle.sites.values())  # masked was asked for
    assert all(type(s.module) is CsrLinear for s in handle.sites.values())  # dense at first, csr at <= 5%
    assert [s.module.contiguous_output for s in handle.sites.values()] == [False, False, True]  # fc4 reads fc3
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(s.module.values) in held and s.module.values in optimizer.state for s in handle.sites.values())
    switched = [r["step"] for r in handle.evolution.history if r["layers"]["fc2"].get("backend") == "csr"]
    assert len(switched) == 1 and all(s.module.density == pytest.approx(0.03, abs=0.001) for s in handle.sites.values())
    assert max(abs(a - b) / abs(a) for a, b in zip(masked, auto)) <= 1e-4  # the same training, other storage
    resumed, again, _ = gmp_run("auto", interrupt_at=switched[0] + 7)
    assert resumed == auto and all(type(s.module) is CsrLinear for s in again.sites.values())


@pytest.mark.filterwarnings("ignore::sparsify.SparsifyWarning")
def test_a_csr_layer_whose_link_count_shrinks_trains_like_the_masked_one():
    masked, _, _ = gmp_run("masked", initial=0.05)
    csr, handle, _ = gmp_run("csr", initial=0.05)
    assert all(type(s.module) is CsrLinear and s.module.values.numel() < 0.04 * s.module.mask.numel()
               for s in handle.sites.values())
    assert max(abs(a - b) / abs(a) for a, b in zip(masked, csr)) <= 1e-4


@pytest.mark.parametrize("name", ["nanogpt", "hf_llama", "hf_gpt2", "torch_transformer"])
def test_transformers_train_on_csr_as_on_masked(name):
    """Their code views and splits the projections' outputs."""
    def losses(backend):
        module = load_example(name)
        torch.manual_seed(0)
        model, x = module.build_model(), module.example_inputs()
        model, handle = sparsify.sparsify(model, {"version": 1, "unmatched": "sparsify", "defaults": {
            "density": 0.04, "backend": backend, "method": "SET", "update": {"every": 2, "unit": "steps"}}}, x)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle.attach(optimizer, total_steps=6)
        out = []
        for _ in range(5):
            output = model(**x) if isinstance(x, dict) else model(*x)
            logits = output.logits if hasattr(output, "logits") else output[0] if isinstance(output, tuple) else output
            loss = logits.float().pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            out.append(float(loss))
        assert {type(s.module) for s in handle.sites.values()} == {CsrLinear if backend == "csr" else SparseLinear}
        return out

    masked, csr = losses("masked"), losses("csr")
    assert max(abs(a - b) / abs(a) for a, b in zip(masked, csr)) <= 1e-4


def test_a_link_count_change_on_a_parameter_held_elsewhere_is_a_clear_error():
    _, csr = pair(16, 24, 0.2)
    held = csr.values.view(-1)  # as DistributedDataParallel's buckets hold it
    mask = csr.mask.clone()
    mask[mask.nonzero()[0].tolist()] = False  # one link fewer
    with pytest.raises(sparsify.SparsifyError, match=r"must change its number of links \(\d+ -> \d+, a density "
                                                     r"schedule\), but its parameter is held elsewhere .*use backend masked"):
        csr.set_topology(mask, torch.zeros_like(mask))
    assert held.numel() == csr.values.numel() and not torch.equal(csr.mask, mask)  # the layer is left as it was


@pytest.mark.filterwarnings("ignore::sparsify.SparsifyWarning")
def test_checkpoints_saved_before_backend_moves_existed_still_load(tmp_path):
    from sparsify.checkpoint import load_state

    _, handle, _ = gmp_run("auto", steps=20)
    model = handle.model
    old = {k: v for k, v in model.state_dict().items() if not k.endswith(".csr")}  # as an older version saved it
    load_state(model, old, tmp_path / "model.pt", "model.py")
    assert not any(bool(s.csr) for s in handle.evolution.state)
    with pytest.raises(sparsify.SparsifyError, match=r"missing fc1\.weight"):
        load_state(model, {k: v for k, v in old.items() if k != "fc1.weight"}, tmp_path / "model.pt", "model.py")


def test_a_link_removed_and_regrown_in_one_update_restarts_in_both_backends():
    """Its weight, gradient and moment restart at 0 in the masked backend as in csr (the masked
    backend once kept the moment of such a link, and the two backends' losses drifted apart)."""
    torch.manual_seed(0)
    mask = torch.rand(6, 5) < 0.5
    regrown = torch.zeros_like(mask)
    regrown[mask.nonzero()[0].tolist()[0], mask.nonzero()[0].tolist()[1]] = True  # active before and after
    masked = SparseLinear.from_linear(nn.Linear(5, 6), mask=mask)
    csr = CsrLinear.from_masked(masked)
    momentum = torch.randn(6, 5) * mask
    masked.weight.grad = torch.randn(6, 5) * mask
    kept = masked.set_topology(mask, regrown)
    after = masked.remap_state(momentum.clone(), kept)
    source = csr.set_topology(mask, regrown)
    after_csr = csr.remap_state(momentum[mask].clone(), source)
    assert float(after[regrown].abs().sum()) == 0 and float(masked.weight.grad[regrown].abs().sum()) == 0
    assert torch.equal(after[mask], after_csr) and torch.equal(masked.weight.detach(), csr.weight.detach())
    assert torch.equal(after[mask & ~regrown], momentum[mask & ~regrown])  # the other links keep theirs


def test_the_compiled_kernels_and_torchs_kernels_give_the_masked_numbers(monkeypatch):
    """Both paths of the csr backend, side by side: the compiled kernels when they build here (CI builds
    them), and torch's sparse kernels (SPARSIFY_CSR_KERNELS=torch), on batches that hit every
    vector width and the scalar tail, in float32 and float64; rows of about 24 links take the weight
    gradient's 16-link path and its 4-link and single remainders."""
    for dtype in (torch.float32, torch.float64):
        for batch in (1, 5, 16, 32, 37, 64, 100, 128, 256):
            masked, csr = pair(70, 120, 0.2, seed=batch)
            masked, csr = masked.to(dtype), csr.to(dtype)
            x = torch.randn(batch, 120, dtype=dtype)
            grads = {}
            for path in ("compiled", "torch"):
                if path == "torch":
                    monkeypatch.setenv(csr_kernels.ENV, "torch")
                elif csr_kernels.ops() is None:
                    continue  # no compiler here, or CI's second run with SPARSIFY_CSR_KERNELS=torch
                layer, xi = copy.deepcopy(csr), x.clone().requires_grad_()
                y = layer(xi)
                y.backward(torch.ones_like(y))
                grads[path] = (y, xi.grad, layer.values.grad, layer.bias.grad)
                monkeypatch.delenv(csr_kernels.ENV, raising=False)
            xm = x.clone().requires_grad_()
            ym = masked(xm)
            ym.backward(torch.ones_like(ym))
            expected = (ym, xm.grad, masked.weight.grad[masked.mask], masked.bias.grad)
            for path, got in grads.items():
                for a, b in zip(got, expected):
                    assert torch.allclose(a, b, atol=1e-5), (path, dtype, batch)


def test_the_compiled_layout_change_is_torchs_transpose_and_the_layers_use_it(monkeypatch):
    kernels = csr_kernels.ops()
    if kernels is None:  # no compiler, or CI's second run of this file: only torch's copy runs then
        assert csr_linear._transposed(torch.ones(3, 4)).is_contiguous()
        return
    for dtype in (torch.float32, torch.float64):
        for shape in ((1, 1), (16, 16), (37, 100), (256, 784), (100, 3)):
            a = torch.randn(*shape, dtype=dtype)
            assert torch.equal(kernels.transposed(a), a.t().contiguous()), (dtype, shape)
    calls = []
    counted = types.SimpleNamespace(transposed=lambda a: calls.append(tuple(a.shape)) or a.t().contiguous(),
                                    spmm=kernels.spmm, sampled=kernels.sampled)
    monkeypatch.setattr(csr_kernels, "ops", lambda: counted)
    _, csr = pair(48, 32, 0.1)
    csr.contiguous_output = True
    y = csr(torch.randn(6, 32))
    assert y.is_contiguous() and calls == [(6, 32), (48, 6)]  # the input in, the output out


def test_without_a_compiler_the_csr_backend_says_so_once_and_uses_torchs_kernels(monkeypatch):
    monkeypatch.delenv(csr_kernels.ENV, raising=False)  # CI runs this file with it set too
    monkeypatch.setattr(csr_kernels, "_state", {})
    monkeypatch.setattr(csr_kernels.shutil, "which", lambda name: None)
    masked, csr = pair(20, 10, 0.3)
    x = torch.randn(4, 10)
    with pytest.warns(sparsify.SparsifyWarning, match="no C.. compiler") as record:
        y = csr(x)
        csr(x)
    ours = [r for r in record if issubclass(r.category, sparsify.SparsifyWarning)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)
    assert torch.allclose(y, masked(x), atol=1e-5)


def test_a_build_that_fails_is_one_warning_line_and_training_goes_on(monkeypatch):
    monkeypatch.delenv(csr_kernels.ENV, raising=False)
    monkeypatch.setattr(csr_kernels, "_state", {})
    monkeypatch.setattr(csr_kernels, "SOURCE", csr_kernels.SOURCE.with_name("no_such_kernels.cpp"))
    with pytest.warns(sparsify.SparsifyWarning, match="build failed") as record:
        assert csr_kernels.ops() is None
    assert len(record) == 1 and "\n" not in str(record[0].message)


def test_backend_auto_follows_the_density_limit_measured_for_the_layers_shape(monkeypatch, tmp_path):
    """The calibration keeps the highest density at which csr was faster, measures each shape once and
    stores it for later processes; the plan then picks per layer from its shape's limit."""
    monkeypatch.delenv(csr_linear.AUTO_DENSITY_ENV)
    monkeypatch.setenv("SPARSIFY_KERNELS_DIR", str(tmp_path))
    monkeypatch.setattr(csr_linear, "_limits", {})
    measured = []

    def calibrate(out_features, in_features):
        measured.append((out_features, in_features))
        return 0.2 if out_features == 64 else 0.02  # fc1 (64x32): csr up to 20%; the others up to 2%

    monkeypatch.setattr(csr_linear, "calibrate", calibrate)
    model = load_example("mlp").MLP((32, 64, 32, 64, 4))
    policy = {"version": 1, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.1}]}
    model, _ = sparsify.sparsify(model, policy, torch.randn(2, 32))
    assert isinstance(model.fc1, CsrLinear) and isinstance(model.fc2, SparseLinear) and isinstance(model.fc3, CsrLinear)
    assert sorted(measured) == [(32, 64), (64, 32)]  # fc3 has fc1's shape: measured once
    monkeypatch.setattr(csr_linear, "_limits", {})  # a new process reads the stored limits
    assert csr_linear.csr_density_limit(64, 32) == 0.2 and len(measured) == 2
    monkeypatch.setenv(csr_linear.AUTO_DENSITY_ENV, "often")
    with pytest.raises(sparsify.SparsifyError, match="is not a number"):
        csr_linear.csr_density_limit(64, 32)


def test_the_calibration_finds_where_csr_stops_being_faster():
    """A clock under which every masked run takes 10 ticks and a csr run 3 ticks per density step
    (1%: 3, 2%: 6, 5%: 9, 10%: 12): csr is faster up to 5%, and nothing denser is measured after 10%."""
    calls, now = 0, 0

    def clock():
        nonlocal calls, now
        block = calls // 8  # 4 runs of 2 readings per contender: block 0 is masked, then csr at rising density
        if calls % 2 == 1:
            now += 10 if block == 0 else 3 * block
        calls += 1
        return now

    assert csr_linear.calibrate(16, 16, clock=clock) == 0.05
    assert calls == 8 * 5


RANK = """
import sys
import torch.distributed as dist
from sparsify import csr_linear
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
print(csr_linear.csr_density_limit(64, 48))
dist.destroy_process_group()
"""


def test_every_rank_of_a_distributed_run_takes_rank_zeros_density_limit(tmp_path):
    store = str(tmp_path / "store")
    ranks = []
    for rank, limit in ((0, "0.05"), (1, "0.0")):  # as if rank 1 had measured otherwise
        env = {**os.environ, csr_linear.AUTO_DENSITY_ENV: limit}
        ranks.append(subprocess.Popen([sys.executable, "-c", RANK, str(rank), store], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=240) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    assert [float(out.split()[-1]) for out, _ in outputs] == [0.05, 0.05]


def test_a_csr_layer_off_the_cpu_is_refused_at_attach_naming_the_masked_backend():
    """The csr kernels run on the CPU only (fc1's values on meta stand in for a GPU's: the check reads the
    device type)."""
    policy = {"version": 1, "rules": [{"match": {"regex": "fc[1-3]"}, "density": 0.05, "backend": "csr"}]}
    model, handle = sparsify.sparsify(load_example("mlp").MLP((32, 64, 64, 64, 10)), policy, torch.randn(2, 32))
    model.fc1.values = nn.Parameter(torch.empty_like(model.fc1.values, device="meta"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(sparsify.SparsifyError, match="layer fc1 uses backend csr, whose kernels run on the CPU only, "
                                                     "and is on meta; give it backend: masked"):
        handle.attach(optimizer, total_steps=10)


def test_apply_mask_adopts_a_mask_changed_in_place_as_the_masked_layer_does():
    torch.manual_seed(0)
    linear = nn.Linear(12, 8)
    mask = torch.rand(8, 12) < 0.5
    masked = SparseLinear.from_linear(linear, mask=mask)
    csr = CsrLinear.from_masked(SparseLinear.from_linear(linear, mask=mask))
    for layer in (masked, csr):
        layer.mask[:, :3] = False  # some links out
        layer.mask[0, 5] = True    # one in, at 0
        layer.apply_mask()
    x = torch.randn(4, 12)
    assert csr.values.shape[0] == int(masked.mask.sum())
    torch.testing.assert_close(csr(x), masked(x))
    torch.testing.assert_close(csr.to_linear().weight, masked.to_linear().weight)


@pytest.mark.parametrize("kernels", ["compiled", "torch"])
def test_an_input_of_another_width_is_refused_on_both_kernel_paths(monkeypatch, kernels):
    if kernels == "torch":
        monkeypatch.setenv(csr_kernels.ENV, "torch")
    layer = CsrLinear.from_masked(SparseLinear.from_linear(nn.Linear(6, 4), mask=torch.ones(4, 6, dtype=torch.bool)))
    with pytest.raises(RuntimeError, match="the input has 7 features in its last dimension, the layer takes 6"):
        layer(torch.randn(3, 7))
