"""The adapter configuration: one dataclass, validated, stored as JSON beside the weights."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METHODS = ("lora", "lor2c", "share_lor2c")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the problem."""


@dataclass
class AdapterConfig:
    """What to attach and where.

    method: "lora" (LoRA on `targets`), "lor2c" (one low-rank shortcut per span) or "share_lor2c"
        (LoR2C whose spans share the down-projection A within each share group).
    r, alpha, dropout: rank, scaling numerator (s = alpha / r) and dropout on the adapter input.
    targets: LoRA projections by short name (q, k, v, o, gate, up, down; see the registry).
    spans: LoR2C spans as [start, end] block indices (inclusive); None means one per block.
    share_groups: ShareLoR2C groups as lists of span start blocks; None means all spans in one group.
    modules_to_save: extra modules trained in full (the task head); None means the registry's head.
    """

    method: str = "lor2c"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None
    spans: list[list[int]] | None = None
    share_groups: list[list[int]] | None = None
    modules_to_save: list[str] | None = None

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
        if self.method not in METHODS:
            raise ConfigError(f"unknown adapter method {self.method!r}; choose one of {list(METHODS)}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"adapter.r must be a positive integer, got {self.r!r}")
        if hidden is not None and self.r > hidden:
            raise ConfigError(f"adapter.r={self.r} is larger than the model's hidden size {hidden}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ConfigError(f"adapter.alpha must be a positive number, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout!r}")
        if self.method == "lora":
            if self.spans is not None or self.share_groups is not None:
                raise ConfigError("adapter.spans / adapter.share_groups apply to lor2c methods, not lora")
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

    def _check_spans(self, num_blocks: int | None) -> None:
        taken: set[int] = set()
        for span in self.spans:
            if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(x, int) for x in span)):
                raise ConfigError(f"adapter.spans entries must be [start, end] integer pairs, got {span!r}")
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
