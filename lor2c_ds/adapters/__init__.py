"""Adapters in PEFT's habits: a config, `apply_adapters`, a trainable summary, save/load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..registry import find_blocks, hidden_size, projection_dims, spec_for
from .config import METHODS, AdapterConfig, ConfigError
from .lor2c import LoR2CAdapter, LoR2CStack
from .lora import LoRA, attach_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

__all__ = [
    "METHODS", "AdapterConfig", "ConfigError", "LoRA", "LoR2CAdapter", "LoR2CStack",
    "apply_adapters", "adapter_state_dict", "trainable_summary", "save_adapters", "load_adapters",
    "CONFIG_NAME", "WEIGHTS_NAME",
]


def apply_adapters(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze `model`, attach the adapters of `config` in place and return it.

    Trainable afterwards: the adapters and `modules_to_save` (by default the registry's task head,
    where the model has one).
    """
    if hasattr(model, "adapter_config"):
        raise ValueError("this model already has adapters; apply_adapters works on a plain model")
    spec = spec_for(model)
    blocks = find_blocks(model, spec)
    hidden = hidden_size(model)
    config.validate(num_blocks=len(blocks), hidden=hidden)
    model.requires_grad_(False)  # adapters created below are trainable from birth

    if config.method == "lora":
        targets = config.targets or list(spec.default_targets)
        unknown = [t for t in targets if t not in spec.projections]
        if unknown:
            raise ConfigError(f"unknown LoRA target(s) {unknown} for {model.config.model_type}; "
                              f"known: {sorted(spec.projections)}")
        for block in blocks:
            for target in targets:
                proj = spec.projections[target]
                module = block.get_submodule(proj.path)
                d_in, d_out = projection_dims(module)
                lora = LoRA(d_in, d_out // proj.chunks, config.r, config.alpha, config.dropout,
                            proj.chunk, proj.chunks)
                attach_lora(module, target, lora)
    else:
        spans = config.resolved_spans(len(blocks))
        groups = config.resolved_groups(len(blocks)) if config.method == "share_lor2c" else None
        stack = LoR2CStack(hidden, config.r, config.alpha, config.dropout, spans, groups)
        model.add_module("lor2c", stack)
        stack.attach(model, blocks)

    heads = config.modules_to_save if config.modules_to_save is not None else [
        h for h in spec.heads if hasattr(model, h)]
    for name in heads:
        try:
            model.get_submodule(name).requires_grad_(True)
        except AttributeError:
            raise ConfigError(f"adapter.modules_to_save names {name!r}, which the model does not have") from None
    model.adapter_config = config
    return model


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 keeps the full size in ds_numel


def trainable_summary(model: nn.Module) -> str:
    """PEFT's one-line summary; counts full sizes even when the weights are partitioned."""
    params = list(model.parameters())  # shared tensors are yielded once
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    total = sum(_numel(p) for p in params)
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / total:.4f}")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapters and task head), each stored once, as contiguous CPU copies.

    Under ZeRO-3 the caller must make the parameters available first (the engine does).
    """
    return {name: p.detach().to("cpu", copy=True).contiguous()
            for name, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: nn.Module, directory: str | os.PathLike,
                  state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (no pickle)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model) if state is None else state
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "library": "lor2c_ds"})
    (directory / CONFIG_NAME).write_text(json.dumps(model.adapter_config.to_dict(), indent=2) + "\n")
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the saved adapters to a plain `model` (or one with the same adapters) and load them."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not an adapter directory")
    config = AdapterConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
    if not hasattr(model, "adapter_config"):
        apply_adapters(model, config)
    elif model.adapter_config.to_dict() != config.to_dict():
        raise ValueError(f"the model's adapters differ from the ones saved in {directory}")
    state = load_file(str(directory / WEIGHTS_NAME))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"adapter weights in {directory} do not match the model: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
