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
per model forward (no host sync). The training side (lor2c_ds/reslora_training.py) sums them over
micro-batches and ranks once per optimizer step, keeps a window of per-step sums and hands the modules
f = sqrt(sum of the window's sums of squares / sum of its T) in `stats`.

Dtypes: the adapter weights may differ from the backbone's (bf16 base, fp32 adapters): the low-rank
path casts its input (and the shortcut tensors) to the adapter dtype and its result to the output's;
statistics are taken in fp32 and summed in fp64; `merge_reslora` computes delta in fp32 and casts once.

Every merge is low rank: W'_n - W_n = L_n R_n with L_n (d_out x k), R_n (k x d_in), k = r (or (m+1) r
for bs); `delta_factors` returns them, `merged_view` applies them as x -> (x R^T) L^T (each block adds
(W'_n - W_n) x_n, the merged model's function, usable on a ZeRO-3 partitioned backbone) and
`merge_reslora` forms one dense delta at a time, to add it to its W.

Activation checkpointing: the recomputed block forward would read x_{n-1} / a_{n-k} held from the
original forward, outside the checkpoint's bookkeeping; rather than risk wrong gradients, is and ms
refuse to train with checkpointing enabled. bs links parameters only and works with it.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..fused import OutputSlice, equal_chunk
from ..registry import projection_dims, unknown_targets
from .config import RESLORA_MERGE_RULES, ConfigError
from .lora import init_low_rank

# What a module merges with, in `ResLoRA.stats`: f_x, f_a, mean ||W_n + s B_n A_n|| (NaN when not recorded).
STAT_FIELDS = ("input", "middle", "weight")


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
        self._merged_delta: tuple[torch.Tensor, torch.Tensor] | None = None  # (L, R), set inside `merged_view`

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
            left, right = self._merged_delta
            return F.linear(F.linear(x.to(right.dtype), right), left)
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
                f"{self.group.target!r} has none: train with the ResLoRA callback, or load its statistics")
        num, den = self.group.members[j].stats[field], self.group.members[n].stats[field]
        if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
            raise RuntimeError(f"ResLoRA merge rule {self.merge_rule!r}: statistic {STAT_FIELDS[field]} of "
                               f"blocks {j}/{n} of target {self.group.target!r} is unusable ({num}, {den})")
        return num / den

    def delta_factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) with W'_n - W_n = L @ R under this module's merge rule (L: d_out x k, R: k x d_in, like
        nn.Linear.weight), in `dtype` (default: the adapter weights' dtype). Never d_out x d_in."""
        n, s, rule = self.index, self.scaling, self.merge_rule
        dtype = dtype or self.lora_A.weight.dtype
        A, B = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        if self.variant == "bs":
            blocks = [self, *self.earlier()]
            return (s * torch.cat([b.lora_B.weight.to(dtype) for b in blocks], dim=1),
                    torch.cat([b.lora_A.weight.to(dtype) for b in blocks]))
        if self.variant == "is":
            if rule == "inputs":
                factor = 1.0 + (1.0 if n == 0 else self._ratio(n - 1, n, 0))
            else:  # weights
                factor = 1.0 + (1.0 if n < 2 else self._ratio(n - 2, n - 1, 2))
            return factor * s * B, A
        if rule == "inputs":
            return s * B, A + sum(self._ratio(b.index, n, 0) * b.lora_A.weight.to(dtype) for b in self.earlier())
        factor = 1.0 + sum(self._ratio(b.index, n, 1) for b in self.earlier())  # middle
        return factor * s * B, A

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W'_n - W_n, dense (d_out, d_in): for merging into W, one module at a time."""
        left, right = self.delta_factors(dtype)
        return left @ right


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
        factors = [tuple(t.detach().clone() for t in m.delta_factors()) for m in mods]
    for m, f in zip(mods, factors):
        m._merged_delta = f
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
    # all factors (low rank) before any module is removed; each dense delta in fp32 at least, formed
    # only while it is added to its W and rounded once
    factors = [tuple(t.detach().clone() for t in m.delta_factors(torch.promote_types(
        torch.promote_types(p.weight.dtype, m.lora_A.weight.dtype), torch.float32))) for p, (_, m) in zip(parents, mods)]
    for (name, m), proj, (left, right) in zip(mods, parents, factors):
        child = name.rpartition(".")[2]
        delta = left @ right
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
