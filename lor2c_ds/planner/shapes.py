"""Model shapes: the model built from its config on the meta device with the method's adapters, its
parameters counted exactly, and the module calls of one forward (the trace ZeRO-3 follows)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .inputs import DECODER_FAMILIES, ENCODER_FAMILIES, PlanError, Workload


@dataclass
class Module:
    """One call of a module in a forward, in call order (containers and adapters too: under ZeRO-3 each
    call is a step of DeepSpeed's trace, and each step prefetches)."""

    name: str
    role: str  # "pre" (embeddings), "block" or "post" (final norm, LM head, pooler)
    block: int | None  # index in the block list; None outside it
    frozen: list[tuple[int, int]]  # (parameter id, numel) of its own frozen parameters (shared ones too)
    linear: int = 0  # weight elements when it is a Linear / Conv1D (forward flops 2 per element and token)
    trainable: bool = False  # has trainable parameters of its own (an adapter, the head)
    start: int = 0  # forward event index of the call
    end: int = 0  # forward event index of its return
    grad: bool = False  # its output needs a gradient: it runs (and fetches) in backward


@dataclass
class ModelFacts:
    """What the planner needs from the built model."""

    model_type: str
    family: str  # "decoder" or "encoder"
    task: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    head_dim: int
    vocab: int
    tied: bool
    attention_dropout: float
    hidden_dropout: float
    backbone_numels: list[int]
    trainable_numels: list[int]
    modules: list[Module]
    first_grad_block: int
    adapters: list[dict]  # per active adapter module: kind, block, d_in, r, dropout (+ ResLoRA variant, pre_num)

    @property
    def backbone_params(self) -> int:
        return sum(self.backbone_numels)

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable_numels)


def load_facts(config: dict, work: Workload) -> ModelFacts:
    """Build `config` on the meta device, attach the adapters of `work`, and read everything off it."""
    import torch
    from torch import nn
    from transformers import (
        CONFIG_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ..adapters import LoR2CAdapter, LoRA, ResLoRA, apply_adapters
    from ..registry import find_blocks, projection_dims, spec_for

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise PlanError(f"model_type {model_type!r} is not supported: transformers has no such model type")
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "auto_map"):
        config.pop(key, None)
    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for bad values
        raise PlanError(f"model config is not a valid {model_type} config: {e}") from None
    encoder = model_type in ENCODER_FAMILIES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    task = work.task or ("classification" if encoder else "causal_lm")
    if task == "classification":
        cfg.num_labels = work.num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
    adapter = work.adapter_config()
    try:
        with torch.device("meta"):
            model = (AutoModelForSequenceClassification if task == "classification"
                     else AutoModelForCausalLM).from_config(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the model class rejects in the config
        raise PlanError(f"cannot build a {model_type} model for task {task} from this config: {e}") from None
    try:
        apply_adapters(model, adapter)
    except ValueError as e:
        raise PlanError(f"adapter: {e}") from None

    blocks = find_blocks(model, spec_for(model))
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    backbone: dict[int, int] = {}
    modules = []
    for name, start, end in _calls(model):
        module = model.get_submodule(name)
        own = [p for p in module._parameters.values() if p is not None]
        frozen = [(id(p), p.numel()) for p in own if not p.requires_grad]
        backbone.update(frozen)
        linear = 0
        if frozen and (isinstance(module, nn.Linear) or (hasattr(module, "nx") and hasattr(module, "nf"))):
            linear = math.prod(projection_dims(module))
        modules.append(Module(name, "pre", block_of.get(id(module)), frozen, linear,
                              any(p.requires_grad for p in own), start, end))
    blocks_end = max((m.end for m in modules if m.block is not None), default=-1)
    for m in modules:
        m.role = "block" if m.block is not None else ("post" if m.start > blocks_end else "pre")
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]

    adapters, first_grad = [], len(blocks)
    for name, m in model.named_modules():
        if not getattr(m, "active", True):
            continue
        if isinstance(m, LoR2CAdapter):
            adapters.append({"kind": "lor2c", "block": m.start, "d_in": int(cfg.hidden_size),
                             "r": m.lora_B.in_features, "dropout": float(adapter.dropout)})
            first_grad = min(first_grad, m.end + 1)
        elif isinstance(m, (LoRA, ResLoRA)):
            block = block_of.get(id(m))
            adapters.append({"kind": "reslora" if isinstance(m, ResLoRA) else "lora", "block": block,
                             "d_in": m.lora_A.in_features, "d_out": m.lora_B.out_features, "r": m.r,
                             "dropout": float(adapter.dropout),
                             "variant": adapter.reslora_variant, "pre_num": adapter.pre_num})
            first_grad = min(first_grad, block if block is not None else len(blocks))
    # what runs in backward: adapters, blocks from the first gradient-carrying one, and whatever returns
    # after that block starts (enclosing containers, final norm, LM head, pooler)
    first_start = min((m.start for m in modules if m.block is not None and m.block >= first_grad),
                      default=blocks_end)
    for m in modules:
        m.grad = m.trainable or (m.block >= first_grad if m.block is not None else m.end > first_start)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
    return ModelFacts(
        model_type=model_type, family="encoder" if model_type not in DECODER_FAMILIES else "decoder", task=task,
        hidden=int(cfg.hidden_size), intermediate=int(intermediate), layers=len(blocks), heads=heads,
        kv_dim=kv_heads * head_dim, head_dim=head_dim, vocab=int(cfg.vocab_size),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(cfg, "attention_probs_dropout_prob", None)
                                or getattr(cfg, "attention_dropout", None) or getattr(cfg, "attn_pdrop", 0.0) or 0.0),
        hidden_dropout=float(getattr(cfg, "hidden_dropout_prob", None) or getattr(cfg, "resid_pdrop", 0.0) or 0.0),
        backbone_numels=list(backbone.values()), trainable_numels=trainable, modules=modules,
        first_grad_block=first_grad, adapters=adapters)


def _calls(model) -> list[tuple[str, int, int]]:
    """(name, start, end) of every module call of one forward, in call order: a meta-device forward
    with hooks (ZeRO-3's trace follows it). Registration order when the meta forward fails."""
    import torch

    starts: list[tuple[str, int]] = []
    ends: dict[str, list[int]] = {}
    clock = iter(range(1 << 30))
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: starts.append((name, next(clock)))))
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: ends.setdefault(name, []).append(
            next(clock))))
    try:
        with torch.no_grad():
            ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        calls = [(name, start, ends[name].pop(0)) for name, start in starts]
    except Exception:  # noqa: BLE001 - any failure: fall back to the registration order
        calls = [(name, i, i) for i, (name, _) in enumerate(model.named_modules())]
    finally:
        for h in hooks:
            h.remove()
    return calls

