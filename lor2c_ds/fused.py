"""Which output rows of a fused projection one adapter target owns.

A fused projection (GPT-2's c_attn, Phi-3's qkv_proj, GPT-NeoX's query_key_value, DeepSeek's kv_b_proj)
computes several targets in one matmul. Its output is `groups` consecutive periods of `period` rows;
the target owns the `width` rows from `offset` in every period:

    contiguous q, k, v (GPT-2, Phi-3 under GQA):  groups 1, period q+k+v, q at offset 0 width q
    per-head interleaved (GPT-NeoX):             groups heads, period 3 hd, v at offset 2 hd width hd

The adapter's own output is the target's rows in that order (period by period).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class OutputSlice:
    offset: int
    width: int
    period: int
    groups: int = 1

    def __post_init__(self):
        if not (0 <= self.offset and self.width > 0 and self.offset + self.width <= self.period and self.groups > 0):
            raise ValueError(f"bad fused-projection slice {self}")

    @property
    def size(self) -> int:
        """Rows the target owns (the adapter's out_features)."""
        return self.groups * self.width

    @property
    def total(self) -> int:
        """Rows of the fused projection."""
        return self.groups * self.period

    def pad(self, delta: torch.Tensor) -> torch.Tensor:
        """(..., size) -> (..., total), zero outside the target's rows."""
        d = delta.unflatten(-1, (self.groups, self.width))
        return F.pad(d, (self.offset, self.period - self.offset - self.width)).flatten(-2)

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The target's rows of a (total, d_in) weight, in the adapter's order (a view when groups == 1)."""
        return weight.unflatten(0, (self.groups, self.period))[:, self.offset:self.offset + self.width].flatten(0, 1)

    def add_(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """weight[target rows] += delta (size, d_in), in place (weight may be a transposed view)."""
        view = weight.unflatten(0, (self.groups, self.period))[:, self.offset:self.offset + self.width]
        view += delta.to(weight.dtype).unflatten(0, (self.groups, self.width))
        return weight


def equal_chunk(chunk: int, chunks: int, total: int) -> OutputSlice | None:
    """Chunk `chunk` of `chunks` equal contiguous parts of `total` rows (None: the whole output)."""
    if chunks == 1:
        return None
    width = total // chunks
    return OutputSlice(chunk * width, width, total, 1)
