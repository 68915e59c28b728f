"""Adapters in PEFT's habits: a config, `apply_adapters`, a trainable summary, save/load."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..registry import find_blocks, hidden_size, projection_dims, spec_for, unknown_targets
from .config import METHODS, AdapterConfig, ConfigError
from .lor2c import LoR2CAdapter, LoR2CStack
from .lora import LoRA, attach_lora
from .reslora import ResLoRA, attach_reslora, merge_reslora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

__all__ = [
    "METHODS", "AdapterConfig", "ConfigError", "LoRA", "LoR2CAdapter", "LoR2CStack", "ResLoRA", "merge_reslora",
    "apply_adapters", "adapter_state_dict", "trainable_summary", "save_adapters", "load_adapters",
    "CONFIG_NAME", "WEIGHTS_NAME",
]


def apply_adapters(model: nn.Module, config: AdapterConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze `model`, attach the adapters of `config` in place and return it.

    Trainable afterwards: the adapters and `modules_to_save` (by default the registry's task head,
    where the model has one). Each adapter is created on the device and in the dtype of the layer it
    attaches to (a projection's weight; the blocks' for LoR2C), or in `dtype` when given (e.g.
    torch.float32 adapters on a bf16 base); adapters compute in their own dtype either way.
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
        error = unknown_targets(model.config.model_type, spec, targets)
        if error:
            raise ConfigError(error)
        for block in blocks:
            _attach_lora_targets(block, spec, targets, config.r, config.alpha, config.dropout)
    elif config.method == "reslora":
        attach_reslora(model, blocks, spec, config)
    else:
        spans = config.resolved_spans(len(blocks))
        groups = config.resolved_groups(len(blocks)) if config.method == "share_lor2c" else None
        for index, block in enumerate(blocks if config.delta_at is not None else []):
            if not isinstance(_submodule(block, config.delta_at), nn.Module):
                raise ConfigError(f"adapter.delta_at {config.delta_at!r} is not a module of block {index} "
                                  f"({type(block).__name__})")
        stack = LoR2CStack(hidden, config.r, config.alpha, config.dropout, spans, groups, config.delta_at)
        model.add_module("lor2c", stack)
        stack.attach(model, blocks)
        if config.injections:
            # InjectLoR2C's q/v LoRA of rank r/2, allocated now (inactive, B = 0) so that the optimizer,
            # built once over a fixed parameter set, already holds them when one is switched on.
            for start, end in spans:
                if start == end:
                    for lora in _attach_lora_targets(blocks[start], spec, ["q", "v"], config.r // 2,
                                                     config.alpha, config.dropout):
                        lora.active = False

    if config.init == "gaussian":
        _gaussian_down_projections(model)
    _place_adapters(model, blocks, dtype)
    heads = config.modules_to_save if config.modules_to_save is not None else [
        h for h in spec.heads if hasattr(model, h)]
    for name in heads:
        try:
            model.get_submodule(name).requires_grad_(True)
        except AttributeError:
            raise ConfigError(f"adapter.modules_to_save names {name!r}, which the model does not have") from None
    model.adapter_config = config
    return model


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _gaussian_down_projections(model: nn.Module) -> None:
    """Every A (rank x d_in; a shared A once) drawn from N(0, 1 / rank^2), as PEFT's "gaussian" init."""
    seen = {}
    for module in model.modules():
        if isinstance(module, (LoRA, ResLoRA)):
            seen[id(module.lora_A.weight)] = module.lora_A.weight
        elif isinstance(module, LoR2CAdapter):
            seen[id(module.down.weight)] = module.down.weight
    with torch.no_grad():
        for weight in seen.values():
            nn.init.normal_(weight, std=1.0 / weight.shape[0])


def _place_adapters(model: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype | None) -> None:
    """Move each adapter to its layer's device, and to `dtype` or the layer's floating dtype."""
    def place(module: nn.Module, like: torch.Tensor) -> None:
        module.to(device=like.device, dtype=dtype or (like.dtype if like.is_floating_point() else None))

    for name, module in model.named_modules():
        if isinstance(module, (LoRA, ResLoRA)):  # a child of its projection
            place(module, model.get_submodule(name.rpartition(".")[0]).weight)
    if isinstance(getattr(model, "lor2c", None), LoR2CStack):
        place(model.lor2c, next(p for p in blocks[0].parameters() if p.is_floating_point()))


def _attach_lora_targets(block: nn.Module, spec, targets: list[str], r: int, alpha: float,
                         dropout: float) -> list[LoRA]:
    attached = []
    for target in targets:
        proj = spec.projections[target]
        module = block.get_submodule(proj.path)
        d_in, d_out = projection_dims(module)
        part = proj.output_slice(d_out)
        lora = LoRA(d_in, part.size if part else d_out, r, alpha, dropout, proj.chunk, proj.chunks, part)
        attach_lora(module, target, lora)
        attached.append(lora)
    return attached


def inactive_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of adapters that are switched off (retired or not yet injected)."""
    off = {id(p) for m in model.modules() if getattr(m, "active", True) is False
           for p in m.parameters(recurse=True)}
    return off


def get_layout(model: nn.Module) -> dict:
    """The LoR2C topology: spans with their flags, and the injected LoRA that are switched on."""
    if not hasattr(model, "lor2c"):
        return {}
    return {"spans": model.lor2c.topology(),
            "injected": [name for name, m in model.named_modules() if isinstance(m, LoRA) and m.active]}


def set_layout(model: nn.Module, layout: dict) -> None:
    """Restore a topology recorded by `get_layout` on a model built from the same adapter config."""
    if "spans" in layout:
        model.lor2c.set_topology(layout["spans"])
    modules = dict(model.named_modules())
    for name in layout.get("injected", []):
        if not isinstance(modules.get(name), LoRA):
            raise ValueError(f"the layout switches on {name}, which is not an injected LoRA of this model")
        modules[name].active = True


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())  # ZeRO-3 keeps the full size in ds_numel


def trainable_summary(model: nn.Module) -> str:
    """PEFT's one-line summary; counts full sizes even when the weights are partitioned."""
    params = list(model.parameters())  # shared tensors are yielded once
    off = inactive_parameters(model)  # held by the optimizer, but neither used nor trained
    trainable = sum(_numel(p) for p in params if p.requires_grad and id(p) not in off)
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
    config = model.adapter_config.to_dict()
    layout = get_layout(model)
    if layout:
        config["layout"] = layout  # MergeLoR2C / InjectLoR2C change it during training
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the saved adapters to a plain `model` (or one with the same adapters) and load them."""
    directory = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing: not an adapter directory")
    raw = json.loads((directory / CONFIG_NAME).read_text())
    layout = raw.pop("layout", None)
    config = AdapterConfig.from_dict(raw)
    if not hasattr(model, "adapter_config"):
        apply_adapters(model, config)
    elif model.adapter_config.to_dict() != config.to_dict():
        raise ValueError(f"the model's adapters differ from the ones saved in {directory}")
    if layout:
        set_layout(model, layout)
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
