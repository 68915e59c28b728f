"""Run under torchrun by tests/test_reslora_distributed.py: on a ZeRO-3 engine, ||W + s B A|| per ResLoRA
module from each rank's partition (one all-reduce) against the same norm of the gathered weight."""
from __future__ import annotations

import json
import sys
import warnings

import torch

from lor2c_ds import engine as ds
from lor2c_ds.adapters.reslora import reslora_modules
from lor2c_ds.config import load_config
from lor2c_ds.reslora_training import weight_norms
from lor2c_ds.train import load_model

warnings.filterwarnings("ignore", category=FutureWarning)


def main(config: str, out: str) -> None:
    cfg = load_config(config, [])
    rank, world = ds.init_distributed()
    ds_config = ds.build_ds_config(cfg, world, total_steps=10)
    model = load_model(cfg, ds_config)
    torch.manual_seed(3)
    with torch.no_grad():  # B = 0 at birth would leave <W, B A> untested
        for _, m in reslora_modules(model):
            m.lora_B.weight.normal_(0, 0.5)
    engine = ds.initialize(model, ds_config)
    module = engine.module
    named = reslora_modules(module)
    mods = [m for _, m in named]
    parents = [module.get_submodule(n.rpartition(".")[0]) for n, _ in named]
    sharded = weight_norms(module, mods, reduce=ds.all_reduce_sum, partition=ds.local_partition, rank=rank)
    whole = []
    for m, proj in zip(mods, parents):
        with ds.gathered([proj.weight]):
            W = proj.weight if isinstance(proj, torch.nn.Linear) else proj.weight.T  # Conv1D keeps (in, out)
            width = m.lora_B.weight.shape[0]
            W = W[m.chunk * width:(m.chunk + 1) * width].double()
            merged = W + m.scaling * (m.lora_B.weight.double() @ m.lora_A.weight.double())
            whole.append(merged.norm().item())
    local = [ds.local_partition(p.weight)[0].numel() for p in parents]
    full = [p.weight.ds_numel for p in parents]
    json.dump({"sharded": sharded.tolist(), "gathered": whole, "local": local, "full": full},
              open(f"{out}.rank{rank}.json", "w"))
    ds.barrier()
    ds.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
