"""MergeLoR2C, InjectLoR2C and IMLoR2C: the LoR2C layout changes during training.

Spectral score of an adapter (A r x d, B d x r): the singular values sigma_1..sigma_r of B A, taken
from the r x r core. With B = Q_B R_B and A^T = Q_A R_A (thin QR), B A = Q_B (R_B R_A^T) Q_A^T, and
the Q factors have orthonormal columns, so sigma(B A) = sigma(R_B R_A^T):

    mean mode (default):  score = (sum_i sigma_i) / d          (mean singular value of the d x d product)
    top-k mode (sfs_k=k): score = (sum of the k largest) / (sum of all), 0 when all are 0

Merge: among adjacent active adapters (end of one + 1 = start of the next) whose joint span is at
most `max_merge_length` blocks, the pair with the smallest score sum (ties: lowest blocks) becomes
one adapter over both spans, starting from the lower one's weights and optimizer state; the upper
one is retired. Inject: the single-block adapter with the largest score (ties: lowest block) is
retired and the q/v LoRA of rank r/2 of its block (B = 0) is switched on. Schedule (METHOD.md 8):
after epoch k (1-based), a merge if k is a multiple of floor(E / 4 / M) + 1, then an injection if k
is a multiple of floor(E / 4 / D) + 1, while budgets last (event_schedule: epochs); by default the
events are spread over the first quarter of the optimizer steps (event_schedule: quarter), or come
every `event_every_steps` steps.

Under DeepSpeed the optimizer is built once over a fixed parameter set, so every tensor a layout can
use exists from the start: a merge reuses the lower adapter's tensors; injected LoRA is allocated
switched off. A retired tensor is set to zero together with its Adam moments: it is out of the
forward, gets no gradient, and AdamW keeps a zero with zero moments at zero, so it is never stepped
again and nothing of it decays into the output. A switched-on LoRA gets fresh A (Kaiming), B = 0 and
a fresh Adam state (zero moments, step count 0): each block's injectable LoRA has an optimizer group of
its own, since DeepSpeed keeps one step count per group. Decisions are taken on rank 0 from the fp32
master weights and broadcast.
"""
from __future__ import annotations

import json
import logging
import math

import torch
from torch import nn

from . import engine as ds
from .adapters import LoRA, get_layout, set_layout, trainable_summary
from .adapters.config import AdapterConfig, ConfigError
from .callbacks import Callback

log = logging.getLogger(__name__)


def spectral_values(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The r singular values of B A, from the r x r core (never the d x d product), in fp32."""
    _, r_b = torch.linalg.qr(B.float())
    _, r_a = torch.linalg.qr(A.float().T)
    return torch.linalg.svdvals(r_b @ r_a.T)


def spectral_score(A: torch.Tensor, B: torch.Tensor, k: int | None = None) -> float:
    sigma = spectral_values(A, B)
    if k is None:
        return float(sigma.sum() / B.shape[0])
    total = float(sigma.sum())
    return float(torch.topk(sigma, k).values.sum()) / total if total > 0 else 0.0


def choose_merge(spans: dict[str, list], scores: dict[str, float], max_length: int) -> tuple[str, str] | None:
    """(lower key, upper key) of the adjacent active pair with the smallest score sum, or None."""
    active = sorted((start, end, key) for key, (start, end, on) in spans.items() if on)
    pairs = [(scores[lo] + scores[hi], s1, lo, hi) for (s1, e1, lo), (s2, e2, hi) in zip(active, active[1:])
             if s2 == e1 + 1 and e2 - s1 + 1 <= max_length]
    return min(pairs)[2:] if pairs else None


def choose_injection(spans: dict[str, list], scores: dict[str, float]) -> str | None:
    """Key of the active single-block adapter with the largest score (ties: lowest block), or None."""
    singles = [(-scores[key], start, key) for key, (start, end, on) in spans.items() if on and start == end]
    return min(singles)[2] if singles else None


class EventSchedule:
    """Which events fall on an optimizer step.

    quarter (default): the k-th of M merges at step ceil(k Q / M), the k-th of D injections at
    ceil(k Q / D), Q = floor(T / 4) of the T optimizer steps: every event in the first quarter at any
    budget. epochs: the reference formula (METHOD.md 8), whose interval is one epoch whenever E < 4M,
    so at short budgets its events leave the first quarter. event_every_steps=N: every N steps.
    """

    def __init__(self, cfg: AdapterConfig, epochs: int, steps_per_epoch: int, total_steps: int):
        self.cfg, self.steps_per_epoch, self.total_steps = cfg, steps_per_epoch, total_steps
        self.epochs = max(1, epochs)
        self.merge_every = self.epochs // 4 // cfg.merges + 1 if cfg.merges else None
        self.inject_every = self.epochs // 4 // cfg.injections + 1 if cfg.injections else None
        quarter = total_steps // 4
        self.steps = {kind: [math.ceil(k * quarter / budget) for k in range(1, budget + 1)]
                      for kind, budget in (("merge", cfg.merges), ("inject", cfg.injections)) if budget}

    @property
    def mode(self) -> str:
        return "every_steps" if self.cfg.event_every_steps else self.cfg.event_schedule

    def last_event_step(self) -> int:
        if self.mode == "every_steps":
            return self.cfg.event_every_steps * max(self.cfg.merges, self.cfg.injections)
        if self.mode == "quarter":
            return max((s[-1] for s in self.steps.values()), default=0)
        return self.steps_per_epoch * max(self.merge_every * self.cfg.merges if self.cfg.merges else 0,
                                          self.inject_every * self.cfg.injections if self.cfg.injections else 0)

    def check(self) -> None:
        last = self.last_event_step()
        if self.mode == "quarter":  # distinct steps >= 1 need a quarter of at least max(M, D) steps
            budget = max(self.cfg.merges, self.cfg.injections)
            if self.total_steps // 4 < budget:
                raise ConfigError(f"the merge/inject schedule ({self.cfg.merges} merges, {self.cfg.injections} "
                                  f"injections in the first quarter of training) needs at least {4 * budget} "
                                  f"optimizer steps, but training has {self.total_steps}; lower the budgets, "
                                  "set adapter.event_every_steps, or train longer")
            return
        if last >= self.total_steps:
            how = (f"every {self.cfg.event_every_steps} steps" if self.mode == "every_steps" else
                   f"after epochs that are multiples of {self.merge_every or '-'} (merges) / "
                   f"{self.inject_every or '-'} (injections)")
            raise ConfigError(f"the merge/inject schedule ({self.cfg.merges} merges, {self.cfg.injections} "
                              f"injections, {how}) would fire at step {last}, but training ends at step "
                              f"{self.total_steps}; lower the budgets, set adapter.event_every_steps, or train longer")

    def due(self, step: int) -> list[str]:
        if self.mode == "every_steps":
            return ["merge", "inject"] if step % self.cfg.event_every_steps == 0 else []
        if self.mode == "quarter":
            return [kind for kind in ("merge", "inject") if step in self.steps.get(kind, ())]
        if step % self.steps_per_epoch:
            return []
        epoch = step // self.steps_per_epoch
        return ([k for k, every in (("merge", self.merge_every), ("inject", self.inject_every))
                 if every and epoch % every == 0])


class TopologyCallback(Callback):
    """Scores, merges and injections on every rank; the layout is part of every checkpoint."""

    name = "topology"

    def __init__(self, cfg: AdapterConfig, epochs: int, seed: int, log_every: int):
        self.cfg, self.epochs, self.seed, self.log_every = cfg, epochs, seed, log_every
        self.merges_done = self.injections_done = 0
        self.events: list[dict] = []
        self.frozen: list[str] = []  # module names held fixed (reference quirks)
        self.pending_refreeze: list[dict] = []
        self._restored_layout: dict | None = None
        self._snapshots: dict[nn.Parameter, torch.Tensor] = {}

    # -- checkpoint state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"merges_done": self.merges_done, "injections_done": self.injections_done,
                "events": self.events, "frozen": self.frozen, "pending_refreeze": self.pending_refreeze,
                "layout": self._layout}

    def load_state_dict(self, state: dict) -> None:
        self.merges_done = state.get("merges_done", 0)
        self.injections_done = state.get("injections_done", 0)
        self.events = state.get("events", [])
        self.frozen = state.get("frozen", [])
        self.pending_refreeze = state.get("pending_refreeze", [])
        self._restored_layout = state.get("layout")

    def configure_model(self, model: nn.Module) -> nn.Module:
        self._model = model
        for block, loras in self._injectable_by_block(model).items():  # before a restored layout switches some on
            ds.separate_optimizer_group([p for lora in loras for p in lora.parameters()], f"inject_block_{block}")
        self._layout = get_layout(model)
        if self._restored_layout:
            set_layout(model, self._restored_layout)
            self._layout = self._restored_layout
        return model

    # -- training hooks ---------------------------------------------------------------------------
    def on_train_start(self, run) -> None:
        self.schedule = EventSchedule(self.cfg, self.epochs, run.steps_per_epoch, run.total_steps)
        self.schedule.check()
        self._snapshots = {p: ds.full_fp32(p) for p in self._frozen_params(run.engine.module)}

    def on_step_end(self, run) -> None:
        if self._snapshots:  # reference quirks: frozen adapters return to their values after a step
            ds.overwrite_trainable(run.engine, self._snapshots)
        due = self.schedule.due(run.step)
        if due or run.step % self.log_every == 0:
            scores = self.scores(run.engine.module)
            if run.rank == 0:
                run.metrics.write(run.step, "lor2c_score", {f"adapter_{k}": v for k, v in scores.items()})
        for kind in due:
            if kind == "merge" and self.merges_done < self.cfg.merges:
                self._merge(run, scores)
            elif kind == "inject" and self.injections_done < self.cfg.injections:
                self._inject(run, scores)
            scores = self.scores(run.engine.module)
        if self.pending_refreeze:
            self._refreeze_injected(run)

    def on_train_end(self, run) -> None:
        if run.rank == 0:
            layout = {**self._layout, "merges_done": self.merges_done, "injections_done": self.injections_done,
                      "events": self.events}
            (run.output_dir / "topology.json").write_text(json.dumps(layout, indent=2) + "\n")

    # -- events -----------------------------------------------------------------------------------
    def scores(self, model: nn.Module) -> dict[str, float]:
        """Every active adapter's score from the fp32 master weights (same calls on every rank)."""
        out = {}
        for key, adapter in model.lor2c.adapters.items():
            if adapter.active:
                out[key] = spectral_score(ds.full_fp32(adapter.down.weight), ds.full_fp32(adapter.lora_B.weight),
                                          self.cfg.sfs_k)
        return out

    def _merge(self, run, scores: dict[str, float]) -> None:
        stack = run.engine.module.lor2c
        choice = ds.broadcast_object(choose_merge(stack.topology(), scores, self.cfg.max_merge_length)
                                     if run.rank == 0 else None)
        if choice is None:
            return self._record(run, {"event": "merge", "skipped": "no adjacent pair fits max_merge_length"})
        lower, upper = (stack.adapters[k] for k in choice)
        before = [[lower.start, lower.end], [upper.start, upper.end]]
        lower.end, upper.active = upper.end, False
        stack.route()
        ds.overwrite_trainable(run.engine, {p: torch.zeros(ds.full_shape(p)) for p in self._own_params(upper)})
        self.merges_done += 1
        if self.cfg.freeze_merged:
            self._freeze(run, [f"lor2c.adapters.{choice[0]}"], [lower])
        self._record(run, {"event": "merge", "adapters": list(choice), "spans": before,
                           "merged_span": [lower.start, lower.end],
                           "scores": [scores[choice[0]], scores[choice[1]]]})

    def _inject(self, run, scores: dict[str, float]) -> None:
        model = run.engine.module
        stack = model.lor2c
        key = ds.broadcast_object(choose_injection(stack.topology(), scores) if run.rank == 0 else None)
        if key is None:
            return self._record(run, {"event": "inject", "skipped": "no single-block adapter left"})
        adapter = stack.adapters[key]
        adapter.active = False
        stack.route()
        loras = self._injectable(model, adapter.start)
        generator = torch.Generator().manual_seed(self.seed * 100_003 + run.step)  # same on every rank
        updates = {p: torch.zeros(ds.full_shape(p))
                   for p in self._own_params(adapter)}
        for name, lora in loras:
            a = torch.empty(ds.full_shape(lora.lora_A.weight))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            updates[lora.lora_A.weight] = a
            updates[lora.lora_B.weight] = torch.zeros(ds.full_shape(lora.lora_B.weight))
            lora.active = True
        ds.overwrite_trainable(run.engine, updates)
        ds.reset_optimizer_state(run.engine, [p for _, lora in loras for p in lora.parameters()])
        self.injections_done += 1
        if self.cfg.refreeze_injected:
            self.pending_refreeze.append({"step": run.step, "modules": [name for name, _ in loras]})
        self._record(run, {"event": "inject", "adapter": key, "block": adapter.start, "score": scores[key],
                           "lora": [name for name, _ in loras]})

    def _refreeze_injected(self, run) -> None:
        """Reference quirk: injected LoRA is frozen again at the first epoch boundary after injection."""
        if run.step % run.steps_per_epoch:
            return
        modules = dict(run.engine.module.named_modules())
        for item in [i for i in self.pending_refreeze if i["step"] < run.step]:
            self._freeze(run, item["modules"], [modules[n] for n in item["modules"]])
            self.pending_refreeze.remove(item)

    # -- helpers ----------------------------------------------------------------------------------
    def _record(self, run, event: dict) -> None:
        event = {"step": run.step, **event}
        self.events.append(event)
        self._layout = get_layout(run.engine.module)
        if run.rank == 0:
            run.metrics.event(run.step, "topology", event)
            log.info("topology event at step %d: %s", run.step, event)
            log.info("%s", trainable_summary(run.engine.module))

    def _freeze(self, run, names: list[str], modules: list[nn.Module]) -> None:
        self.frozen.extend(names)
        for module in modules:
            for p in self._own_params(module):
                self._snapshots[p] = ds.full_fp32(p)

    def _frozen_params(self, model: nn.Module) -> list[nn.Parameter]:
        modules = dict(model.named_modules())
        return [p for name in self.frozen for p in self._own_params(modules[name])]

    @staticmethod
    def _own_params(module: nn.Module) -> list[nn.Parameter]:
        """The module's registered tensors: a shared A is not its own, so it stays in use."""
        return list(module.parameters())

    @staticmethod
    def _injectable_by_block(model: nn.Module) -> dict[int, list[LoRA]]:
        """Each block's injectable LoRA (allocated switched off), by block index."""
        from .registry import find_blocks, spec_for

        if not hasattr(model, "lor2c"):
            return {}
        found = {i: [m for m in block.modules() if isinstance(m, LoRA) and not m.active]
                 for i, block in enumerate(find_blocks(model, spec_for(model)))}
        return {i: loras for i, loras in found.items() if loras}

    @staticmethod
    def _injectable(model: nn.Module, block: int) -> list[tuple[str, LoRA]]:
        from .registry import find_blocks, spec_for

        prefix = next(name for name, m in model.named_modules() if m is find_blocks(model, spec_for(model))[block])
        return [(name, m) for name, m in model.named_modules()
                if isinstance(m, LoRA) and name.startswith(prefix + ".")]


def topology_callbacks(cfg) -> list[Callback]:
    adapter = cfg.adapter
    if adapter.method in ("lor2c", "share_lor2c") and (adapter.merges or adapter.injections):
        return [TopologyCallback(adapter, cfg.epochs, cfg.seed, cfg.log_every)]
    return []
