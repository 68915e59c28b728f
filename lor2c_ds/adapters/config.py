"""The adapter configuration: one dataclass, validated, stored as JSON beside the weights."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "lor2c", "share_lor2c", "reslora")
RESLORA_VARIANTS = ("is", "bs", "ms")
EVENT_SCHEDULES = ("quarter", "epochs")  # MergeLoR2C / InjectLoR2C timing; see topology.EventSchedule
# The merge rules each ResLoRA variant accepts; the first is its default.
RESLORA_MERGE_RULES = {"is": ("inputs", "weights"), "bs": ("exact",), "ms": ("inputs", "middle")}


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the problem."""


@dataclass(frozen=True)
class Bound:
    """The range of a numeric field: low/high, each closed unless marked open; None: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value) -> bool:
        return not ((self.low is not None and (value < self.low or (self.low_open and value == self.low)))
                    or (self.high is not None and (value > self.high or (self.high_open and value == self.high))))

    def describe(self, integer: bool) -> str:
        kind = "integer" if integer else "number"
        if self.high is None and self.low == 0:
            return f"a {'positive' if self.low_open else 'non-negative'} {kind}"
        if self.high is None and self.low == 1 and integer and not self.low_open:
            return "a positive integer"
        if self.high is None:
            return f"{'an integer' if integer else 'a number'} {'>' if self.low_open else '>='} {self.low}"
        interval = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"an integer in {interval}" if integer else f"in {interval}"


POSITIVE_INT = Bound(1)
NON_NEGATIVE = Bound(0)
POSITIVE = Bound(0, low_open=True)


def _describe(hint, bound: Bound | None) -> str:
    """How a value of annotation `hint` is described in an error message."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return f"{_describe(inner, bound)} or null"
    if hint is int:
        return bound.describe(True) if bound else "an integer"
    if hint is float:
        return bound.describe(False) if bound else "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if typing.get_origin(hint) is list and args:
        inner = typing.get_args(args[0])
        return f"a list of {_describe(inner[0], None).split()[-1]} lists" if inner else \
            f"a list of {_describe(args[0], None).split()[-1]}s"
    return "a list" if hint is list else getattr(hint, "__name__", str(hint))


def _fits(value, hint) -> bool:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin is list or hint is list:
        return isinstance(value, (list, tuple)) and (not args or all(_fits(v, args[0]) for v in value))
    return True  # a nested section: checked by its own class


def check_fields(obj, prefix: str, bounds: dict[str, Bound]) -> None:
    """Every field of dataclass `obj` against its annotation, and numeric ones against `bounds`;
    the error names `prefix + field`, the value and what is valid."""
    hints = typing.get_type_hints(type(obj))
    for spec in dataclasses.fields(obj):
        value, hint, bound = getattr(obj, spec.name), hints[spec.name], bounds.get(spec.name)
        wrong = not _fits(value, hint)
        if not wrong and bound is not None and value is not None and not bound.holds(value):
            wrong = True
        if wrong:
            raise ConfigError(f"{prefix}{spec.name} must be {_describe(hint, bound)}, got {value!r}")


INITS = ("kaiming", "gaussian")


@dataclass
class AdapterConfig:
    """What to attach and where.

    method: "lora" (LoRA on `targets`), "lor2c" (one low-rank shortcut per span) or "share_lor2c"
        (LoR2C whose spans share the down-projection A within each share group).
    r, alpha, dropout: rank, scaling numerator (s = alpha / r) and dropout on the adapter input.
    init: how every down-projection A starts: "kaiming" (Kaiming-uniform, a = sqrt 5: entries of
        sd 1 / sqrt(3 d_in), as LoRA) or "gaussian" (N(0, 1 / rank^2), PEFT's init_lora_weights=
        "gaussian"); B starts at zero either way, so the model is unchanged at step 0.
    targets: LoRA projections by short name (q, k, v, o, gate, up, down; see the registry).
    spans: LoR2C spans as [start, end] block indices (inclusive); None means one per block.
    delta_at: None adds a LoR2C delta to its end block's output (METHOD.md); a module path inside the
        block (BERT: output.LayerNorm) adds it to that module's input instead (an ablation).
    share_groups: ShareLoR2C groups as lists of span start blocks; None means all spans in one group.
    modules_to_save: extra modules trained in full (the task head); None means the registry's head.
    reslora_variant, pre_num, merge_rule: ResLoRA (method "reslora", LoRA on `targets` with shortcuts
        between layers): variant "is" (input shortcut), "bs" (block shortcut) or "ms" (middle
        shortcut); pre_num m, the earlier blocks bs/ms link (is links one); the inference merge rule
        (is: inputs | weights, ms: inputs | middle, bs: exact; None picks the first).
    merges, injections: MergeLoR2C / InjectLoR2C budgets M and D (both: IMLoR2C); lor2c methods only.
    max_merge_length: the most blocks a merged span may cover. sfs_k: score mode (None: mean of the
        singular values of B A; k: share of the k largest). event_schedule: "quarter" spreads the events
        over the first quarter of the optimizer steps; "epochs" is the reference epoch formula (whose
        events leave the first quarter when epochs < 4 x budget). event_every_steps: events every N
        optimizer steps instead of either. freeze_merged, refreeze_injected: the two
        reference-code quirks, for ablation only (see METHOD.md sections 5 and 6).
    """

    method: str = "lor2c"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    targets: list[str] | None = None
    spans: list[list[int]] | None = None
    delta_at: str | None = None
    share_groups: list[list[int]] | None = None
    modules_to_save: list[str] | None = None
    reslora_variant: str = "is"
    pre_num: int = 1
    merge_rule: str | None = None
    merges: int = 0
    injections: int = 0
    max_merge_length: int = 4
    sfs_k: int | None = None
    event_every_steps: int | None = None
    event_schedule: str = "quarter"
    freeze_merged: bool = False
    refreeze_injected: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "AdapterConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config key(s) {unknown}; known keys: {sorted(known)}")
        for key in ("alpha", "dropout"):  # YAML reads 1e-1 as a string
            if isinstance(raw.get(key), str):
                try:
                    raw = {**raw, key: float(raw[key])}
                except ValueError:
                    raise ConfigError(f"adapter.{key} must be a number, got {raw[key]!r}") from None
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, num_blocks: int | None = None, hidden: int | None = None) -> None:
        """Checks that need no model; with `num_blocks`/`hidden`, also the model-dependent ones."""
        if isinstance(self.spans, list):
            self._check_span_entries()  # before the generic check: it says what a span looks like
        check_fields(self, "adapter.", ADAPTER_BOUNDS)
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter.method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"adapter.r must be a positive integer, got {self.r!r}")
        if hidden is not None and self.r > hidden:
            raise ConfigError(f"adapter.r={self.r} is larger than the model's hidden size {hidden}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"adapter.alpha must be a positive number, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown adapter.init {self.init!r}; choose one of {list(INITS)}")
        self._check_reslora()
        self._check_events(num_blocks)
        if self.method in ("lora", "reslora"):
            if self.spans is not None or self.share_groups is not None:
                raise ConfigError(f"adapter.spans / adapter.share_groups apply to lor2c methods, not {self.method}")
            if self.delta_at is not None:
                raise ConfigError(f"adapter.delta_at applies to lor2c methods, not {self.method}")
            return
        if self.share_groups is not None and self.method != "share_lor2c":
            raise ConfigError("adapter.share_groups needs method: share_lor2c")
        if self.spans is not None:
            self._check_spans(num_blocks)
        if self.share_groups is not None and num_blocks is not None:
            starts = [s for s, _ in self.resolved_spans(num_blocks)]
            seen: set[int] = set()
            for group in self.share_groups:
                for start in group:
                    if start not in starts:
                        raise ConfigError(f"adapter.share_groups names block {start}, where no span starts "
                                          f"(span starts: {starts})")
                    if start in seen:
                        raise ConfigError(f"adapter.share_groups lists block {start} in more than one group")
                    seen.add(start)

    def _check_reslora(self) -> None:
        if self.method != "reslora":
            if (self.reslora_variant, self.pre_num, self.merge_rule) != ("is", 1, None):
                raise ConfigError("adapter.reslora_variant / adapter.pre_num / adapter.merge_rule need "
                                  f"method: reslora, not {self.method}")
            return
        if self.reslora_variant not in RESLORA_VARIANTS:
            raise ConfigError(f"unknown adapter.reslora_variant {self.reslora_variant!r}; "
                              f"choose one of {list(RESLORA_VARIANTS)}")
        if not isinstance(self.pre_num, int) or isinstance(self.pre_num, bool):
            raise ConfigError(f"adapter.pre_num must be an integer, got {self.pre_num!r}")
        if self.reslora_variant == "is" and self.pre_num != 1:
            raise ConfigError(f"adapter.pre_num={self.pre_num}: the input-shortcut variant (is) links "
                              "exactly the previous block; pre_num must be 1")
        if self.pre_num <= 0:
            raise ConfigError(f"adapter.pre_num={self.pre_num}: reslora_variant "
                              f"{self.reslora_variant} needs pre_num >= 1 earlier blocks")
        rules = RESLORA_MERGE_RULES[self.reslora_variant]
        if self.merge_rule is not None and self.merge_rule not in rules:
            raise ConfigError(f"adapter.merge_rule {self.merge_rule!r} is not a merge rule of reslora_variant "
                              f"{self.reslora_variant}; choose one of {list(rules)}")

    @property
    def resolved_merge_rule(self) -> str:
        return self.merge_rule or RESLORA_MERGE_RULES[self.reslora_variant][0]

    def _check_events(self, num_blocks: int | None) -> None:
        """MergeLoR2C / InjectLoR2C budgets and scoring; the schedule is checked once steps are known."""
        for key in ("merges", "injections", "max_merge_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"adapter.{key} must be a non-negative integer, got {value!r}")
        if self.event_schedule not in EVENT_SCHEDULES:
            raise ConfigError(f"adapter.event_schedule must be one of {list(EVENT_SCHEDULES)}, "
                              f"got {self.event_schedule!r}")
        if not (self.merges or self.injections):
            return
        if self.method not in ("lor2c", "share_lor2c"):
            raise ConfigError(f"adapter.merges / adapter.injections need a lor2c method, not {self.method}")
        if self.max_merge_length < 2:
            raise ConfigError(f"adapter.max_merge_length must be at least 2 blocks, got {self.max_merge_length}")
        if self.sfs_k is not None and not (isinstance(self.sfs_k, int) and 1 <= self.sfs_k <= self.r):
            raise ConfigError(f"adapter.sfs_k must be an integer in 1..r={self.r}, got {self.sfs_k!r}")
        if self.injections and self.r < 2:
            raise ConfigError(f"adapter.injections swaps a rank-r shortcut for rank r/2 LoRA: r must be >= 2, got {self.r}")
        if self.event_every_steps is not None and (not isinstance(self.event_every_steps, int)
                                                   or self.event_every_steps <= 0):
            raise ConfigError(f"adapter.event_every_steps must be a positive integer, got {self.event_every_steps!r}")
        if num_blocks is None:
            return
        spans = self.resolved_spans(num_blocks)
        singles = sum(1 for s, e in spans if s == e)
        if self.injections > singles:
            raise ConfigError(f"adapter.injections={self.injections} exceeds the {singles} single-block spans")
        possible = max_merges(spans, self.max_merge_length)
        if self.merges > possible:
            raise ConfigError(f"adapter.merges={self.merges} is more than possible: {len(spans)} spans with "
                              f"max_merge_length={self.max_merge_length} allow at most {possible}")
        if self.merges + self.injections > len(spans) - (1 if self.merges else 0):
            raise ConfigError(f"adapter.merges + adapter.injections = {self.merges + self.injections} would "
                              f"remove more than the {len(spans)} spans there are")

    def _check_span_entries(self) -> None:
        for span in self.spans:
            if not (isinstance(span, (list, tuple)) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
                raise ConfigError(f"adapter.spans entries must be [start, end] integer pairs, got {span!r}")

    def _check_spans(self, num_blocks: int | None) -> None:
        taken: set[int] = set()
        for span in self.spans:
            start, end = span
            if start < 0 or end < start:
                raise ConfigError(f"adapter span {list(span)} is invalid: need 0 <= start <= end")
            if num_blocks is not None and end >= num_blocks:
                raise ConfigError(f"adapter span {list(span)} is out of range: the model has {num_blocks} "
                                  f"blocks (0..{num_blocks - 1})")
            blocks = set(range(start, end + 1))
            if blocks & taken:
                raise ConfigError(f"adapter span {list(span)} overlaps another span")
            taken |= blocks

    def resolved_spans(self, num_blocks: int) -> list[tuple[int, int]]:
        if self.spans is None:
            return [(i, i) for i in range(num_blocks)]
        return sorted((int(s), int(e)) for s, e in self.spans)

    def resolved_groups(self, num_blocks: int) -> list[list[int]]:
        """Share groups as lists of span starts (ShareLoR2C only)."""
        starts = [s for s, _ in self.resolved_spans(num_blocks)]
        if self.share_groups is None:
            return [starts]
        grouped = {s for g in self.share_groups for s in g}
        return [sorted(g) for g in self.share_groups] + [[s] for s in starts if s not in grouped]


# Numeric fields' ranges (pre_num's depends on the variant: _check_reslora).
ADAPTER_BOUNDS = {"r": POSITIVE_INT, "alpha": POSITIVE, "dropout": Bound(0, 1, high_open=True),
                  "merges": NON_NEGATIVE, "injections": NON_NEGATIVE, "max_merge_length": NON_NEGATIVE,
                  "sfs_k": POSITIVE_INT, "event_every_steps": POSITIVE_INT}


def max_merges(spans: list[tuple[int, int]], max_length: int) -> int:
    """How many merges the spans allow: runs of adjacent spans, greedily packed up to `max_length` blocks."""
    total, run, prev_end = 0, [], None
    for start, end in sorted(spans) + [(None, None)]:
        if start is not None and prev_end is not None and start == prev_end + 1:
            run.append(end - start + 1)
        else:
            length, pieces = 0, 0
            for width in run:  # greedy packing of one run of adjacent spans
                if pieces and length + width <= max_length:
                    length += width
                    total += 1
                else:
                    length, pieces = width, pieces + 1
            run = [] if start is None else [end - start + 1]
        prev_end = end
    return total
