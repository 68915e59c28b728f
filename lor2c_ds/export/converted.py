"""Base tensors the checkpoint stores under other names or layouts, built one at a time from its files.

MoE checkpoints (Qwen3-MoE, Mixtral...) store every expert under its own keys; transformers 5 fuses them
when it loads (`...mlp.experts.gate_up_proj`). Here transformers' own conversion mapping does the same,
one model tensor at a time: `get_model_conversion_mapping` gives the WeightRenaming / WeightConverter
list of the model, `rename_source_key` says which model key each checkpoint key feeds, and a copy of the
converter (MergeModulelist, Concatenate...) is fed those keys' tensors straight from the safetensors files
when the tensor is asked for. Nothing is kept between reads.

Every conversion is first run on meta tensors: that gives the shapes and dtypes the shard headers need
and shows that the operations run without data. Where that fails (or an older transformers has no such
mapping), the base is loaded whole through from_pretrained as before, with a warning; `report()` says so.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .load import auto_class
from .safetensors_io import ExportError
from .streamed import read_tensor

log = logging.getLogger(__name__)


class LazyUnsupported(ExportError):
    """The conversion cannot be run one tensor at a time; the caller loads the base whole."""


@dataclass
class _Group:
    target: str  # the model key transformers names the conversion by (its first target)
    converter: object | None  # a WeightConverter; None for a plain rename of one checkpoint key
    sources: list[tuple[str, str]]  # (source pattern, checkpoint key), in transformers' key order


class ConvertedTensors:
    """model key -> that tensor of the base, for keys the checkpoint stores converted."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], build: Callable[[str], torch.Tensor],
                 mode: str, fallback: str | None = None):
        self.specs, self._build, self.mode, self.fallback = specs, build, mode, fallback

    def __contains__(self, key: str) -> bool:
        return key in self.specs

    def keys(self):
        return self.specs.keys()

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (the caller may fold into it), cast to `dtype` when given and floating."""
        t = self._build(key)
        if tuple(t.shape) != self.specs[key][1]:
            raise ExportError(f"{key}: converted to shape {tuple(t.shape)}, planned {self.specs[key][1]}")
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def report(self) -> dict:
        out = {"count": len(self.specs), "mode": self.mode}
        if self.fallback:
            out["fallback"] = self.fallback
        return out


def _run(group: _Group, load: Callable[[str], torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The model tensors one group converts to, from its checkpoint tensors given by `load`."""
    if group.converter is None:
        return {group.target: load(group.sources[0][1])}
    converter = copy.deepcopy(group.converter)  # transformers also converts with a fresh copy per target
    for pattern, key in group.sources:
        converter.add_tensor(group.target, key, pattern, partial(load, key))
    out = converter.convert(group.target, model=None, config=config)  # an op needing the model fails on meta
    return {k: v[0] if isinstance(v, list) else v for k, v in out.items()}


def _groups(model, stored: dict, backbone: list[str], keys: set[str]) -> list[_Group]:
    """The conversions from_pretrained would apply to this checkpoint that may give one of `keys`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key
    except ImportError as e:
        raise LazyUnsupported(f"this transformers has no conversion mapping ({e})") from None
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    model_keys = dict.fromkeys(backbone, True)  # rename_source_key only asks whether a key is there
    prefix = model.base_model_prefix
    groups: dict[str, _Group] = {}
    for key in sorted(stored, key=dot_natural_key):  # the order transformers feeds experts in
        target, pattern = rename_source_key(key, renamings, converters, prefix, model_keys)
        if target not in model_keys and key in model_keys:
            target, pattern = key, None  # stored under the model's own name
        if target not in model_keys or (pattern is None and target == key):
            continue
        group = groups.setdefault(target, _Group(target, by_pattern.get(pattern), []))
        group.sources.append((pattern, key))
    # a one-to-many converter (Chunk) may give a key of `keys` under a target other than its first
    relevant = [g for g in groups.values() if g.target in keys or (
        g.converter is not None and len(g.converter.target_patterns) > 1)]
    for g in relevant:
        if g.converter is None and len(g.sources) > 1:
            raise LazyUnsupported(f"{g.target} is renamed from several checkpoint keys")
    return relevant


def lazy_converted(model, stored: dict, backbone: list[str], keys: list[str]) -> ConvertedTensors:
    """`keys` built one at a time from the checkpoint `stored` (key -> (file, dtype, shape)); `model`:
    the model on meta. Raises LazyUnsupported where that cannot be done."""
    def on_meta(key: str) -> torch.Tensor:
        return torch.empty(stored[key][2], dtype=stored[key][1], device="meta")

    meta_state = model.state_dict()
    producer: dict[str, _Group] = {}
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    wanted = set(keys)
    for group in _groups(model, stored, backbone, wanted):
        try:
            out = _run(group, on_meta, model.config)
        except Exception as e:  # noqa: BLE001 - any failure of transformers' ops on meta: load whole
            raise LazyUnsupported(f"converting {group.target} on meta failed: {type(e).__name__}: {e}") from None
        for k, t in out.items():
            if k in wanted:
                if tuple(t.shape) != tuple(meta_state[k].shape):
                    raise LazyUnsupported(f"{k} converts to shape {tuple(t.shape)}, the model has "
                                          f"{tuple(meta_state[k].shape)}")
                producer[k], specs[k] = group, (t.dtype, tuple(t.shape))
    lacking = [k for k in keys if k not in specs]
    if lacking:
        raise LazyUnsupported(f"no conversion of the checkpoint gives {lacking[:4]}")
    config = model.config

    def build(key: str) -> torch.Tensor:
        group = producer[key]
        return _run(group, lambda k: read_tensor(stored[k][0], k), config)[key]

    return ConvertedTensors({k: specs[k] for k in keys}, build, "lazy")


def whole_model_tensors(base: Path, plan, keys: list[str], reason: str | None = None) -> ConvertedTensors:
    """`keys` taken from the base loaded whole through transformers (all held in memory)."""
    model, info = auto_class(plan.task).from_pretrained(base, config=plan.hf_config, output_loading_info=True)
    state, missing = model.state_dict(), set(info["missing_keys"])
    held = {k: state[k].detach().clone() for k in keys if k in state and k not in missing}
    del model, state
    return ConvertedTensors({k: (t.dtype, tuple(t.shape)) for k, t in held.items()}, lambda k: held[k].clone(),
                            "whole", reason)


def converted_tensors(base: Path, plan, keys: list[str], stored: dict) -> ConvertedTensors:
    """`keys` of the model that the base checkpoint stores converted: lazily where transformers' conversion
    allows, else (logged) from the base loaded whole."""
    log.info("%d tensors are stored converted in %s (e.g. %s)", len(keys), base, keys[0])
    try:
        return lazy_converted(plan.model, stored, plan.backbone, keys)
    except LazyUnsupported as e:
        log.warning("the converted tensors of %s cannot be built one at a time (%s); loading it whole through "
                    "transformers", base, e)
        return whole_model_tensors(base, plan, keys, str(e))
