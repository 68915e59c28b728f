"""Run under torchrun by tests/test_export.py: for each recipe, trains a few steps under the real
engine, saves a checkpoint, and (rank 0) writes the live engine's logits on fixed inputs.

    export_probe.py OUT_ROOT NAME=RECIPE [NAME=RECIPE ...]

OUT_ROOT/NAME/ gets train_config.json, checkpoints/step_3/ and engine_logits.safetensors.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from lor2c_ds import checkpoint
from lor2c_ds import engine as ds
from lor2c_ds.config import load_config
from lor2c_ds.train import load_model, scored_labels, summed_loss

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 3


def batch(task: str, g: torch.Generator, rows: int = 2, seq: int = 12) -> dict:
    ids = torch.randint(5, 1000, (rows, seq), generator=g)
    labels = torch.randint(0, 2, (rows,), generator=g) if task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "valid": torch.ones(rows)}


def run(name: str, recipe: str, root: Path, rank: int, world: int) -> None:
    cfg = load_config(recipe, [f"output_dir={root / name}"])
    ds_config = ds.build_ds_config(cfg, world, total_steps=10)
    engine = ds.initialize(load_model(cfg, ds_config), ds_config)
    g = torch.Generator().manual_seed(1 + rank)
    for _ in range(STEPS):
        b = batch(cfg.task, g)
        logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        engine.backward(summed_loss(logits, scored_labels(b, cfg.task), cfg.task) / b["input_ids"].numel())
        engine.step()
    out = root / name
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    checkpoint.save(engine, out / "checkpoints", f"step_{STEPS}", {"step": STEPS, "epoch": 0, "world": world,
                                                                   "callbacks": {}}, rank)
    engine.eval()
    fixed = torch.Generator().manual_seed(99)
    ids = torch.randint(5, 1000, (3, 10), generator=fixed)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one padded row
    with torch.no_grad():
        logits = engine(input_ids=ids, attention_mask=mask).logits.float()  # every rank takes part
    if rank == 0:
        save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
                  str(out / "engine_logits.safetensors"))


def main(root: str, *pairs: str) -> None:
    rank, world = ds.init_distributed()
    for pair in pairs:
        name, recipe = pair.split("=", 1)
        run(name, recipe, Path(root), rank, world)
    ds.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
