"""Loading an export in one call, and the parity check against the trained model."""
from __future__ import annotations

import gc
import json
import logging
import os
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..adapters import AdapterConfig, apply_adapters
from .safetensors_io import INDEX_NAME, ExportError, _read_tensor

log = logging.getLogger(__name__)

SECTION = "lor2c_export"  # config.json section of an export that still has shortcuts
EXACT_BOUND = 1e-5  # relative logit difference allowed for exact merges in fp32
# Exact merges exported in 16 bits are held to the rounding of that format itself: the export's distance
# to the fp32 trained model may be at most twice the unmerged trained model's own distance when run in
# the export's dtype (its "floor"), plus one unit of roundoff u (bf16 2^-8, fp16 2^-11). Both carry the
# format's rounding, only in other places; a fold into the wrong weight or slice, a lost shortcut or a
# wrong scaling moves the logits by the adapter's whole effect instead.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def auto_class(task: str):
    import transformers

    return transformers.AutoModelForSequenceClassification if task == "classification" \
        else transformers.AutoModelForCausalLM


def model_config(base: Path, task: str, num_labels: int | None):
    """The transformers config training used: num_labels for a head, pad falls back to eos."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    if task == "classification":
        config.num_labels = num_labels
    if getattr(config, "pad_token_id", None) is None and getattr(config, "eos_token_id", None) is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def _remove_module(model: nn.Module, name: str) -> None:
    """Detach an adapter whose delta is already in the weights (and the hooks it put on its parent)."""
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    child = parent._modules.pop(child_name)
    for hooks in (parent._forward_hooks, parent._forward_pre_hooks):
        for k in [k for k, h in hooks.items() if getattr(h, "__self__", None) is child]:
            del hooks[k]
            parent._forward_hooks_with_kwargs.pop(k, None)
            parent._forward_pre_hooks_with_kwargs.pop(k, None)


def _export_config(path: Path):
    """(model class, config, lor2c_export section or None) of an export."""
    import transformers
    from transformers import CONFIG_MAPPING

    raw = json.loads((path / "config.json").read_text())
    cls = getattr(transformers, raw["architectures"][0])
    section = raw.pop(SECTION, None)
    if section is None:
        return cls, None, None
    raw["model_type"] = section["base_model_type"]
    return cls, CONFIG_MAPPING[raw["model_type"]].from_dict(raw), section


def _attach_shortcuts(model: nn.Module, section: dict) -> None:
    """The adapters of an export's section, as trained, less those folded into the weights."""
    apply_adapters(model, AdapterConfig.from_dict(section["adapter_config"]))
    if section.get("layout"):
        from ..adapters import set_layout

        set_layout(model, section["layout"])
    for name in section["removed_modules"]:
        _remove_module(model, name)


def from_pretrained(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Load an export in one call: plain transformers when nothing is left unfolded; otherwise the
    backbone through transformers plus the LoR2C shortcuts from the same shards."""
    import transformers

    path = Path(path)
    cls, config, section = _export_config(path)
    if section is None:
        return cls.from_pretrained(path, **kwargs)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the shortcut keys are expected "unexpected" keys
    try:
        model, info = cls.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    shortcut = set(section["shortcut_tensors"])
    extra = sorted(set(info["unexpected_keys"]) - shortcut)
    if info["missing_keys"] or extra:
        raise ExportError(f"{path} does not match its config: missing {sorted(info['missing_keys'])[:5]}, "
                          f"unexpected {extra[:5]}")
    _attach_shortcuts(model, section)
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    params = dict(model.named_parameters())
    lacking = sorted(set(params) - set(weight_map))
    if lacking:
        raise ExportError(f"{path} lacks tensors {lacking[:5]}")
    with torch.no_grad():
        for key in section["shortcut_tensors"]:
            params[key].copy_(_read_tensor(path / weight_map[key], key).to(params[key].dtype))
    model.requires_grad_(False)
    return model.eval()


def _synthetic_batches(vocab: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(n)]


def parity_batches(base: Path, task: str, vocab: int, n: int, train_cfg) -> tuple[list[dict], str]:
    """`n` held-out batches from the run's data when it is at hand, else deterministic token batches."""
    if train_cfg is not None and Path(train_cfg.data.path).exists() and not train_cfg.data.streaming:
        import dataclasses

        from transformers import AutoTokenizer

        from ..data import model_inputs, prepare_data

        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        data_cfg = dataclasses.replace(train_cfg.data, max_eval_examples=4 * n, test_path=None)
        data = prepare_data(dataclasses.replace(train_cfg, data=data_cfg), tokenizer, all_ranks=False)
        rows = list(data.eval)
        batches = [data.collator([dict(r) for r in rows[i:i + 4]]) for i in range(0, len(rows), 4)]
        return [model_inputs(b) for b in batches], f"held-out split of {train_cfg.data.path}"
    return _synthetic_batches(vocab, n), "synthetic token batches (seed 0)"


@torch.no_grad()
def logits_of(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    model.eval()
    return [model(**b).logits.float() for b in batches]


def compare(ref: list[torch.Tensor], got: list[torch.Tensor], batches: list[dict], task: str) -> tuple[float, float]:
    """(max abs difference, that over the max abs reference logit) over the scored positions."""
    max_abs, scale = 0.0, 0.0
    for r, g, b in zip(ref, got, batches):
        if task == "causal_lm":
            keep = b.get("attention_mask", torch.ones_like(b["input_ids"])).bool()
            r, g = r[keep], g[keep]
        max_abs = max(max_abs, (r - g).abs().max().item())
        scale = max(scale, r.abs().max().item())
    return max_abs, max_abs / max(scale, 1e-30)


def _floor(ref, floor_logits, batches, plan) -> float:
    return compare(ref, floor_logits, batches, plan.task)[1]


def _whole_logits(adapter_dir: Path, base: Path, exported: Path, plan, batches, floor_dtype):
    """The trained model loaded whole in fp32 (then cast for the floor), then the export loaded whole."""
    from ..adapters import load_adapters

    ref_model = auto_class(plan.task).from_pretrained(base, config=model_config(base, plan.task, getattr(
        plan.hf_config, "num_labels", None)), dtype=torch.float32)
    load_adapters(ref_model, adapter_dir)
    ref = logits_of(ref_model, batches)
    floor = _floor(ref, logits_of(ref_model.to(floor_dtype), batches), batches, plan) if floor_dtype else None
    del ref_model
    gc.collect()
    model = from_pretrained(exported, dtype=plan.exported_dtype)
    got = logits_of(model, batches)
    return ref, floor, got, None


def _streamed_logits(adapter_dir: Path, base: Path, exported: Path, plan, batches, floor_dtype, converted):
    """The same three forwards with weights read unit by unit (see streamed.py)."""
    from .streamed import StreamingUnsupported, exported_model, reference_model

    if plan.base_keys is None:
        raise StreamingUnsupported("no mapping of model keys to base checkpoint keys was given")
    config = model_config(base, plan.task, getattr(plan.hf_config, "num_labels", None))
    ref_model = reference_model(adapter_dir, base, lambda: auto_class(plan.task).from_config(
        config, dtype=torch.float32), plan.base_keys, converted)
    ref = ref_model.logits(batches)
    floor = _floor(ref, ref_model.to(floor_dtype).logits(batches), batches, plan) if floor_dtype else None
    stats = ref_model.stats()
    del ref_model
    cls, config, section = _export_config(exported)
    if config is None:
        config = cls.config_class.from_pretrained(exported)
    model = exported_model(exported, plan.exported_dtype, lambda: cls._from_config(config, dtype=plan.exported_dtype),
                           None if section is None else partial(_attach_shortcuts, section=section),
                           section["shortcut_tensors"] if section else [])
    got = model.logits(batches)
    return ref, floor, got, {k: max(v, stats[k]) for k, v in model.stats().items()}


def parity(adapter_dir: Path, base: Path, exported: Path, plan, train_cfg, n: int,
           exported_dtype: torch.dtype, converted=None, base_keys: dict | None = None,
           mode: str = "streamed") -> dict | None:
    """The trained model (base + adapters, as training computed it) against the export, one at a time.

    mode "streamed" (default) never holds a whole model: weights are read one unit (block, embedding,
    head) at a time (streamed.py); where that cannot run, it says so in the log and loads whole models
    ("whole", also selectable). `converted`: the merge's ConvertedTensors (base tensors stored converted);
    `base_keys`: model key -> base checkpoint key (the merge's mapping)."""
    if n <= 0:
        return None
    from types import SimpleNamespace

    from .streamed import StreamingUnsupported

    batches, source = parity_batches(base, plan.task, plan.hf_config.vocab_size, n, train_cfg)
    floor_dtype = exported_dtype if exported_dtype in UNIT_ROUNDOFF else None
    view = SimpleNamespace(task=plan.task, hf_config=plan.hf_config, exported_dtype=exported_dtype,
                           base_keys=base_keys)
    used, fallback = mode, None
    if mode == "streamed":
        try:
            ref, floor, got, streamed = _streamed_logits(adapter_dir, base, exported, view, batches,
                                                          floor_dtype, converted)
        except StreamingUnsupported as e:
            log.warning("parity: the streamed forward cannot run (%s); loading whole models instead", e)
            used, fallback = "whole", str(e)
    if used == "whole":
        ref, floor, got, streamed = _whole_logits(adapter_dir, base, exported, view, batches, floor_dtype)
    max_abs, rel = compare(ref, got, batches, plan.task)
    bound = None
    if plan.exact:
        bound = EXACT_BOUND if floor is None else 2 * floor + UNIT_ROUNDOFF[exported_dtype]
    result = {"batches": len(batches), "source": source, "max_abs_diff": max_abs, "max_rel_diff": rel,
              "dtype_floor_rel_diff": floor, "bound": bound, "passed": None if bound is None else rel <= bound,
              "what": "exact merge" if plan.exact else "approximate merge (its error, reported)",
              "parity_mode": used, **(streamed or {})}
    if fallback:
        result["parity_fallback"] = fallback
    log.info("parity (%s): max abs logit difference %.3g, relative %.3g (%s)", used, max_abs, rel, source)
    return result
