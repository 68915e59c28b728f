"""ResLoRA on the training side: the merge statistics, their window, the merge report and the callback.

The adapters (lor2c_ds/adapters/reslora.py) state the math and record, per model forward, fp64 sums of
sum_t ||x_{n,t}||^2, sum_t ||a_{n,t}||^2 and the token count T. Here, once per optimizer step, those
sums are reduced over ranks (one all-reduce of one flat tensor), a row of per-step sums is pushed into a
window of the last 100 steps, and each module gets f = sqrt(sum of the window's sums of squares / sum of
its T): plain sums, so f does not depend on how a global batch is split into micro-batches, ranks or
steps, nor on padding. The window (sums, not f) is saved in checkpoints as JSON, so a resumed run
continues it exactly.

||W_n + s B_n A_n||_F (the `is` variant's `weights` rule, and only when that rule is configured) is
never formed: ||W||^2 + 2 s <W, B A> + s^2 ||B A||^2, where the first two terms are summed over each
rank's ZeRO-3 partition of W (a flat slice of the weight: the matching slice of B A is computed in low
rank for the rows that slice covers) and ||B A||^2 = sum((B^T B) * (A A^T)) (r x r). One all-reduce of
one scalar per module per step; no weight is gathered.

The merge error: `merge_report` runs held-out batches through the training-time graph and through
`merged_view` (low-rank deltas) and reports the logit difference and both metrics; the callback does it
on all ranks at the end, for every rule of the variant whose statistics were recorded.
"""
from __future__ import annotations

import json
import logging
import math
from collections import deque
from pathlib import Path

import torch
from torch import nn

from .adapters.config import RESLORA_MERGE_RULES
from .adapters.reslora import STAT_FIELDS, ResLoRA, _no_gather, merged_view, reslora_modules
from .callbacks import Callback, RunStateLike
from .data import eval_loader, model_inputs
from .evaluation import scored_labels, summed_loss  # the recipe's own loss and targets

log = logging.getLogger(__name__)

WINDOW = 100  # steps in the moving mean of the merge statistics
STATS_NAME = "reslora_stats.json"
# The window's rows, per module and step: sum_t ||x_t||^2, sum_t ||a_t||^2, T, ||W_n + s B_n A_n||.
WINDOW_FIELDS = ("input_sumsq", "middle_sumsq", "tokens", "weight")
WINDOW_FORMAT = "reslora-sums-v2"


def needs_weight_norms(mods) -> bool:
    """Only the `is` variant's `weights` rule uses ||W_n + s B_n A_n||."""
    return any(m.variant == "is" and m.merge_rule == "weights" for m in mods)


class ResLoRAStats:
    """The 100-step window of per-step sums: per step one row, len(WINDOW_FIELDS) values per module."""

    def __init__(self, window: int = WINDOW):
        self.window: deque[list[float]] = deque(maxlen=window)
        self.names: list[str] = []

    def state_dict(self) -> dict:
        return {"format": WINDOW_FORMAT, "fields": list(WINDOW_FIELDS), "names": self.names,
                "window": [list(row) for row in self.window]}

    def load_state_dict(self, state: dict) -> None:
        names, rows = list(state.get("names", [])), state.get("window", [])
        if rows and state.get("format") != WINDOW_FORMAT:
            raise ValueError(
                f"ResLoRA statistics window in the old format {state.get('format', 'unversioned')!r} (per-step "
                f"means of per-token norms, {len(STAT_FIELDS)} per module) cannot be converted exactly to "
                f"{WINDOW_FORMAT!r} (per-step sums of squared norms and token counts): resume from a "
                "checkpoint written by this version, or start the run afresh")
        if any(len(row) != len(WINDOW_FIELDS) * len(names) for row in rows):
            raise ValueError(f"ResLoRA statistics window: rows must hold {WINDOW_FIELDS} for each of "
                             f"{len(names)} modules")
        self.names = names
        self.window.clear()
        self.window.extend(list(map(float, row)) for row in rows)

    def means(self) -> list[float] | None:
        """Per module (f_x, f_a, mean weight norm) over the window, flattened."""
        if not self.window:
            return None
        col = [sum(c) for c in zip(*self.window)]
        out = []
        for i in range(0, len(col), len(WINDOW_FIELDS)):
            sx, sa, tokens, weight = col[i:i + len(WINDOW_FIELDS)]
            out += [math.sqrt(sx / tokens), math.sqrt(sa / tokens), weight / len(self.window)]
        return out

    def push_to(self, model: nn.Module) -> None:
        mods = reslora_modules(model)
        names = [n for n, _ in mods]
        if self.names and names != self.names:
            raise ValueError(f"ResLoRA statistics were recorded for other modules ({self.names[:2]}...), "
                             f"not this model's ({names[:2]}...)")
        means = self.means()
        k = len(STAT_FIELDS)
        for i, (_, m) in enumerate(mods):
            m.stats = None if means is None else tuple(means[i * k:(i + 1) * k])

    def step(self, model: nn.Module, reduce=lambda t: t, partition=None, rank: int = 0, gather=None) -> None:
        """End of an optimizer step: reduce the accumulators (one collective), reset them, push a row.

        `reduce` sums a tensor over ranks; `partition`, `rank` and `gather` locate each rank's part of
        the frozen weights for the "weights" rule (see `weight_partials`). In training the reduction
        rides on the step's own all-reduce instead: `partials`, then `finish` with the sums."""
        local = self.partials(model, partition, rank, gather)
        if local is not None:
            self.finish(model, reduce(local).reshape(-1).tolist())  # one host sync

    def partials(self, model: nn.Module, partition=None, rank: int = 0, gather=None) -> torch.Tensor | None:
        """This rank's accumulators (and weight-norm partials), one row per module, to be summed over the
        ranks; resets the accumulators. None without ResLoRA modules."""
        mods = reslora_modules(model)
        if not mods:
            return None
        self.names = [n for n, _ in mods]
        device = mods[0][1].lora_A.weight.device
        acc = torch.stack([m.acc.to(device) if m.acc is not None else torch.zeros(3, dtype=torch.float64,
                                                                                   device=device)
                           for _, m in mods])
        for _, m in mods:
            m.acc = None
        if needs_weight_norms([m for _, m in mods]):
            local, low_rank = weight_partials(model, [m for _, m in mods], partition or _no_partition, rank,
                                              gather or _no_gather)
            # s^2 ||B A||^2 is the same on every rank (the adapters are whole): rank 0 adds it to the sum
            acc = torch.cat([acc, (local + low_rank if rank == 0 else local)[:, None]], dim=1)
        return acc

    def finish(self, model: nn.Module, sums: list[float]) -> None:
        """The summed `partials` of this step: one row of WINDOW_FIELDS per module into the window."""
        n = len(self.names)
        width = len(sums) // n
        rows = [sums[i * width:(i + 1) * width] for i in range(n)]
        for r in rows:
            r.append(math.sqrt(max(r.pop(), 0.0)) if width == 4 else math.nan)  # ||W + s B A||
        if all(r[2] > 0 for r in rows):
            self.window.append([v for r in rows for v in r])
            self.push_to(model)


def _no_partition(param):
    return None


def _stored_delta_rows(m: ResLoRA, proj: nn.Module, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows first..last of s B A laid out like proj.weight (zero outside this module's chunk), in fp32,
    and the mask of the elements that belong to the chunk. Costs (last - first + 1) x row length."""
    A, B = m.lora_A.weight.float(), m.lora_B.weight.float()
    width, rows = B.shape[0], last - first + 1
    lo, hi = m.chunk * width, (m.chunk + 1) * width  # this module's output range
    if isinstance(proj, nn.Linear):  # (d_out, d_in): stored row = output
        out = torch.zeros(rows, A.shape[1], device=A.device)
        mask = torch.zeros(rows, 1, dtype=torch.bool, device=A.device)
        a, b = max(first, lo), min(last, hi - 1)
        if a <= b:
            out[a - first:b - first + 1] = m.scaling * (B[a - lo:b - lo + 1] @ A)
            mask[a - first:b - first + 1] = True
        return out, mask.expand_as(out)
    # Conv1D (d_in, d_out): stored row = input, the chunk is a column range
    out = torch.zeros(rows, proj.weight.ds_shape[1] if hasattr(proj.weight, "ds_shape") else proj.weight.shape[1],
                      device=A.device)
    out[:, lo:hi] = m.scaling * (A[:, first:last + 1].T @ B.T)
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask[:, lo:hi] = True
    return out, mask


def _shape(param) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


@torch.no_grad()
def weight_norms(model: nn.Module, mods: list[ResLoRA], reduce=lambda t: t, partition=_no_partition,
                 rank: int = 0, gather=_no_gather) -> torch.Tensor:
    """||W_n + s B_n A_n||_F per module (fp64), one `reduce` (sum over ranks) in all."""
    local, low_rank = weight_partials(model, mods, partition, rank, gather)
    return (reduce(local) + low_rank).clamp(min=0).sqrt()


@torch.no_grad()
def weight_partials(model: nn.Module, mods: list[ResLoRA], partition=_no_partition, rank: int = 0,
                    gather=_no_gather) -> tuple[torch.Tensor, torch.Tensor]:
    """Per module, this rank's ||W||^2 + 2 s <W, B A> over its partition of W (to be summed over ranks)
    and s^2 ||B A||^2 (the same on every rank), fp64. `partition(param)` is (flat local elements, flat
    start) or None for a weight this rank holds whole (counted on rank 0 only, so that a sum over
    ranks adds it once); `gather` makes such a weight readable when it is not (NVMe). W is only read."""
    parents = {id(m): model.get_submodule(n.rpartition(".")[0]) for n, m in reslora_modules(model)}
    device = mods[0].lora_A.weight.device
    local = torch.zeros(len(mods), dtype=torch.float64, device=device)  # ||W||^2 + 2 s <W, B A>
    low_rank = torch.zeros(len(mods), dtype=torch.float64, device=device)  # s^2 ||B A||^2
    for i, m in enumerate(mods):
        proj = parents[id(m)]
        A, B = m.lora_A.weight.double(), m.lora_B.weight.double()
        low_rank[i] = m.scaling ** 2 * ((B.T @ B) * (A @ A.T)).sum()
        cols = _shape(proj.weight)[1]
        part = partition(proj.weight)
        if part is None:
            if rank != 0:
                continue
            with gather([proj.weight]):
                flat, start = proj.weight.reshape(-1), 0
                local[i] = _partial_sum(m, proj, flat, start, cols)
        elif part[0].numel():
            local[i] = _partial_sum(m, proj, part[0], part[1], cols)
    return local, low_rank


def _partial_sum(m: ResLoRA, proj: nn.Module, flat: torch.Tensor, start: int, cols: int) -> torch.Tensor:
    """sum over the chunk's elements of flat W[start:start+len] of w^2 + 2 w (s B A)."""
    first, last = start // cols, (start + flat.numel() - 1) // cols
    delta, mask = _stored_delta_rows(m, proj, first, last)
    offset = start - first * cols
    delta = delta.reshape(-1)[offset:offset + flat.numel()]
    mask = mask.reshape(-1)[offset:offset + flat.numel()]
    w = flat.to(device=delta.device, dtype=torch.float32) * mask
    return (w.double() * (w + 2 * delta).double()).sum()


def save_reslora_stats(model: nn.Module, directory) -> Path:
    """The window means each module merges with, as JSON beside an adapter."""
    path = Path(directory) / STATS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = {n: (None if m.stats is None else dict(zip(STAT_FIELDS, m.stats))) for n, m in reslora_modules(model)}
    path.write_text(json.dumps(stats, indent=1) + "\n")
    return path


def load_reslora_stats(model: nn.Module, directory) -> nn.Module:
    """Restore what `save_reslora_stats` wrote, so `delta_weight` merges as after training. A
    checkpoint tag holds no such file: there the window in its run_state.json is used."""
    directory = Path(directory)
    if not (directory / STATS_NAME).is_file() and (directory / "run_state.json").is_file():
        window = ResLoRAStats()
        window.load_state_dict(json.loads((directory / "run_state.json").read_text())["callbacks"]["reslora"])
        window.push_to(model)
        return model
    stats = json.loads((directory / STATS_NAME).read_text())
    for name, m in reslora_modules(model):
        if name not in stats:
            raise ValueError(f"{Path(directory) / STATS_NAME} has no statistics for {name}")
        row = stats[name]
        m.stats = None if row is None else tuple(float(row[f]) if row[f] is not None else math.nan
                                                 for f in STAT_FIELDS)
    return model


# ---------------------------------------------------------------------- approximation error


@torch.no_grad()
def merge_report(model: nn.Module, batches, task: str, reduce=lambda t: t, rank: int = 0, world: int = 1,
                 gather=_no_gather) -> dict:
    """The training-time graph against the merged model on held-out `batches`: logits difference
    (max abs, relative Frobenius) over scored positions, and both models' metric. `reduce` sums over
    ranks (each rank passes its own shard). The frozen weights are only read."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters() if p.requires_grad).device
    totals = torch.zeros(7, dtype=torch.float64, device=device)  # sq diff, sq ref, loss x2, count, correct x2
    max_abs = torch.zeros(world, dtype=torch.float64, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = model_inputs(batch)
        ref = model(**inputs).logits.float()
        with merged_view(model, gather):
            merged = model(**inputs).logits.float()
        labels = scored_labels(batch, task)
        if task in ("classification", "regression"):
            keep = batch["valid"].bool()
        else:
            keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool() & batch["valid"].bool()[:, None]
        diff = (merged - ref)[keep]
        max_abs[rank] = torch.maximum(max_abs[rank], diff.abs().max() if diff.numel() else max_abs[rank])
        stats = [diff.double().pow(2).sum(), ref[keep].double().pow(2).sum(),
                 summed_loss(ref, labels, task).double(), summed_loss(merged, labels, task).double(),
                 (labels != -100).sum().double()]
        if task == "classification":
            stats += [(ref.argmax(-1) == labels).sum().double(), (merged.argmax(-1) == labels).sum().double()]
        else:
            stats += [torch.zeros((), dtype=torch.float64, device=device)] * 2
        totals += torch.stack(stats)
    totals, max_abs = reduce(totals), reduce(max_abs)
    if was_training:
        model.train()
    t = totals.tolist()
    n = max(t[4], 1.0)
    report = {"max_abs_logit_diff": float(max_abs.max()), "rel_logit_diff": math.sqrt(t[0] / max(t[1], 1e-300)),
              "loss_train_graph": t[2] / n, "loss_merged": t[3] / n}
    if task == "classification":
        report.update(accuracy_train_graph=t[5] / n, accuracy_merged=t[6] / n)
    elif task != "regression":
        report.update(perplexity_train_graph=math.exp(min(t[2] / n, 50.0)),
                      perplexity_merged=math.exp(min(t[3] / n, 50.0)))
    return report


# ---------------------------------------------------------------------- training callback


class ResLoRACallback(Callback):
    """Merge statistics during training, and the merge's approximation error at the end."""

    name = "reslora"

    def __init__(self, window: int = WINDOW):
        self.stats = ResLoRAStats(window)

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)

    def configure_model(self, model):
        self.stats.push_to(model)  # restored window (resume) or none
        return model

    def step_partials(self, run: RunStateLike) -> torch.Tensor | None:
        from . import engine as ds

        return self.stats.partials(run.engine.module, partition=ds.local_partition, rank=run.rank, gather=ds.gathered)

    def on_step_sums(self, run: RunStateLike, sums: list[float]) -> None:
        self.stats.finish(run.engine.module, sums)

    def on_train_end(self, run: RunStateLike) -> None:
        from . import engine as ds

        cfg, model, data = run.cfg, run.engine.module, run.data  # the run's own prepared data, not a new pass
        batches = eval_loader(data.eval, data.collator, cfg.micro_batch_size, run.rank, run.world)
        configured = cfg.adapter.resolved_merge_rule
        mods = [m for _, m in reslora_modules(model)]
        # every rule of the variant, the configured one last (it is what the modules keep)
        rules = [r for r in RESLORA_MERGE_RULES[cfg.adapter.reslora_variant] if r != configured] + [configured]
        for rule in rules:
            if rule == "weights" and not needs_weight_norms(mods) and configured != "weights":
                log.info("ResLoRA merge 'weights' not evaluated: ||W + s B A|| is recorded only when it is "
                         "the configured merge_rule")
                continue
            for m in mods:
                m.merge_rule = rule
            try:
                report = merge_report(model, batches, cfg.task, ds.all_reduce_sum, run.rank, run.world, ds.gathered)
            except RuntimeError as e:  # e.g. no statistics: a run with no complete step
                log.warning("ResLoRA merge %r not evaluated: %s", rule, e)
                continue
            report.update(merge_rule=rule, configured=rule == configured)
            run.metrics.write(run.step, "reslora_merge", report)
            if run.rank == 0:
                log.info("ResLoRA merge (%s): relative logit difference %.3g, max %.3g", rule,
                         report["rel_logit_diff"], report["max_abs_logit_diff"])
        if run.rank == 0:  # beside the adapter and the final checkpoint's adapter, both written next
            save_reslora_stats(model, run.output_dir / "adapter")
            save_reslora_stats(model, run.output_dir / "checkpoints" / f"step_{run.step}")
