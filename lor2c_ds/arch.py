"""What the registry and discovery describe: a family's block stack, projections and head."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .fused import OutputSlice, equal_chunk


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Projection:
    """A projection inside a block: its dotted path, and for fused projections (GPT-2's c_attn)
    which of `chunks` output parts the target is: equal contiguous parts, or `split` (unequal parts
    under grouped-query attention, per-head interleaving; see lor2c_ds/fused.py)."""

    path: str
    chunk: int = 0
    chunks: int = 1
    split: OutputSlice | None = None

    def output_slice(self, d_out: int) -> OutputSlice | None:
        """The target's rows of the projection's `d_out` output rows (None: all of them)."""
        return self.split if self.split is not None else equal_chunk(self.chunk, self.chunks, d_out)


@dataclass(frozen=True)
class ArchSpec:
    block_paths: tuple[str, ...]  # candidate dotted paths of the block ModuleList, first match wins
    projections: dict[str, Projection]  # short target name -> projection inside one block
    heads: tuple[str, ...] = ()  # task-head modules trained with the adapters (classification)
    default_targets: tuple[str, ...] = ("q", "v")
    extra: dict = field(default_factory=dict)


def projection_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D, without reading the weight
    (it may be a partitioned placeholder)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return module.nx, module.nf
    raise UnsupportedArchitectureError(f"cannot adapt {type(module).__name__}: not a Linear or Conv1D")
