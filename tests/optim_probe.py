"""Run under torchrun by tests/test_topology_distributed.py: a recipe whose topology events (merge and/or
injection) fall at step K = adapter.event_every_steps, instrumented around the first event. Each rank
writes OUT.rank<R>.json with:

- `adam`: for each step after K, the injected LoRA's values after DeepSpeed's step against a fresh
  `torch.optim.AdamW` stepped on a copy with the gradients DeepSpeed stepped with (read at the
  accumulation boundary) and the same lr; `ratio` is |update| / |fresh update| per tensor.
- `copies`: right after the event, the largest difference between each overwritten tensor's intended
  value and every copy DeepSpeed keeps of it: the fp32 master, this rank's partition (ZeRO-3 `ds_tensor`,
  ZeRO-2 the fp32 fragment) and the module's tensor, in the parameter's own dtype.
- `forwards`: during step K + 1, per micro-step, the largest difference between the value each trainable
  tensor has when its module runs and its value after the event; `trace_complete` per micro-step.
- `group_steps`: the Adam step count of the optimizer group of each injectable LoRA tensor (and of one
  other trainable tensor, key `other`) at train start (after any resume) and after every step.
- `refused`: whether `reset_optimizer_state` refuses that other tensor alone, and one injectable LoRA
  tensor without the rest of its block's group.
Optionally stopped after step N (as a preemption would stop it); 0 runs to the end."""
from __future__ import annotations

import json
import sys
import warnings

import torch

from lor2c_ds import engine as ds
from lor2c_ds.adapters import LoRA
from lor2c_ds.callbacks import Callback
from lor2c_ds.config import load_config
from lor2c_ds.train import default_callbacks, run

warnings.filterwarnings("ignore", category=FutureWarning)


def flat_groups(engine) -> list[tuple[list, torch.Tensor]]:
    """(module parameters, flat fp32 partition that keys the Adam state) per optimizer group."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat))
    return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups))


def group_step(engine, param) -> float | None:
    for params, flat in flat_groups(engine):
        if any(p is param for p in params):
            step = engine.optimizer.optimizer.state.get(flat, {}).get("step")
            return None if step is None else float(step)
    raise KeyError("parameter not in any optimizer group")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def partition_diff(p, value: torch.Tensor, rank: int) -> float:
    """This rank's partition of `p` against the same slice of `value` (cast to the partition's dtype)."""
    flat = value.flatten()
    if hasattr(p, "ds_tensor"):  # ZeRO-3
        part, n = p.ds_tensor, p.ds_tensor.numel()
        start = rank * n
    else:  # ZeRO-1/2: this rank's fragment of the fp32 flat partition
        mapping = p._hp_mapping
        if mapping is None:
            return 0.0
        part = mapping.get_hp_fragment()
        start, n = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
    valid = max(0, min(n, flat.numel() - start))
    return max_diff(part.flatten()[:valid], flat[start:start + valid].to(part.dtype))


class Probe(Callback):
    name = "optim_probe"

    def __init__(self, stop_after: int, topology):
        self.stop_after, self.topology = stop_after, topology
        self.updates: dict = {}  # what overwrite_trainable was asked to write, this step
        self.report = {"adam": [], "copies": {}, "forwards": [], "trace_complete": [], "group_steps": []}
        self.reference = None
        self.watch = None  # {param: expected value} during the step after the event
        self.event_step = None

    # -- setup ------------------------------------------------------------------------------------
    def on_train_start(self, state) -> None:
        self.engine = engine = state.engine
        self.names = {p: n for n, p in engine.module.named_parameters()}
        self.injectable = {f"{n}.{part}.weight": getattr(m, part).weight for n, m in engine.module.named_modules()
                           if isinstance(m, LoRA) for part in ("lora_A", "lora_B")}
        self.other = next(p for p in engine.module.parameters() if p.requires_grad
                          and all(p is not q for q in self.injectable.values()))
        original = ds.overwrite_trainable

        def recording(*args):  # (engine, updates)
            self.updates.update({p: v.detach().float().clone() for p, v in args[-1].items()})
            return original(*args)

        ds.overwrite_trainable = recording  # topology.py calls it as ds.overwrite_trainable
        step = engine.step

        def stepping(*args, **kwargs):
            if self.reference is None or not engine.is_gradient_accumulation_boundary():
                return step(*args, **kwargs)
            from deepspeed.utils import safe_get_full_grad

            grads = [safe_get_full_grad(p).detach().float().clone().reshape(ds.full_shape(p)) for p in self.tracked]
            lr = engine.get_lr()[0]
            before = [ds.full_fp32(p) for p in self.tracked]
            result = step(*args, **kwargs)
            optimizer, copies = self.reference
            for c, g in zip(copies, grads):
                c.grad = g
            ref_before = [c.detach().clone() for c in copies]
            optimizer.param_groups[0]["lr"] = lr
            optimizer.step()
            row = {"lr": lr, "rel": {}, "ratio": {}}
            for name, p, c, b, rb in zip(self.tracked_names, self.tracked, copies, before, ref_before):
                after = ds.full_fp32(p)
                row["rel"][name] = max_diff(after, c.detach()) / max(float(c.detach().abs().max()), 1e-30)
                fresh = float((c.detach() - rb).norm())
                row["ratio"][name] = float((after - b).norm()) / fresh if fresh else None
            self.report["adam"].append(row)
            return result

        engine.step = stepping
        for module in engine.module.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if own:
                module.register_forward_pre_hook(self._forward_hook(own))
        engine.module.register_forward_pre_hook(self._micro_start)
        self._log_steps(state, "start")
        self.report["refused"] = [self._refuses([self.other]), self._refuses(list(self.injectable.values())[:1])]

    def _refuses(self, params) -> bool:
        """Whether resetting the optimizer state of `params` alone is refused (they share a flat group)."""
        try:
            ds.reset_optimizer_state(self.engine, params)
        except ValueError:
            return True
        return False

    def _micro_start(self, module, args):
        if self.watch is not None:
            coordinator = self.engine.optimizer.parameter_offload.get_param_coordinator() \
                if self.engine.zero_optimization_stage() == 3 else None
            self.report["trace_complete"].append(coordinator.is_complete_trace() if coordinator else True)
            self.report["forwards"].append({})

    def _forward_hook(self, params):
        def hook(module, args):
            if self.watch is None:
                return
            row = self.report["forwards"][-1]
            for p in params:
                diff = max_diff(p.data.reshape(-1), self.watch[p].flatten().to(p.dtype))
                row[self.names[p]] = max(diff, row.get(self.names[p], 0.0))
        return hook

    def _log_steps(self, state, when) -> None:
        row = {"step": state.step, "when": when, "other": group_step(self.engine, self.other)}
        row.update({n: group_step(self.engine, p) for n, p in self.injectable.items()})
        self.report["group_steps"].append(row)

    # -- per step ---------------------------------------------------------------------------------
    def on_step_end(self, state) -> None:
        self._log_steps(state, "end")
        if self.watch is not None:  # the step after the event is done
            self.watch = None
        events = [e for e in self.topology.events if e["step"] == state.step and "skipped" not in e]
        if events and self.event_step is None:
            self.event_step = state.step
            self._check_copies(state)
            self.watch = {p: self.updates[p] if p in self.updates else ds.full_fp32(p)  # a collective: every rank
                          for p in self.engine.module.parameters() if p.requires_grad}
            injected = [n for e in events if e["event"] == "inject" for n in e["lora"]]
            if injected:
                self.tracked_names = [f"{n}.{part}.weight" for n in injected for part in ("lora_A", "lora_B")]
                self.tracked = [self.injectable[n] for n in self.tracked_names]
                copies = [ds.full_fp32(p).clone().requires_grad_(True) for p in self.tracked]
                cfg = state.cfg
                self.reference = (torch.optim.AdamW(copies, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                                    weight_decay=cfg.weight_decay), copies)
        self.updates.clear()
        if state.step == self.stop_after:
            state.stop = True

    def _check_copies(self, state) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        for p, value in self.updates.items():
            master = safe_get_full_fp32_param(p)
            self.report["copies"][self.names[p]] = {
                "dtype": str(p.dtype),
                "master": max_diff(master.reshape(-1), value.flatten()),
                "partition": partition_diff(p, value, state.rank),
                "module": max_diff(p.data.reshape(-1), value.flatten().to(p.dtype)),
            }

    def on_train_end(self, state) -> None:
        self.report["event_step"] = self.event_step


def main(config: str, stop_after: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    rank, world = ds.init_distributed()
    callbacks = default_callbacks(cfg)
    topology = next(c for c in callbacks if c.name == "topology")
    probe = Probe(int(stop_after), topology)
    run(cfg, rank, world, callbacks + [probe])
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(probe.report, f, indent=1)
    ds.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
