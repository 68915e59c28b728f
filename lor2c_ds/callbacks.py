"""The extension point of the training loop: topology events, statistics, preemption."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class RunStateLike(Protocol):
    """What a callback may read and set of the run (lor2c_ds.train.RunState is one)."""

    cfg: Any  # the TrainConfig
    engine: Any  # the DeepSpeed engine; a callback may replace it (and must keep it valid)
    rank: int
    world: int
    metrics: Any  # .write(step, kind, values) and .event(step, kind, payload)
    step: int
    stop: bool  # set to end the loop after this step
    total_steps: int
    data: Any  # the run's PreparedData (eval split and collator)

    @property
    def output_dir(self) -> Path: ...


class Callback:
    """Hooks run on every rank, in the same order, so they may use collectives.

    `state_dict` is written under the callback's `name` in every checkpoint's `run_state.json` (so it
    must be JSON), and handed back to `load_state_dict` on resume *before* the model is built, so that
    `configure_model` can rebuild what the state describes (a changed topology) before DeepSpeed
    loads the checkpoint's tensors into it.
    """

    name = "callback"

    def load_state_dict(self, state: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def configure_model(self, model: nn.Module) -> nn.Module:
        """Called on the model with its adapters, before the engine is built."""
        return model

    def on_train_start(self, run: RunStateLike) -> None: ...

    def step_partials(self, run: RunStateLike) -> torch.Tensor | None:
        """This rank's values to be summed over the ranks by the step's own closing all-reduce (1-D),
        taken after the optimizer step; None for none. The sums come back through `on_step_sums`."""
        return None

    def on_step_sums(self, run: RunStateLike, sums: list[float]) -> None:
        """The sums over the ranks of this step's `step_partials`, before any `on_step_end`."""

    def on_step_end(self, run: RunStateLike) -> None: ...

    def on_train_end(self, run: RunStateLike) -> None:
        """Only when training reached its last step; a run stopped early (preemption) skips it."""
