"""Where each supported architecture keeps its block stack, projections and task head.

LoR2C needs the list of transformer blocks; LoRA (and ResLoRA, and InjectLoR2C) need the attention
and MLP projections inside a block. Adding a family is one `register_architecture` call.
"""
from __future__ import annotations

from torch import nn

from .arch import ArchSpec, Projection, UnsupportedArchitectureError, projection_dims  # noqa: F401 (re-exported)
from .discovery import WHAT_IS_LOOKED_FOR, DiscoveryError, discover


def _llama_like() -> ArchSpec:
    p = {k: Projection(f"self_attn.{k}_proj") for k in ("q", "k", "v", "o")}
    p.update({k: Projection(f"mlp.{k}_proj") for k in ("gate", "up", "down")})
    return ArchSpec(block_paths=("model.layers", "layers"), projections=p, heads=("score",))


def _bert_like(prefix: str) -> ArchSpec:
    p = {
        "q": Projection("attention.self.query"),
        "k": Projection("attention.self.key"),
        "v": Projection("attention.self.value"),
        "o": Projection("attention.output.dense"),
        "up": Projection("intermediate.dense"),
        "down": Projection("output.dense"),
    }
    return ArchSpec(block_paths=(f"{prefix}.encoder.layer", "encoder.layer"), projections=p,
                    heads=("classifier",))


def _gpt2() -> ArchSpec:
    p = {
        "q": Projection("attn.c_attn", 0, 3),
        "k": Projection("attn.c_attn", 1, 3),
        "v": Projection("attn.c_attn", 2, 3),
        "o": Projection("attn.c_proj"),
        "up": Projection("mlp.c_fc"),
        "down": Projection("mlp.c_proj"),
    }
    return ArchSpec(block_paths=("transformer.h", "h"), projections=p, heads=("score",))


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_like(),
    "qwen2": _llama_like(),
    "mistral": _llama_like(),
    "gpt2": _gpt2(),
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
}


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Teach lor2c_ds a new `config.model_type`."""
    ARCHITECTURES[model_type] = spec


def unsupported_message(model_type, why: str) -> str:
    return (f"model type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)} and the "
            f"transformers models whose structure lor2c_ds can read ({why}; looked for a "
            f"{WHAT_IS_LOOKED_FOR}). Register another with lor2c_ds.registry.register_architecture("
            "model_type, ArchSpec(block_paths=..., projections=...))")


def spec_for(model: nn.Module) -> ArchSpec:
    """The registry entry of the model's type, else what discovery reads off its structure."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    try:
        return discover(model)
    except DiscoveryError as e:
        raise UnsupportedArchitectureError(unsupported_message(model_type, str(e))) from None


def unknown_targets(model_type, spec: ArchSpec, targets, method: str = "LoRA") -> str | None:
    """The error for requested targets the model lacks (None when it has them all)."""
    unknown = [t for t in targets if t not in spec.projections]
    if not unknown:
        return None
    looked = f" (discovery looked for {WHAT_IS_LOOKED_FOR.split('projections: ')[1]})" \
        if spec.extra.get("discovered") else ""
    return (f"unknown {method} target(s) {unknown} for {model_type}; known: {sorted(spec.projections)}"
            f"{looked}")


def find_blocks(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    for path in spec.block_paths:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise UnsupportedArchitectureError(
        f"no block list found at any of {spec.block_paths} in {type(model).__name__}")


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def check_adaptable(model_config, task: str, adapter) -> ArchSpec:
    """Pre-flight, without weights: build `model_config` on the meta device for `task` ("classification"
    or "causal_lm") and check that `adapter` (an AdapterConfig) finds what it needs there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model_type = getattr(model_config, "model_type", None)
    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = cls.from_config(model_config)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for unknown classes
        raise UnsupportedArchitectureError(unsupported_message(
            model_type, f"transformers has no {cls.__name__[4:]} for it: {str(e).splitlines()[0]}")) from None
    spec = spec_for(model)
    if adapter.method in ("lora", "reslora"):
        targets = adapter.targets or list(spec.default_targets)
    else:
        targets = ["q", "v"] if adapter.injections else []
    error = unknown_targets(model_type, spec, targets, "ResLoRA" if adapter.method == "reslora" else "LoRA")
    if error:
        raise UnsupportedArchitectureError(error)
    return spec
