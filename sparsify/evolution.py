"""Topology evolution at scheduled optimizer steps: the runtime of dynamic sparse training.

The rewrite registers one :class:`Evolution` module in the transformed model, as
``model.sparsify_evolution`` (in a GraphModule also as a node at the start of the graph). Its state
(the step, the schedule's length, the random generator, the positions each layer has explored,
which layers are frozen) is in the model's state_dict next to the layers' masks, so a checkpoint
of ``model.state_dict()`` and ``optimizer.state_dict()`` resumes exactly.

A training loop registers its optimizer once; every ``optimizer.step()`` then counts, and the
steps the policy schedules end with a topology update::

    model, handle = sparsify(model, "policy.yaml", example_inputs)
    optimizer = torch.optim.AdamW(model.parameters())
    handle.attach(optimizer, total_steps=epochs * len(loader), steps_per_epoch=len(loader))

A custom loop can instead call ``handle.evolution.step()`` after each optimizer step (attach
with ``hook=False``). Steps taken in eval mode are not counted, and forward passes in eval mode or
under ``torch.no_grad()`` never touch the topology.

One update of a layer, at step t (ALGORITHMS: gradual pruning, removal, percolation, regrowth):

1. prune to the scheduled density (density decay), hard, by the decay's score;
2. remove ζ_t of the active links by the removal score (hard, or soft with δ_t);
3. percolate across the coupling groups of the layers updated at this step;
4. regrow exactly the links needed to reach the scheduled density, at inactive positions only;
5. zero the weights, gradients and optimizer moments of every inactive position (regrown links
   start at zero).
"""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from sparsify.csr_linear import CsrLinear, csr_density_limit
from sparsify.errors import SparsifyError
from sparsify.policy import EMS_EXTRA, LayerSpec
from sparsify.sparse_linear import SparseLinear, full_tensor, is_sharded
from sparsify.topology import bits
from sparsify.topology.initial import link_count
from sparsify.topology.metrics import active_neuron_rate, explored, itop_rate, overlap_rate
from sparsify.topology.percolation import NeuronGraph, percolate
from sparsify.topology.regrowth import REGROWTH_PREDICTORS, regrow
from sparsify.topology.removal import REMOVAL_SCORES, remove
from sparsify.topology.schedules import DENSITY_DECAYS, SOFT_RAMPS, ZETA_SCHEDULES

# Optimizer state with one value per weight that must restart at zero on a changed link.
MOMENTS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
DENSE_GRADIENT_PREDICTORS = {"gradient"}


class LayerState(nn.Module):
    """One layer's evolution state: the positions ever active (ITOP), packed eight to a byte, and the
    early-stop flag."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.positions = mask.numel()
        self.register_buffer("ever", explored(None, mask.detach()))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool, device=mask.device))
        self.register_buffer("csr", torch.zeros((), dtype=torch.bool, device=mask.device))  # switched from masked

    def explore(self, mask: torch.Tensor) -> None:
        explored(self.ever, mask)

    def itop(self) -> float:
        return itop_rate(self.ever, self.positions)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "csr", torch.zeros((), dtype=torch.bool))  # saved before backend switches
        ever = state_dict.get(prefix + "ever")
        if ever is not None and ever.dtype == torch.bool:  # saved unpacked, one byte per position
            state_dict[prefix + "ever"] = explored(None, ever)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _replay_switches_after_load(evolution: "Evolution", _incompatible_keys) -> None:
    evolution._read_counts()
    evolution._replay_switches()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Evolution(nn.Module):
    """The scheduled topology evolution of a model's sparse layers (see the module docstring).

    ``history`` holds one record per update (step, ANP, and per layer: density, scheduled density,
    pruned, removed, percolated links and neurons, regrown, overlap, ITOP, frozen); functions in
    ``listeners`` are called with each record as it is made.
    """

    def __init__(self, layers: dict[str, SparseLinear], specs: dict[str, LayerSpec], generator: torch.Generator,
                 graph_of: Callable[[frozenset], NeuronGraph]):
        """``graph_of(names)``: the neuron graph among ``names``, the other layers counted as dense
        neighbours (for percolation among the layers updated together, and ANP over all)."""
        super().__init__()
        self.names = list(layers)
        self._layers = dict(layers)  # owned by the model; kept here by reference, not registered
        self.specs = dict(specs)
        self._graph_of = graph_of
        self._graphs: dict[frozenset, NeuronGraph] = {}
        self.graph = self._graph(frozenset(self.names))
        # on the layers' device, as after model.to(device): DDP broadcasts buffers on its process group's device
        device = next((layers[n].mask.device for n in self.names if not layers[n].mask.is_meta), torch.device("cpu"))
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("steps_per_epoch", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("rng_state", generator.get_state().to(device))  # the generator itself is a CPU one
        # the three counts as Python ints, read every step without reading a (possibly CUDA) tensor: kept
        # equal to the buffers, and read back from them after a load and at attach() and update()
        self._steps = self._total = self._per_epoch = 0
        self.state = nn.ModuleList(LayerState(layers[n].mask) for n in self.names)
        self._state_of = dict(zip(self.names, self.state))
        self._optimizers: list[torch.optim.Optimizer] = []
        self._warned: set[tuple[str, str]] = set()
        self._reapply_masks = False
        self._armed_for: int | None = None
        self.history: list[dict] = []
        self.listeners: list[Callable[[dict], None]] = []
        self._parents: dict[str, tuple[nn.Module, str]] = {}  # where each layer sits, to switch its backend
        self.register_load_state_dict_post_hook(_replay_switches_after_load)

    # -- the schedule ----------------------------------------------------------------------------

    @property
    def step_index(self) -> int:
        """Optimizer steps counted so far."""
        return self._steps

    def _read_counts(self) -> None:
        """The Python counts from the buffers (after they were loaded)."""
        self._steps, self._total = int(self.step_count), int(self.total_steps)
        self._per_epoch = int(self.steps_per_epoch)

    @property
    def evolving(self) -> list[str]:
        """Layers whose topology changes at some step (method other than static, or a density decay)."""
        return [n for n in self.names if self.specs[n].update is not None]

    def layer(self, name: str) -> SparseLinear:
        return self._layers[name]

    def _state(self, name: str) -> LayerState:
        return self._state_of[name]

    def interval(self, name: str) -> int | None:
        """Steps between two updates of ``name`` (None: it never updates)."""
        update = self.specs[name].update
        if update is None:
            return None
        every = int(update.every)
        if update.unit == "epochs":
            per_epoch = self._per_epoch
            if per_epoch <= 0:
                raise SparsifyError(f"layer {name} updates its topology every {every} epoch(s), but the number "
                                    "of steps per epoch is unknown: pass steps_per_epoch= to attach()")
            every *= per_epoch
        return every

    def t_end(self, name: str) -> int:
        """The step from which ``name`` no longer updates (T_end)."""
        return int(round(self.specs[name].t_end * self._total))

    def last_update(self, name: str) -> int | None:
        """The step of ``name``'s last update (None: no update fits before T_end)."""
        every = self.interval(name)
        if every is None:
            return None
        last = (self.t_end(name) - 1) // every * every
        return last if last > 0 else None

    def due(self, name: str, step: int) -> bool:
        """Whether ``name`` updates at the end of optimizer step ``step``."""
        every = self.interval(name)  # checked first: it runs every step, the flag's read costs more
        if every is None or not (step % every == 0 and 0 < step < self.t_end(name)):
            return False
        return not bool(self._state(name).frozen)

    def scheduled_density(self, name: str, step: int) -> float:
        """The density ``name`` has after an update at ``step`` (its final density from its last update)."""
        spec = self.specs[name]
        decay = spec.density_decay
        last = self.last_update(name)
        if decay.kind == "none" or (last is not None and step >= last):
            return spec.density
        total = self._total
        return DENSITY_DECAYS[decay.kind](step, t0=decay.start * total, tf=decay.end * total,
                                          d_i=spec.initial_density, d_f=spec.density, steepness=decay.steepness,
                                          halved_window=decay.halved_window,
                                             t_end=self.t_end(name), last=last if last is not None else total,
                                             extra=EMS_EXTRA)

    def _require_schedule(self) -> None:
        if self.evolving and self._total <= 0:
            raise SparsifyError(
                "the topology evolution does not know the length of training: call "
                "handle.attach(optimizer, total_steps=..., steps_per_epoch=...) before training")

    # -- wiring into a training loop -------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int | None = None,
               hook: bool = True):
        """Register ``optimizer`` (its moments are reset on changed links) and the schedule's length.

        With ``hook`` (the default) every ``optimizer.step()`` is followed by :meth:`step`; the
        returned handle's ``remove()`` undoes that. Without it, call :meth:`step` yourself.
        """
        if not isinstance(total_steps, int) or total_steps < 1:
            raise SparsifyError(f"attach: total_steps must be a positive number of optimizer steps, got {total_steps!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise SparsifyError(f"attach: steps_per_epoch must be a positive integer, got {steps_per_epoch!r}")
        sharded_csr = [n for n in self.names if is_sharded(self._layers[n].trainable)
                       and not isinstance(self._layers[n], SparseLinear)]
        if sharded_csr:
            raise SparsifyError(f"attach: layer {sharded_csr[0]} uses backend csr, whose values FSDP cannot shard "
                                "by rows of the layer; give it backend: masked in the policy for a run with fully_shard")
        off_cpu = [n for n in self.names if not isinstance(self._layers[n], SparseLinear)
                   and self._layers[n].trainable.device.type != "cpu"]
        if off_cpu:
            device = self._layers[off_cpu[0]].trainable.device
            raise SparsifyError(f"attach: layer {off_cpu[0]} uses backend csr, whose kernels run on the CPU only, and is "
                                f"on {device}; give it backend: masked in the policy to train on {device.type}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n in self.evolving if id(self._layers[n].trainable) not in held]
        if missing:
            raise SparsifyError(f"attach: the optimizer does not hold the weight of {', '.join(missing)}; "
                                "create it from model.parameters() after sparsify() (and after fully_shard)")
        self.total_steps.fill_(total_steps)
        self.steps_per_epoch.fill_(steps_per_epoch or 0)
        self._read_counts()
        idle = []
        for name in self.evolving:  # epochs without steps_per_epoch, or no update at all: say so now
            if self.last_update(name) is not None:
                continue
            every, t_end = self.interval(name), self.t_end(name)
            if self.specs[name].density_decay.kind != "none":
                raise SparsifyError(
                    f"layer {name} must prune from density {self.specs[name].initial_density:g} to "
                    f"{self.specs[name].density:g}, but no update fits: every {every} steps, and updates stop at "
                    f"step {t_end} (t_end {self.specs[name].t_end:g} of {total_steps}); update more often or train longer")
            idle.append(f"{name} (every {every} steps, updates stop at step {t_end})")
        if idle:
            warnings.warn(f"sparsify: no topology update fits in {total_steps} steps for {', '.join(idle)}; "
                          "these layers keep their initial topology", RuntimeWarning, stacklevel=3)
        if all(o is not optimizer for o in self._optimizers):
            self._optimizers.append(optimizer)
        if hook:
            return optimizer.register_step_post_hook(lambda _opt, _args, _kwargs: self.step())
        return None

    def forward(self, *passthrough):
        """Called before each forward pass of the model: when the coming optimizer step ends with a
        gradient-based regrowth, ask those layers to keep their dense gradient (and only then).

        Returns its input unchanged: in an ``nn.Sequential`` the module is the last element and
        passes the output through.
        """
        result = passthrough[0] if len(passthrough) == 1 else (passthrough or None)
        if not (self.training and torch.is_grad_enabled()) or self._total <= 0:
            return result
        coming = self._steps + 1
        if self._armed_for == coming:
            return result
        self._armed_for = coming
        for name in self.names:
            layer = self._layers[name]
            capture = self.specs[name].regrowth.predictor in DENSE_GRADIENT_PREDICTORS and self.due(name, coming)
            if layer.capture_dense_grad != capture:  # set only on change: a module's setattr is slow
                layer.capture_dense_grad = capture
            if layer.dense_grad is not None:
                layer.dense_grad = None
        return result

    @torch.no_grad()
    def step(self) -> dict | None:
        """Count one optimizer step; run the topology update when one is scheduled (returns its record).

        Inactive weights get zero gradient and, once their moments are reset, no update from SGD,
        Adam or AdamW; after an optimizer with state sparsify could not reset, every step also
        re-applies the masks, so no inactive weight drifts from zero.
        """
        if not self.training:
            return None
        self._require_schedule()
        if self._reapply_masks:
            for layer in self._layers.values():
                layer.apply_mask()
        self.step_count.add_(1)  # in place: no module setattr on every step
        self._steps += 1
        step = self._steps
        due = [n for n in self.names if self.due(n, step)]
        return self.update(due) if due else None

    # -- one update -------------------------------------------------------------------------------

    def _graph(self, names: frozenset) -> NeuronGraph:
        if names not in self._graphs:
            self._graphs[names] = self._graph_of(names)
        return self._graphs[names]

    def _scores(self, kind: str, name: str, mask: torch.Tensor, args: dict) -> torch.Tensor:
        """The removal score ``kind`` of ``name``'s active links; ``args``: the score's alpha and gamma."""
        layer = self._layers[name]
        args = dict(args)
        if kind == "MEST":
            grad = layer.dense_weight_grad()
            if grad is None:
                raise SparsifyError(f"layer {name}: the MEST removal score needs the gradient of the last "
                                    "backward pass; the update runs right after optimizer.step(), before zero_grad()")
            args["grad"] = full_tensor(grad)
        # sharded by FSDP2, the weight is gathered: every rank scores the whole layer, identically
        return REMOVAL_SCORES[kind](full_tensor(layer.weight.detach()), mask, **args)

    def _dense_grad(self, name: str) -> torch.Tensor:
        layer = self._layers[name]
        grad = layer.dense_grad
        if grad is None:
            raise SparsifyError(
                f"layer {name}: gradient-based regrowth at step {self._steps} found no dense gradient. "
                "The model's forward must run in training mode with gradients enabled in the step before the "
                "update (the evolution arms the capture from the forward), and the step must be counted once.")
        if _world_size() > 1:
            dist.all_reduce(grad)
            grad.div_(_world_size())
        return grad

    @torch.no_grad()
    def update(self, names: list[str]) -> dict:
        """Update the topology of ``names`` at the current step (see the module docstring)."""
        started = time.perf_counter()
        self._read_counts()
        step = self._steps
        generator = torch.Generator()
        generator.set_state(self.rng_state.cpu())
        grads = {n: self._dense_grad(n) for n in names
                 if self.specs[n].regrowth.predictor in DENSE_GRADIENT_PREDICTORS}
        before = {n: self._layers[n].mask.clone() for n in names}
        masks, rows = {}, {}
        for name in names:
            spec = self.specs[name]
            mask = before[name]
            layer = self._layers[name]
            density = self.scheduled_density(name, step)
            target = link_count(layer.out_features, layer.in_features, density)
            row = rows[name] = {"scheduled_density": density, "pruned": 0, "removed": 0,
                                "percolated_links": 0, "percolated_neurons": 0}
            active = bits.count(mask)
            ems = spec.density_decay.kind == "ems"
            if active > target and not ems:  # gradual pruning down to the scheduled density
                decay = spec.density_decay
                scores = self._scores(decay.score, name, mask, {"alpha": 0.0} if decay.score == "RI" else {})
                mask = remove(mask, scores, active - target, generator, mode="hard")
                row["pruned"] = active - target
            t_end = self.t_end(name)
            if ems:  # EM&S removes down to the final density, whatever zeta says
                zeta = None
                count = max(bits.count(mask) - link_count(layer.out_features, layer.in_features, spec.density), 0)
            else:
                zeta = ZETA_SCHEDULES[spec.removal.zeta_schedule](step, t_end, spec.removal.zeta)
                count = int(round(zeta * bits.count(mask)))
            row["zeta"] = zeta
            if count:
                removal = spec.removal
                delta = SOFT_RAMPS[removal.ramp](step, t_end, removal.delta.start, removal.delta.end)
                scores = self._scores(removal.score, name, mask, removal.score_args())
                mask = remove(mask, scores, count, generator, mode=removal.mode, delta=delta)
                row["removed"] = count
                if removal.mode == "soft":
                    row["delta"] = delta
            row["target"] = target
            masks[name] = mask
        percolating = frozenset(n for n in names if self.specs[n].percolation)
        if percolating:
            result = percolate({n: masks[n] for n in percolating}, self._graph(percolating))
            for n in percolating:
                rows[n]["percolated_links"] = bits.count(result.removed[n])
                rows[n]["percolated_neurons"] = _emptied(masks[n].cpu(), result.masks[n].cpu())
                masks[n] = result.masks[n].to(masks[n].device)
        kept, regrown = dict(masks), {}
        for name in names:
            spec, layer, mask = self.specs[name], self._layers[name], masks[name]
            need = rows[name].pop("target") - bits.count(mask)
            if need > 0:
                scores = REGROWTH_PREDICTORS[spec.regrowth.predictor](mask, grad=grads.get(name))
                grown = regrow(mask, scores, need, generator, mode=spec.regrowth.mode)
            else:
                grown = mask
            regrown[name] = grown & ~mask
            masks[name] = grown
        if _world_size() > 1:  # every rank runs the same broadcasts, in the same order
            for name in names:
                buffer = masks[name].to(torch.uint8)
                dist.broadcast(buffer, 0)
                masks[name] = buffer.bool()
                regrown[name] = masks[name] & ~kept[name]  # rank 0's choice
        for name in names:
            self._commit(name, masks[name], regrown[name])
            if self._switchable(name):
                self._to_csr(name)
                rows[name]["backend"] = "csr"
        self.rng_state.copy_(generator.get_state())
        record = self._record(step, names, before, kept, rows, regrown, time.perf_counter() - started)
        self.history.append(record)
        for listener in self.listeners:
            listener(record)
        return record

    def _commit(self, name: str, mask: torch.Tensor, regrown: torch.Tensor) -> None:
        """The layer adopts its new mask (inactive and regrown weights 0), its explored positions grow,
        and the optimizers' state follows the links."""
        layer = self._layers[name]
        source = layer.set_topology(mask, regrown)
        layer.capture_dense_grad, layer.dense_grad = False, None
        self._state(name).explore(layer.mask)
        self._reset_moments(name, layer, source)

    # -- backend auto: masked while dense enough, csr once the density falls into csr's range ---------

    def _switchable(self, name: str) -> bool:
        """Whether layer ``name`` should move to csr storage now: its policy said backend auto, it
        is masked on the CPU, its density is in csr's range, and no process group would need its
        parameters to stay (DDP registers them once)."""
        layer = self._layers[name]
        return (self.specs[name].backend == "auto" and isinstance(layer, SparseLinear) and name in self._parents
                and layer.mask.device.type == "cpu" and not (dist.is_available() and dist.is_initialized())
                and layer.density <= csr_density_limit(layer.out_features, layer.in_features))

    def _to_csr(self, name: str) -> None:
        """Layer ``name`` continues as a CsrLinear: same weights, mask and bias (the same Parameter),
        and in every attached optimizer its weight's place and per-weight state go to the values."""
        old = self._layers[name]
        new = CsrLinear.from_masked(old).train(old.training)
        new.bias = old.bias
        if old.weight.grad is not None:
            new.values.grad = old.weight.grad[old.mask].clone()
        parent, leaf = self._parents[name]
        setattr(parent, leaf, new)
        self._layers[name] = new
        for optimizer in self._optimizers:
            for group in optimizer.param_groups:
                group["params"] = [new.values if p is old.weight else p for p in group["params"]]
            if old.weight in optimizer.state:
                state = optimizer.state.pop(old.weight)
                optimizer.state[new.values] = {k: v[old.mask].clone() if torch.is_tensor(v) and v.shape == old.mask.shape
                                               else v for k, v in state.items()}
        self._state(name).csr.fill_(True)

    def _replay_switches(self) -> None:
        """After loading a state in which layers had moved to csr, move them again (before the
        optimizer's state is loaded: its per-weight tensors have the values' shape)."""
        for name in self.names:
            if bool(self._state(name).csr) and isinstance(self._layers[name], SparseLinear) and name in self._parents:
                self._to_csr(name)

    def _reset_moments(self, name: str, layer, source) -> None:
        param = layer.trainable
        for optimizer in self._optimizers:
            state = optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if not torch.is_tensor(value) or value.dim() == 0:
                    continue
                if key in MOMENTS and (value.shape == param.shape or source is not None):
                    state[key] = layer.remap_state(value, source)
                elif (type(optimizer).__name__, key) not in self._warned:
                    self._warned.add((type(optimizer).__name__, key))
                    self._reapply_masks = True
                    warnings.warn(
                        f"sparsify: {type(optimizer).__name__} keeps state {key!r} (shape {list(value.shape)}) for "
                        f"the weight of {name}, which sparsify does not know how to reset for changed links "
                        f"(it resets {', '.join(MOMENTS)}); links regrown by the topology evolution start "
                        "from its stale values", RuntimeWarning, stacklevel=2)

    def _record(self, step, names, before, kept, rows, regrown, seconds) -> dict:
        layers = {}
        for name in names:
            mask = self._layers[name].mask
            layers[name] = {
                "density": bits.count(mask) / mask.numel(),
                "links": bits.count(mask),
                **rows[name],
                "regrown": bits.count(regrown[name]),
                "overlap": overlap_rate(before[name] & ~kept[name], regrown[name]),
                "itop": self._state(name).itop(),
            }
            early = self.specs[name].early_stop
            if early and layers[name]["overlap"] > early.overlap:
                self._state(name).frozen.fill_(True)
            layers[name]["frozen"] = bool(self._state(name).frozen)
        per_epoch = self._per_epoch
        return {"step": step, "epoch": step / per_epoch if per_epoch else None,
                "anp": active_neuron_rate({n: layer.mask for n, layer in self._layers.items()}, self.graph),
                "seconds": round(seconds, 4), "layers": layers}

    def extra_repr(self) -> str:
        parts = [f"step={int(self.step_count)}", f"total_steps={int(self.total_steps) or 'unset'}"]
        methods = sorted({self.specs[n].method for n in self.names})
        parts.append(f"layers={len(self.names)} ({', '.join(methods)})")
        return ", ".join(parts)


def _emptied(before: torch.Tensor, after: torch.Tensor) -> int:
    """Rows and columns that had links in ``before`` and have none in ``after``."""
    return sum(bits.count(bits.any_along(before, d) & ~bits.any_along(after, d)) for d in (0, 1))


def describe_spec(spec: LayerSpec) -> str:
    """A short text of a layer's evolution schedule, for inspect and reports."""
    if spec.update is None:
        return f"{spec.method}: fixed topology at density {spec.density:g}"
    update, removal, regrowth, decay = spec.update, spec.removal, spec.regrowth, spec.density_decay
    unit = update.unit
    amount = ("down to the target density (EM&S)" if decay.kind == "ems"
              else f"zeta {removal.zeta:g} ({removal.zeta_schedule})")
    text = (f"{spec.method}: every {update.every} {unit[:-1] if update.every == 1 else unit} until "
            f"{spec.t_end:.0%} of training; remove {amount} by {removal.score} {removal.mode}")
    if removal.mode == "soft":
        start, end = removal.delta.start, removal.delta.end
        text += (f" (T {start / (1 - start):g}->{end / (1 - end):g} linear)" if removal.ramp == "temperature"
                 else f" (delta {start:g}->{end:g})")
    text += f"; regrow {regrowth.predictor} {regrowth.mode}"
    if spec.percolation:
        text += "; percolation"
    if decay.kind == "ems":
        text += f"; density {spec.initial_density:g}->{spec.density:g} (EM&S, cut at the last update)"
    elif decay.kind != "none":
        text += (f"; density {spec.initial_density:g}->{spec.density:g} ({decay.kind}, "
                 f"{decay.start:.0%}-{decay.end:.0%})")
    if spec.early_stop:
        text += f"; freeze at overlap > {spec.early_stop.overlap:g}"
    return text
