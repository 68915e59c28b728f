"""ResLoRA: LoRA blocks with residual paths between layers, merged away for inference (METHOD.md 9).

Block n is one target projection (q, v, ...) in layer n, block n-k the same projection k layers below;
x_n is block n's input, s = alpha / r, D the adapter dropout, m = pre_num. Training-time output:

    is:  y_n = W x_n + b + s B_n A_n D(x_n + x_{n-1})                 (x_{-1} := x_0)
    bs:  y_n = W x_n + b + s (sum_{k=0..m} B_{n-k} A_{n-k}) D(x_n)
    ms:  y_n = W x_n + b + s B_n (a_n + sum_{k=1..m} a_{n-k}),     a_j = A_j D(x_j)

Sums stop at layer 0. `is` applies one dropout to the sum x_n + x_{n-1} (as written in METHOD.md);
`ms` reuses the middle vectors a_{n-k} that the earlier blocks computed in the same forward, so each
a_j carries the dropout mask of its own block. Nothing is detached: gradients reach x_{n-1}, A_{n-k}
and B_{n-k} through the shortcuts. No parameters beyond LoRA's.

Merged weights (Linear layout, d_out x d_in), with f the statistics recorded over the last 100 steps:

    bs (exact):    W'_n = W_n + s sum_{k=0..m} B_{n-k} A_{n-k}
    is, inputs:    W'_n = W_n + (1 + f_{n-1}/f_n) s B_n A_n,             f = f_x(n)   (f_{-1} := f_0)
    is, weights:   W'_n = W_n + (1 + f_{n-2}/f_{n-1}) s B_n A_n,         f = mean ||W_n + s B_n A_n||_F
                   (the ratio is taken as 1 for the first two blocks)
    ms, inputs:    W'_n = W_n + s B_n (A_n + sum_{k=1..m} (f_{n-k}/f_n) A_{n-k}),   f = f_x(n)
    ms, middle:    W'_n = W_n + (1 + sum_{k=1..m} f_{n-k}/f_n) s B_n A_n,           f = f_a(n)

f_x and f_a are RMS token norms over every token t of the window (padding excluded):

    f_x(n) = sqrt(sum_t ||x_{n,t}||^2 / T),    f_a(n) = sqrt(sum_t ||a_{n,t}||^2 / T)

Only ratios enter the merges, and for one batch f_x(j) / f_x(n) = ||X_j||_F / ||X_n||_F, METHOD.md's
ratio of Frobenius norms; f_a is the same RMS form of its "mean norm of A_n D(x_n)" (for `is`, a_n is
A_n D(x_n + x_{n-1}); no rule uses it). The weight statistic is the mean of the per-step norms.

Wiring: each block's module is a child of its projection (`<proj>.reslora_<target>`, weights under
`lora_A` / `lora_B`) and adds its output through a forward hook (a bound method: deep copies rebind).
The modules of one target know each other through a `ResLoRAGroup`, a plain object that is not a
sub-module, so every weight is stored once. The group holds the current forward's x_n / a_n only:
it is cleared by a model forward pre-hook and when layer 0 runs, and after the forward.

Statistics: in training mode each module adds sum_t ||x_{n,t}||^2, sum_t ||a_{n,t}||^2 and the token
count T (padding excluded, from the model's attention mask) into an fp64 on-device accumulator, once
per model forward (no host sync). `ResLoRACallback` sums them over micro-batches and ranks once per
optimizer step (one all-reduce of one flat tensor), keeps the per-step sums of the last 100 steps and
hands the modules f = sqrt(sum of the window's sums of squares / sum of its T): plain sums, so f does
not depend on how a global batch is split into micro-batches, ranks or steps, nor on padding. The
window (sums, not f) is saved in checkpoints as JSON, so a resumed run continues it exactly.

Dtypes: the adapter weights may differ from the backbone's (bf16 base, fp32 adapters): the low-rank
path casts its input (and the shortcut tensors) to the adapter dtype and its result to the output's;
statistics are taken in fp32 and summed in fp64; `merge_reslora` computes delta in fp32 and casts once.

||W_n + s B_n A_n|| is computed once per step for `is` (either rule), out of place: W is never
written; under ZeRO-3 one projection's weight is gathered at a time.

The merge error: `merge_report` runs held-out batches through the training-time graph and through
`merged_view` (each block adds (W'_n - W_n) x_n, equal to the merged model up to rounding, bf16's in
a bf16 model, and usable on a ZeRO-3 partitioned backbone) and reports the logit difference and both metrics;
`ResLoRACallback.on_train_end` does it on all ranks for every rule of the variant.

Activation checkpointing: the recomputed block forward would read x_{n-1} / a_{n-k} held from the
original forward, outside the checkpoint's bookkeeping; rather than risk wrong gradients, is and ms
refuse to train with checkpointing enabled. bs links parameters only and works with it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import deque
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..callbacks import Callback
from ..fused import OutputSlice, equal_chunk
from ..registry import projection_dims, unknown_targets
from .config import RESLORA_MERGE_RULES, ConfigError
from .lora import init_low_rank

log = logging.getLogger(__name__)

WINDOW = 100  # steps in the moving mean of the merge statistics
STATS_NAME = "reslora_stats.json"
# What a module merges with (and reslora_stats.json holds): f_x, f_a, mean ||W_n + s B_n A_n|| (is, else NaN).
STAT_FIELDS = ("input", "middle", "weight")
# The window's rows, per module and step: sum_t ||x_t||^2, sum_t ||a_t||^2, T, ||W_n + s B_n A_n||.
WINDOW_FIELDS = ("input_sumsq", "middle_sumsq", "tokens", "weight")
WINDOW_FORMAT = "reslora-sums-v2"


def _checkpointing(blocks) -> bool:
    return any(getattr(b, "gradient_checkpointing", False) for b in blocks)


class ResLoRAGroup:
    """The ResLoRA modules of one target in layer order, and the current forward's tensors.

    A plain object, not an nn.Module: references to it never register weights twice."""

    def __init__(self, target: str, variant: str, pre_num: int, blocks):
        self.target, self.variant, self.pre_num = target, variant, pre_num
        self.members: list[ResLoRA] = []
        self.blocks = blocks
        self.saved: dict[int, torch.Tensor] = {}  # x_n (is) or a_n (ms) of this forward
        self.mask: torch.Tensor | None = None  # this forward's attention mask: padding is not counted
        self.forward_id = 0  # bumped per model forward: statistics are recorded once per forward

    def start_forward(self, model, args=None, kwargs=None):
        self.saved.clear()
        self.mask = (kwargs or {}).get("attention_mask")
        self.forward_id += 1
        if self.variant != "bs" and model.training and torch.is_grad_enabled() and _checkpointing(self.blocks):
            raise RuntimeError(
                f"ResLoRA reslora_variant={self.variant} cannot train with activation checkpointing: the "
                "recomputed blocks would read shortcut tensors from outside the checkpoint. Disable "
                "gradient checkpointing or use reslora_variant=bs")

    def end_forward(self, model, args, kwargs, output):
        self.saved.clear()
        self.mask = None


class ResLoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                 chunk: int, chunks: int, group: ResLoRAGroup, index: int, out_slice: OutputSlice | None = None):
        super().__init__()
        self.r, self.scaling = r, alpha / r
        self.chunk, self.chunks = chunk, chunks
        self.out_slice = out_slice or equal_chunk(chunk, chunks, chunks * out_features)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        init_low_rank(self.lora_A, self.lora_B)
        self.group, self.index = group, index  # plain attributes, not sub-modules
        self.merge_rule = "exact"
        self.stats: tuple[float, float, float] | None = None  # (f_x, f_a, weight), set by the callback
        self.acc: torch.Tensor | None = None  # fp64 (sum ||x_t||^2, sum ||a_t||^2, T) since the last step
        self._recorded = -1
        self._merged_delta: torch.Tensor | None = None  # set inside `merged_view`

    @property
    def variant(self) -> str:
        return self.group.variant

    @property
    def exact_merge(self) -> bool:
        return self.variant == "bs"

    def earlier(self) -> list["ResLoRA"]:
        """Blocks n-1, ..., n-m that exist (is: n-1 only)."""
        m = 1 if self.variant == "is" else self.group.pre_num
        return [self.group.members[self.index - k] for k in range(1, m + 1) if self.index - k >= 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The low-rank delta in the adapter weights' dtype (`add_to_output` casts it to the output's)."""
        if self._merged_delta is not None:
            return F.linear(x.to(self._merged_delta.dtype), self._merged_delta)
        group, n = self.group, self.index
        if n == 0:
            group.saved.clear()  # layer 0 starts a forward, whatever entry point was called
        h = x.to(self.lora_A.weight.dtype)  # differentiable: gradients reach x (and x_{n-1} for is)
        if self.variant == "bs":
            blocks = [self, *self.earlier()]
            a_all = F.linear(self.dropout(h), torch.cat([b.lora_A.weight.to(h.dtype) for b in blocks]))
            out = F.linear(a_all, torch.cat([b.lora_B.weight.to(h.dtype) for b in blocks], dim=1))
            a = a_all[..., : self.r]
        elif self.variant == "is":
            prev = h if n == 0 else self._saved(n - 1, h).to(h.dtype)
            group.saved.pop(n - 1, None)
            group.saved[n] = h
            a = self.lora_A(self.dropout(h + prev))
            out = self.lora_B(a)
        else:  # ms
            a = self.lora_A(self.dropout(h))
            mid = a
            for k in range(1, group.pre_num + 1):
                if n - k >= 0:
                    mid = mid + self._saved(n - k, a).to(a.dtype)
            group.saved.pop(n - group.pre_num, None)
            group.saved[n] = a
            out = self.lora_B(mid)
        if self.training and torch.is_grad_enabled() and self._recorded != group.forward_id:
            self._recorded = group.forward_id
            sq = [torch.linalg.vector_norm(t.detach(), dim=-1, dtype=torch.promote_types(t.dtype, torch.float32))
                  .double().square() for t in (x, a)]  # per-token ||.||^2, in fp32 at least, summed in fp64
            mask = group.mask
            w = mask.to(sq[0]) if mask is not None and mask.shape == sq[0].shape else torch.ones_like(sq[0])
            sums = torch.stack([(sq[0] * w).sum(), (sq[1] * w).sum(), w.sum()])
            self.acc = sums if self.acc is None else self.acc + sums
        return out * self.scaling

    def _saved(self, j: int, like: torch.Tensor) -> torch.Tensor:
        t = self.group.saved.get(j)
        if t is None:
            raise RuntimeError(f"ResLoRA block {self.index} of target {self.group.target!r}: block {j} did not "
                               "run earlier in this forward (layers must run in order, from layer 0)")
        if t.shape != like.shape:
            raise RuntimeError(f"ResLoRA block {self.index} of target {self.group.target!r}: shortcut from block "
                               f"{j} has shape {tuple(t.shape)}, this block's has {tuple(like.shape)}")
        return t

    def add_to_output(self, proj: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the frozen projection."""
        delta = self(args[0]).to(output.dtype)
        if self.out_slice is not None:
            delta = self.out_slice.pad(delta)
        return output + delta

    # ------------------------------------------------------------------ merging

    def _ratio(self, j: int, n: int, field: int) -> float:
        """f_j / f_n from the recorded statistics."""
        if self.group.members[n].stats is None or self.group.members[j].stats is None:
            raise RuntimeError(
                f"ResLoRA merge rule {self.merge_rule!r} needs recorded statistics, and block {n} of target "
                f"{self.group.target!r} has none: train with ResLoRACallback, or load_reslora_stats()")
        num, den = self.group.members[j].stats[field], self.group.members[n].stats[field]
        if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
            raise RuntimeError(f"ResLoRA merge rule {self.merge_rule!r}: statistic {STAT_FIELDS[field]} of "
                               f"blocks {j}/{n} of target {self.group.target!r} is unusable ({num}, {den})")
        return num / den

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W'_n - W_n under this module's merge rule, shaped (d_out, d_in) like nn.Linear.weight,
        computed in `dtype` (default: the adapter weights' dtype; the caller casts)."""
        n, s, rule = self.index, self.scaling, self.merge_rule
        dtype = dtype or self.lora_A.weight.dtype
        A, B = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        if self.variant == "bs":
            return s * sum(b.lora_B.weight.to(dtype) @ b.lora_A.weight.to(dtype) for b in [self, *self.earlier()])
        if self.variant == "is":
            if rule == "inputs":
                factor = 1.0 + (1.0 if n == 0 else self._ratio(n - 1, n, 0))
            else:  # weights
                factor = 1.0 + (1.0 if n < 2 else self._ratio(n - 2, n - 1, 2))
            return factor * s * (B @ A)
        if rule == "inputs":
            mixed = A + sum(self._ratio(b.index, n, 0) * b.lora_A.weight.to(dtype) for b in self.earlier())
            return s * (B @ mixed)
        factor = 1.0 + sum(self._ratio(b.index, n, 1) for b in self.earlier())  # middle
        return factor * s * (B @ A)


def attach_reslora(model: nn.Module, blocks, spec, config) -> list[ResLoRAGroup]:
    """Attach one ResLoRA module per block and target; called by `apply_adapters`."""
    targets = config.targets or list(spec.default_targets)
    error = unknown_targets(model.config.model_type, spec, targets, "ResLoRA")
    if error:
        raise ConfigError(error)
    if config.reslora_variant != "bs" and _checkpointing(blocks):
        raise ConfigError(f"adapter.reslora_variant={config.reslora_variant} cannot be combined with activation "
                          "checkpointing (enabled on this model); disable it or use reslora_variant=bs")
    groups = []
    for target in targets:
        proj = spec.projections[target]
        modules = [block.get_submodule(proj.path) for block in blocks]
        dims = [projection_dims(m) for m in modules]
        if any(d != dims[0] for d in dims):
            raise ConfigError(f"adapter.targets: ResLoRA target {target!r} does not line up across layers "
                              f"(in, out) per layer: {dims}; shortcuts need one shape in every layer")
        group = ResLoRAGroup(target, config.reslora_variant, config.pre_num, blocks)
        model.register_forward_pre_hook(group.start_forward, with_kwargs=True)
        model.register_forward_hook(group.end_forward, with_kwargs=True)
        for i, module in enumerate(modules):
            d_in, d_out = dims[0]
            part = proj.output_slice(d_out)
            res = ResLoRA(d_in, part.size if part else d_out, config.r, config.alpha, config.dropout,
                          proj.chunk, proj.chunks, group, i, part)
            res.merge_rule = config.resolved_merge_rule
            group.members.append(res)
            module.add_module(f"reslora_{target}", res)
            module.register_forward_hook(res.add_to_output)
        groups.append(group)
    return groups


def reslora_modules(model: nn.Module) -> list[tuple[str, ResLoRA]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ResLoRA)]


def _no_gather(params):
    return contextlib.nullcontext()


@contextlib.contextmanager
def merged_view(model: nn.Module, gather=_no_gather):
    """Inside, every ResLoRA block adds (W'_n - W_n) x_n instead of its training-time output: the
    merged model's function, without touching W (works on a ZeRO-3 partitioned backbone).
    `gather(params)` makes the adapter weights whole outside a forward (ZeRO-3)."""
    mods = [m for _, m in reslora_modules(model)]
    with torch.no_grad(), gather([p for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]):
        deltas = [m.delta_weight().detach().clone() for m in mods]
    for m, d in zip(mods, deltas):
        m._merged_delta = d
    try:
        yield model
    finally:
        for m in mods:
            m._merged_delta = None


@torch.no_grad()
def merge_reslora(model: nn.Module) -> nn.Module:
    """Fold every ResLoRA block into its projection, in place (pass a copy to keep the original):
    W' = W + delta, then the modules and their hooks are removed. Returns the plain model."""
    mods = reslora_modules(model)
    parents = [model.get_submodule(name.rpartition(".")[0]) for name, _ in mods]
    # all before any module is removed; in fp32 at least, added to W there and rounded once
    deltas = [m.delta_weight(torch.promote_types(torch.promote_types(p.weight.dtype, m.lora_A.weight.dtype),
                                                 torch.float32)).detach().clone() for p, (_, m) in zip(parents, mods)]
    for (name, m), proj, delta in zip(mods, parents, deltas):
        child = name.rpartition(".")[2]
        W = proj.weight if isinstance(proj, nn.Linear) else proj.weight.T  # Conv1D keeps (d_in, d_out)
        merged = W.to(delta.dtype) + (delta if m.out_slice is None else m.out_slice.pad(delta.T).T)
        W.copy_(merged.to(W.dtype))  # one rounding, in place (W may be the transposed view)
        for key, fn in list(proj._forward_hooks.items()):
            if getattr(fn, "__self__", None) is m:
                del proj._forward_hooks[key]
        delattr(proj, child)
    groups = {id(m.group) for _, m in mods}
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, fn in list(hooks.items()):
            if id(getattr(fn, "__self__", None)) in groups:
                del hooks[key]
                model._forward_hooks_with_kwargs.pop(key, None)
                model._forward_pre_hooks_with_kwargs.pop(key, None)
    if hasattr(model, "adapter_config"):
        del model.adapter_config
    return model


# ---------------------------------------------------------------------- statistics


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

    def step(self, model: nn.Module, reduce=lambda t: t, gather=None) -> None:
        """End of an optimizer step: reduce the accumulators (one collective), reset them, push a row.

        `reduce` sums a tensor over ranks in place; `gather(params)` is a context manager that makes
        partitioned frozen weights whole (needed by the "weights" rule only)."""
        mods = reslora_modules(model)
        if not mods:
            return
        self.names = [n for n, _ in mods]
        device = mods[0][1].lora_A.weight.device
        acc = torch.stack([m.acc.to(device) if m.acc is not None else torch.zeros(3, dtype=torch.float64,
                                                                                   device=device)
                           for _, m in mods])
        for _, m in mods:
            m.acc = None
        acc = reduce(acc)
        weight = torch.full((len(mods),), float("nan"), dtype=torch.float64, device=device)
        if any(m.variant == "is" for _, m in mods):  # so both is rules can be evaluated
            weight = weight_norms(model, [m for _, m in mods], gather).to(device)
        row = torch.cat([acc, weight[:, None]], dim=1)  # WINDOW_FIELDS per module
        if bool((acc[:, 2] > 0).all()):  # one host sync per step
            self.window.append(row.flatten().tolist())
            self.push_to(model)


@torch.no_grad()
def weight_norms(model: nn.Module, mods: list[ResLoRA], gather=None) -> torch.Tensor:
    """||W_n + s B_n A_n||_F per module, computed out of place (W is never written). Under ZeRO-3,
    `gather` makes one projection's weight whole at a time."""
    gather = gather or _no_gather
    parents = {id(m): model.get_submodule(n.rpartition(".")[0]) for n, m in reslora_modules(model)}
    out = []
    for m in mods:
        proj = parents[id(m)]
        with gather([proj.weight, m.lora_A.weight, m.lora_B.weight]):
            W = proj.weight if isinstance(proj, nn.Linear) else proj.weight.T
            W = W if m.out_slice is None else m.out_slice.rows(W)
            merged = W.float() + m.scaling * (m.lora_B.weight.float() @ m.lora_A.weight.float())
            out.append(merged.norm().double())
    return torch.stack(out)


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
    from ..data import model_inputs
    from ..evaluation import scored_labels, summed_loss  # the recipe's own loss and targets

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

    def on_step_end(self, run) -> None:
        from .. import engine as ds

        self.stats.step(run.engine.module, reduce=ds.all_reduce_sum, gather=ds.gathered)

    def on_train_end(self, run) -> None:
        from .. import engine as ds
        from ..data import eval_loader, prepare_data
        from ..train import load_tokenizer

        cfg, model = run.cfg, run.engine.module
        data = prepare_data(cfg, load_tokenizer(cfg.model))
        batches = eval_loader(data.eval, data.collator, cfg.micro_batch_size, run.rank, run.world)
        configured = cfg.adapter.resolved_merge_rule
        mods = [m for _, m in reslora_modules(model)]
        # every rule of the variant, the configured one last (it is what the modules keep)
        rules = [r for r in RESLORA_MERGE_RULES[cfg.adapter.reslora_variant] if r != configured] + [configured]
        for rule in rules:
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
