"""LoRA: a low-rank update beside a frozen projection.

    y = W x + b + s * B A D_p(x),    s = alpha / r

A (r x d_in) starts Kaiming-uniform (a = sqrt 5), B (d_out x r) starts at zero, so the adapter is an
exact no-op at step 0. Merged form: W' = W + s * B A.

The frozen projection is left untouched: the adapter is a child module of it (`<proj>.lora_<target>`)
and a forward hook adds its output, so backbone parameter names never change. For fused projections
(GPT-2's c_attn holds q, k and v) the update lands on one output slice only.

Dtypes: `apply_adapters` creates A and B in the dtype and on the device of the projection's weight. The
low-rank path runs in the adapter's own dtype (x is cast to it) and its result is cast to the dtype of
the output it is added to, so a bf16 base with fp32 adapters works as well as bf16 or fp32 throughout.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..fused import OutputSlice, equal_chunk


def init_low_rank(down: nn.Linear, up: nn.Linear) -> None:
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    nn.init.zeros_(up.weight)


class LoRA(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 chunk: int = 0, chunks: int = 1, out_slice: OutputSlice | None = None):
        super().__init__()
        self.r, self.scaling = r, alpha / r
        self.chunk, self.chunks = chunk, chunks  # the output part of a fused projection it updates
        self.out_slice = out_slice or equal_chunk(chunk, chunks, chunks * out_features)
        self.active = True  # InjectLoR2C allocates its LoRA switched off
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        init_low_rank(self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def add_to_output(self, proj: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        """Forward hook on the frozen projection (a bound method, so deep copies rebind it)."""
        if not self.active:
            return None
        delta = self(args[0]).to(output.dtype)
        if self.out_slice is not None:
            delta = self.out_slice.pad(delta)
        return output + delta

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s * B A, shaped (d_out, d_in) like nn.Linear.weight, in `dtype` (default: the adapter's)."""
        dtype = dtype or self.lora_A.weight.dtype
        return (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype)) * self.scaling


def attach_lora(proj: nn.Module, target: str, lora: LoRA):
    """Register `lora` under `proj` as `lora_<target>` and add its output to the projection's."""
    proj.add_module(f"lora_{target}", lora)
    return proj.register_forward_hook(lora.add_to_output)
