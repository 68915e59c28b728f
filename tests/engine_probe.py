"""Run under torchrun by tests/test_distributed.py: builds the real engine on a tiny model and writes
what each rank holds (before and after optimizer steps) and a checkpoint round trip to JSON."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import torch

from lor2c_ds import engine as ds
from lor2c_ds.config import load_config
from lor2c_ds.train import load_model, scored_labels, summed_loss

warnings.filterwarnings("ignore", category=FutureWarning)


def digest(engine) -> str:
    h = hashlib.sha256()
    with ds.gathered_trainable(engine):
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def train_steps(engine, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        ids = torch.randint(5, 1000, (2, 12), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (2,), generator=g),
                 "valid": torch.ones(2)}
        logits = engine(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        loss = summed_loss(logits, scored_labels(batch, "classification"), "classification") / 2
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def main(config: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    rank, world = ds.init_distributed()
    ds_config = ds.build_ds_config(cfg, world, total_steps=10)
    model = load_model(cfg, ds_config)
    engine = ds.initialize(model, ds_config)
    report = {"rank": rank, "world": world, "stage": engine.zero_optimization_stage(),
              "before": ds.partition_report(engine)}
    groups = engine.optimizer.fp16_groups if report["stage"] == 3 else engine.optimizer.bit16_groups
    stepped = [p for group in groups for p in group]
    report["stepped_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in stepped)
    report["stepped_all_trainable"] = all(p.requires_grad for p in stepped)
    report["losses"] = train_steps(engine, 3, seed=1)
    report["after"] = ds.partition_report(engine)
    report["digest"] = digest(engine)
    ckpt = Path(out).parent / "ckpt"
    ds.save_checkpoint(engine, ckpt, tag="probe", client_state={"step": 3})
    report["continued"] = train_steps(engine, 2, seed=2)

    torch.manual_seed(123)  # a different adapter init: the checkpoint must restore the trained one
    engine2 = ds.initialize(load_model(cfg, ds_config), ds_config)
    state = ds.load_checkpoint(engine2, ckpt, tag="probe")
    report["restored_client_state"] = state.get("step")
    report["resumed"] = train_steps(engine2, 2, seed=2)
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(report))
    ds.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
