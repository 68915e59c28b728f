"""Run under torchrun by the distributed tests: the recipe's `run` with its default callbacks, optionally
stopped after step N (as a preemption would stop it), then each rank's layout and trainable-weight
digest written to OUT.rank<R>.json."""
from __future__ import annotations

import hashlib
import json
import sys
import warnings

from lor2c_ds import engine as ds
from lor2c_ds.adapters import get_layout
from lor2c_ds.callbacks import Callback
from lor2c_ds.config import load_config
from lor2c_ds.train import default_callbacks, run

warnings.filterwarnings("ignore", category=FutureWarning)


class StopAfter(Callback):
    name = "stop_after"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state) -> None:
        self.engine = state.engine  # what the run ends with (on_train_end is skipped by an early stop)
        if state.step == self.step:
            state.stop = True


def main(config: str, stop_after: str, out: str, *overrides: str) -> None:
    cfg = load_config(config, list(overrides))
    rank, world = ds.init_distributed()
    probe = StopAfter(int(stop_after))
    run(cfg, rank, world, default_callbacks(cfg) + [probe])
    digest = hashlib.sha256()
    with ds.gathered_trainable(probe.engine):
        for name, p in probe.engine.module.named_parameters():
            if p.requires_grad:
                digest.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"layout": get_layout(probe.engine.module), "digest": digest.hexdigest()}, f)
    ds.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
