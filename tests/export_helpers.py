"""A fake training run for the export tests: a saved base model and an adapter checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_model

from lor2c_ds import AdapterConfig, apply_adapters, save_adapters


def fake_run(tmp: Path, family: str, seed: int = 5, base_dtype: torch.dtype = torch.float32,
             **adapter) -> tuple[Path, Path, torch.nn.Module]:
    """A base model directory and an adapter checkpoint with non-trivial (random) trained values;
    "fam:TYPE" builds TYPE from tests/family_models.py. base_dtype: the dtype the base is saved in (the
    returned trained model holds those values in fp32, as training loads them)."""
    from family_models import make_family

    build = (lambda: make_family(family[4:])) if family.startswith("fam:") else (lambda: make_model(family))
    base, ckpt = tmp / f"{family}_base", tmp / f"{family}_ckpt"
    saved = build() if base_dtype == torch.float32 else build().to(base_dtype)
    saved.save_pretrained(base, max_shard_size="40KB")  # several base shards
    model = build() if base_dtype == torch.float32 else saved.float()  # the saved values, in fp32
    apply_adapters(model, AdapterConfig(r=4, alpha=8, **adapter))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_adapters(model, ckpt)
    return base, ckpt, model.eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()
