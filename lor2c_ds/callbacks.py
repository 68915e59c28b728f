"""The extension point of the training loop: topology events, statistics, preemption."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .train import RunState


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

    def configure_model(self, model: "nn.Module") -> "nn.Module":
        """Called on the model with its adapters, before the engine is built."""
        return model

    def on_train_start(self, run: "RunState") -> None: ...

    def on_step_end(self, run: "RunState") -> None: ...

    def on_train_end(self, run: "RunState") -> None:
        """Only when training reached its last step; a run stopped early (preemption) skips it."""
