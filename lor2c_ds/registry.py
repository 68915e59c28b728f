"""Where each supported architecture keeps its block stack, projections and task head.

LoR2C needs the list of transformer blocks; LoRA (and ResLoRA, and InjectLoR2C) need the attention
and MLP projections inside a block. Adding a family is one `register_architecture` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass(frozen=True)
class Projection:
    """A projection inside a block: its dotted path, and for fused projections (GPT-2's c_attn)
    which of `chunks` equal output slices the target is."""

    path: str
    chunk: int = 0
    chunks: int = 1


@dataclass(frozen=True)
class ArchSpec:
    block_paths: tuple[str, ...]  # candidate dotted paths of the block ModuleList, first match wins
    projections: dict[str, Projection]  # short target name -> projection inside one block
    heads: tuple[str, ...] = ()  # task-head modules trained with the adapters (classification)
    default_targets: tuple[str, ...] = ("q", "v")
    extra: dict = field(default_factory=dict)


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


def spec_for(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(ARCHITECTURES))}. Register another with "
            "lor2c_ds.registry.register_architecture(model_type, ArchSpec(block_paths=..., projections=...))"
        )
    return ARCHITECTURES[model_type]


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


def projection_dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D, without reading the weight
    (it may be a partitioned placeholder)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers.pytorch_utils.Conv1D
        return module.nx, module.nf
    raise UnsupportedArchitectureError(f"cannot adapt {type(module).__name__}: not a Linear or Conv1D")


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)
