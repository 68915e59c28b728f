"""LoR2C and ShareLoR2C: low-rank residual connections across spans of blocks.

An adapter (A, B, start, end) reads the hidden state that enters block `start` and adds a low-rank
image of it to the hidden state that leaves block `end`:

    h_{end+1} = Block_end(... Block_start(h_start) ...) + s * B A D_p(h_start),    s = alpha / r

A (r x d) Kaiming-uniform, B (d x r) zero: the model is unchanged at step 0. The delta is added after
the block's own residual additions and norms, so it is part of the next block's input. `delta_at`
(an ablation; METHOD.md places the delta at the output) names a module inside the block whose input
receives it instead: `output.LayerNorm` in BERT adds it before the block's last norm. The shortcut
cannot be folded into the backbone (the blocks are non-linear); it costs 2 r d multiply-adds per token.

ShareLoR2C: all spans of a share group use one A (stored once, under `shared_A.<group>`) and keep
their own B; the gradient of the shared A is the sum over the group's spans.

Routing: every block has a pre-hook that records its input when an adapter starts there and a hook
that adds the deltas of the adapters ending there; the tables behind them follow the current
topology (MergeLoR2C lengthens a span, InjectLoR2C retires one: see lor2c_ds/topology.py). Adapters
are keyed by their first start block and keep their parameters when the topology changes. The
adapters run in their own dtype (`apply_adapters` gives them the blocks' dtype and device) and their
sum is cast to the dtype of the block's output. The recorded inputs live in one forward only: they are reset when the model's forward starts and must
all be consumed when it ends. transformers checkpoints a block's `forward`, not its `__call__`, so under activation
checkpointing the hooks run once, outside the recomputed region (tests/test_adapters.py checks the
gradients match).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .lora import init_low_rank


class LoR2CAdapter(nn.Module):
    def __init__(self, hidden: int, r: int, alpha: float, dropout: float, start: int, end: int,
                 shared_A: nn.Linear | None = None):
        super().__init__()
        self.start, self.end, self.scaling = start, end, alpha / r
        self.active = True  # False once merged into its lower neighbour or swapped for attention LoRA
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if shared_A is None:
            self.lora_A = nn.Linear(hidden, r, bias=False)
        else:
            self._shared = (shared_A,)  # a tuple: not a registered child, so stored once
        self.lora_B = nn.Linear(r, hidden, bias=False)
        init_low_rank(self.down, self.lora_B)

    @property
    def down(self) -> nn.Linear:
        return self._shared[0] if hasattr(self, "_shared") else self.lora_A

    def forward(self, h_start: torch.Tensor) -> torch.Tensor:
        h_start = h_start.to(self.lora_B.weight.dtype)  # the adapter's dtype; the caller casts back
        return self.lora_B(self.down(self.dropout(h_start))) * self.scaling


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _add_to_output(output, delta: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return output + delta.to(output.dtype)
    return (output[0] + delta.to(output[0].dtype), *output[1:])  # blocks that return a tuple, hidden state first


class LoR2CStack(nn.Module):
    """All LoR2C adapters of one model, and the hooks that route the residual stream to them."""

    def __init__(self, hidden: int, r: int, alpha: float, dropout: float,
                 spans: list[tuple[int, int]], groups: list[list[int]] | None, delta_at: str | None = None):
        super().__init__()
        self.delta_at = delta_at
        self.shared_A = nn.ModuleDict()
        group_of: dict[int, nn.Linear] = {}
        for gi, starts in enumerate(groups or []):
            self.shared_A[str(gi)] = nn.Linear(hidden, r, bias=False)
            group_of.update({s: self.shared_A[str(gi)] for s in starts})
        self.adapters = nn.ModuleDict({
            str(s): LoR2CAdapter(hidden, r, alpha, dropout, s, e, group_of.get(s)) for s, e in spans
        })
        self._stream: dict[int, torch.Tensor] = {}
        self.route()

    def route(self) -> None:
        """Rebuild the block -> adapter tables from the adapters' spans and active flags."""
        active = [(key, a) for key, a in self.adapters.items() if a.active]
        # Retired adapters stay in the graph on a zero input, so every gradient reduction sees an exact
        # zero for them (ZeRO-3 otherwise reuses the last gradient it had for a parameter absent from
        # the backward, and Adam would keep moving it); calling them as modules keeps ZeRO-3's
        # parameter fetching and its recorded module order valid.
        self._retired = [a for a in self.adapters.values() if not a.active]
        self._starts = {a.start for _, a in active}
        self._ends: dict[int, list[str]] = {}
        for key, a in active:
            self._ends.setdefault(a.end, []).append(key)

    def attach(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        # Hooks are partials of bound methods, so a deep copy of the model rebinds them to its copy.
        model.register_forward_pre_hook(self._reset)
        model.register_forward_hook(self._check_consumed)
        self._last_block = len(blocks) - 1
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self._record, index), with_kwargs=True)
            block.register_forward_hook(partial(self._add, index))
            if self.delta_at is not None:
                block.get_submodule(self.delta_at).register_forward_pre_hook(partial(self._add_to_input, index))

    def topology(self) -> dict[str, list]:
        """{adapter key: [start, end, active]}: what a checkpoint must restore."""
        return {key: [a.start, a.end, a.active] for key, a in self.adapters.items()}

    def set_topology(self, topology: dict[str, list]) -> None:
        if set(topology) != set(self.adapters):
            raise ValueError(f"topology names adapters {sorted(topology)}, the model has {sorted(self.adapters)}")
        for key, (start, end, active) in topology.items():
            adapter = self.adapters[key]
            adapter.start, adapter.end, adapter.active = int(start), int(end), bool(active)
        self.route()

    def _reset(self, module, args):
        self._stream.clear()

    def _check_consumed(self, module, args, output):
        pending = sorted(self._stream)
        self._stream.clear()
        if pending:
            raise RuntimeError(f"LoR2C spans starting at blocks {pending} never reached their end block")

    def _record(self, index: int, block, args, kwargs):
        if index in self._starts:
            self._stream[index] = _hidden_of(args, kwargs)

    def _deltas(self, index: int):
        """The sum of the deltas of the adapters that end at block `index` (their recorded inputs consumed)."""
        delta = None
        for key in self._ends.get(index, []):
            adapter = self.adapters[key]
            d = adapter(self._stream.pop(adapter.start))
            delta = d if delta is None else delta + d
        return delta

    def _add_to_input(self, index: int, module, args):
        delta = self._deltas(index)
        return None if delta is None else (args[0] + delta.to(args[0].dtype), *args[1:])

    def _add(self, index: int, block, args, output):
        keys = self._ends.get(index, [])
        retired = self._retired if index == self._last_block else []
        if self.delta_at is not None:  # added inside the block; here only check that it was
            if any(self.adapters[k].start in self._stream for k in keys):
                raise RuntimeError(f"block {index}'s {self.delta_at} never ran: the LoR2C delta was not added")
            keys = []
        if not keys and not retired:
            return None
        delta = self._deltas(index) if keys else None
        if retired:
            hidden = _hidden_of((output,) if isinstance(output, torch.Tensor) else output, {})
            zero_input = hidden.new_zeros(1, hidden.shape[-1])
            zero = torch.stack([a(zero_input).sum() for a in retired]).sum() * 0.0
            delta = zero if delta is None else delta + zero
        return _add_to_output(output, delta)
