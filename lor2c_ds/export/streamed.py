"""The parity check's models in bounded host memory: weights streamed from safetensors, one unit at a time.

Design (issue #16 item 2: peak host memory of lor2c-export bounded by its largest tensor plus one block):

- Each model is built with its parameters on the meta device and its buffers real (`parameters_on_meta`
  patches `nn.Module.register_parameter` while the model is constructed, so rotary `inv_freq` and the like
  are computed as usual). Neither accelerate (not a dependency) nor transformers 5's own loading is needed.
- Adapters are small and stay resident: attached to the skeleton as `load_adapters` attaches them, then
  their tensors (and a trained task head) are assigned. LoR2C shortcuts of an export likewise.
- Base tensors the checkpoint stores converted (MoE experts one per key, fused by transformers) are read
  like the others, per unit: converted.py builds each from the base's files when its unit runs.
- Every other parameter belongs to a unit: a block of the block list, or a subtree hanging off a module on
  the path from the root to the block list (embeddings, final norm, head, pooler...). A forward pre-hook
  on the unit's root reads the unit's tensors (`read_tensor`, cast to the parameter's dtype) and a forward
  hook puts the meta parameters back. Tied parameters are slots of their own (the head reads the
  embedding again); a parameter registered directly on an ancestor is resident for the pass.
- A unit whose parameters are used without its forward being called (DeBERTa's `rel_embeddings`) makes
  the pass fail; those units are then kept resident and the pass runs once more. Anything else that the
  streamed forward cannot do raises `StreamingUnsupported`, and `parity` falls back to whole models
  (logged, `parity_mode: "whole"` in the report).
- Batches of the same shape are concatenated and run once, so each pass reads every weight once per
  distinct batch shape (synthetic batches: once). On CPU the per-row results equal those of separate
  batches bit for bit (checked for fp32 and bf16); the test compares against whole-model parity.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import re
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .safetensors_io import _FROM_ST, INDEX_NAME, ExportError, _base_tensors, _header, _read_tensor

log = logging.getLogger(__name__)


class StreamingUnsupported(ExportError):
    """The streamed forward cannot run this model; the caller falls back to whole models."""


@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside land on meta (no memory); buffers are created and computed normally."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _keep_fp32(model: nn.Module, dtype: torch.dtype) -> None:
    """What from_pretrained does for `_keep_in_fp32_modules(_strict)` in 16-bit dtypes (DeepSeek's router)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if not keep or dtype == torch.float32:
        return
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(k) for k in keep) + r")($|\.)")
    for name, p in model.named_parameters():
        if pattern.search(name) and p.is_floating_point():
            p.data = p.data.float()


_ANON_MIN = 1 << 20  # tensors from this size get pages of their own, returned to the system when freed


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A tensor in an anonymous mapping when large: malloc's heap would keep freed weights resident."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ANON_MIN:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).reshape(shape)


def read_tensor(file: Path, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`_read_tensor`, into `_empty` memory, cast to `dtype` (a second buffer only when it differs)."""
    start, header = _header(str(file))
    entry = header[key]
    begin, end = entry["data_offsets"]
    stored, shape = _FROM_ST[entry["dtype"]], tuple(entry["shape"])
    raw = _empty((end - begin,), torch.uint8)
    with open(file, "rb") as f:
        f.seek(start + begin)
        if f.readinto(memoryview(raw.numpy())) != end - begin:
            raise ExportError(f"{file} is truncated (tensor {key})")
    t = raw.view(stored).reshape(shape)
    if dtype is None or dtype == stored or not t.is_floating_point():
        return t
    out = _empty(shape, dtype)
    out.copy_(t)
    return out


class _Unit:
    def __init__(self, name: str):
        self.name, self.slots, self.depth, self.fired, self.resident, self.live = name, [], 0, False, False, 0

    def nbytes(self) -> int:
        return sum(meta.numel() * meta.element_size() for _, _, _, meta in self.slots)


class StreamedModel:
    """A model on meta whose units read their weights from `sources` (key -> reader(dtype)) while they run."""

    def __init__(self, model: nn.Module, sources: dict[str, Callable], backbone: set[str]):
        from ..registry import find_blocks, spec_for

        self.model, self.sources = model.eval(), sources
        if getattr(model.config, "use_cache", None):
            model.config.use_cache = False  # no KV cache for one forward: same logits, less memory
        self.live_bytes = self.peak_bytes = self.read_bytes = self.largest_unit_bytes = self.resident_bytes = 0
        try:
            blocks = find_blocks(model, spec_for(model))
        except Exception as e:  # noqa: BLE001 - any registry/discovery failure means: no block list
            raise StreamingUnsupported(f"no block list in {type(model).__name__}: {e}") from None
        names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        block_path = names[blocks]
        ancestors = {""} | {".".join(block_path.split(".")[:i]) for i in range(1, len(block_path.split(".")) + 1)}
        aliases: dict[int, list[str]] = {}
        for key, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(key)
        self.units: dict[str, _Unit] = {}
        for mname, module in model.named_modules(remove_duplicate=False):
            for pname, p in module._parameters.items():
                key = f"{mname}.{pname}" if mname else pname
                if p is None or not p.is_meta:
                    continue
                if key not in backbone:
                    raise StreamingUnsupported(f"{key} is on meta and has no value (not a backbone weight)")
                source = next((k for k in [key, *aliases[id(p)]] if k in sources), None)
                if source is None:
                    raise ExportError(f"no weight for {key} (nor a tied alias) in the checkpoint")
                self._unit_of(mname, block_path, ancestors).slots.append((module, pname, source, p))
        for unit_name, unit in self.units.items():
            if unit.resident:
                continue
            root = model.get_submodule(unit_name)
            root.register_forward_pre_hook(partial(self._enter, unit), prepend=True)
            root.register_forward_hook(partial(self._leave, unit), always_call=True)
        self._load_buffers(sources, backbone)

    def _unit_of(self, mname: str, block_path: str, ancestors: set[str]) -> _Unit:
        parts = mname.split(".") if mname else []
        if mname.startswith(block_path + ".") and len(parts) > len(block_path.split(".")):
            name = ".".join(parts[:len(block_path.split(".")) + 1])  # the block
        elif mname in ancestors:
            name = f"{mname} (direct)"  # parameters on a module that holds the blocks: resident
        else:
            name = next(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) not in ancestors)
        unit = self.units.setdefault(name, _Unit(name))
        unit.resident |= name.endswith(" (direct)")
        return unit

    def _load_buffers(self, sources: dict, backbone: set[str]) -> None:
        """Persistent buffers stored in the checkpoint (from_pretrained loads them too); they are small."""
        for key, buf in self.model.named_buffers():
            if key in backbone and key in sources and buf is not None:
                with torch.no_grad():
                    buf.copy_(sources[key](buf.dtype))

    def stats(self) -> dict[str, int]:
        """Bytes of weights real at once at most, of the largest streamed unit, of the resident ones."""
        return {"peak_weight_bytes": self.peak_bytes, "largest_unit_bytes": self.largest_unit_bytes,
                "resident_weight_bytes": self.resident_bytes}

    def _materialise(self, unit: _Unit) -> None:
        read: dict[tuple, torch.Tensor] = {}
        for module, pname, source, meta in unit.slots:
            t = read.get((source, meta.dtype))
            if t is None:
                t = read[(source, meta.dtype)] = self.sources[source](meta.dtype)
                self.read_bytes += t.numel() * t.element_size()
            if tuple(t.shape) != tuple(meta.shape):
                raise ExportError(f"{source}: stored shape {tuple(t.shape)}, the model wants {tuple(meta.shape)}")
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
        unit.live = sum(t.numel() * t.element_size() for t in read.values())
        self.live_bytes += unit.live
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, unit: _Unit) -> None:
        for module, pname, _, meta in unit.slots:
            module._parameters[pname] = meta
        self.live_bytes -= unit.live
        unit.live = 0

    def _enter(self, unit: _Unit, module, args) -> None:
        unit.fired = True
        if unit.resident:
            return
        if unit.depth == 0:
            self._materialise(unit)
        unit.depth += 1

    def _leave(self, unit: _Unit, module, args, output) -> None:
        if unit.resident:
            return
        unit.depth -= 1
        if unit.depth == 0:
            self._release(unit)

    def _pass(self, batches: list[dict]) -> list[torch.Tensor]:
        resident = [u for u in self.units.values() if u.resident]
        self.resident_bytes = max(self.resident_bytes, sum(u.nbytes() for u in resident))
        self.largest_unit_bytes = max([self.largest_unit_bytes] + [u.nbytes() for u in self.units.values()
                                                                   if not u.resident])
        for u in self.units.values():
            u.fired, u.depth = False, 0
        try:
            for u in resident:
                self._materialise(u)
            logits = [None] * len(batches)
            with torch.no_grad():
                for rows, batch in _groups(batches):
                    out = self.model(**batch).logits.float()
                    if out.is_meta:
                        raise RuntimeError("the logits came out on meta")
                    for i, part in zip(rows, out.split([batches[i]["input_ids"].shape[0] for i in rows])):
                        logits[i] = part
            return logits
        finally:
            for u in self.units.values():
                if u.live:
                    self._release(u)
                u.depth = 0

    def logits(self, batches: list[dict]) -> list[torch.Tensor]:
        """fp32 logits of every batch; a unit used without its forward (never hooked) is made resident once."""
        try:
            return self._pass(batches)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as first:
            orphans = [u for u in self.units.values() if u.slots and not u.resident and not u.fired]
            if not orphans:
                raise StreamingUnsupported(f"streamed forward of {type(self.model).__name__} failed: "
                                           f"{first}") from first
            log.info("parity: %s used without their forward; kept resident", [u.name for u in orphans])
            for u in orphans:
                u.resident = True
            try:
                return self._pass(batches)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as second:
                raise StreamingUnsupported(f"streamed forward of {type(self.model).__name__} failed: "
                                           f"{second}") from second

    def to(self, dtype: torch.dtype) -> "StreamedModel":
        """The same model in `dtype` (as `model.to(dtype)`): meta parameters, buffers and adapters."""
        self.model.to(dtype)
        return self


def _groups(batches: list[dict]):
    """(indices, one concatenated batch) per distinct set of keys, tensor shapes (but rows) and dtypes,
    and other arguments' values (`use_cache=False` of packed rows), which pass through as they are."""
    groups: dict[tuple, list[int]] = {}
    for i, b in enumerate(batches):
        sig = tuple((k, tuple(v.shape[1:]), v.dtype) if torch.is_tensor(v) else (k, repr(v))
                    for k, v in sorted(b.items()))
        groups.setdefault(sig, []).append(i)
    for rows in groups.values():
        first = batches[rows[0]]
        yield rows, {k: torch.cat([batches[i][k] for i in rows]) if torch.is_tensor(v) else v
                     for k, v in first.items()}


def _file_sources(files: dict[str, tuple[Path, str]]) -> dict[str, Callable]:
    return {k: partial(read_tensor, path, stored) for k, (path, stored) in files.items()}


def _assign(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make the given parameters real, in the dtype the model has for them (as load_adapters copies them)."""
    params = dict(model.named_parameters())
    cast = {k: v.to(params[k].dtype) if k in params and v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(cast, strict=False, assign=True)


def _check_adapters_real(model: nn.Module, backbone: set[str], where: Path) -> None:
    unloaded = [k for k, p in model.named_parameters() if p.is_meta and k not in backbone]
    if unloaded:
        raise ExportError(f"no saved value for {unloaded[:4]} in {where}")


def reference_model(adapter_dir: Path, base: Path, build: Callable[[], nn.Module], base_keys: dict[str, str],
                    converted=None, dtype: torch.dtype = torch.float32) -> StreamedModel:
    """The trained model (base weights + adapters) as `load_adapters` builds it, streamed from `base`.
    build(): the model from its config; base_keys: model key -> base checkpoint key; converted: the
    merge's ConvertedTensors (converted.py), read per unit like the base's own tensors."""
    from safetensors.torch import load_file

    from ..adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, apply_adapters, set_layout

    _header.cache_clear()
    with parameters_on_meta():
        model = build()
    _keep_fp32(model, dtype)
    backbone = set(model.state_dict())
    raw = json.loads((adapter_dir / CONFIG_NAME).read_text())
    layout = raw.pop("layout", None)
    apply_adapters(model, AdapterConfig.from_dict(raw))
    if layout:
        set_layout(model, layout)
    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if expected != set(state):
        raise ExportError(f"adapter weights in {adapter_dir} do not match the model: missing "
                          f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    _assign(model, state)
    model.requires_grad_(False)
    _check_adapters_real(model, backbone, adapter_dir)
    files = {k: path for k, (path, _, _) in _base_tensors(base).items()}
    sources = _file_sources({k: (files[src], src) for k, src in base_keys.items() if k not in state and src in files})
    for k in converted.keys() if converted is not None else ():  # stored converted (fused MoE experts)
        sources.setdefault(k, partial(converted.read, k))
    return StreamedModel(model, sources, backbone - set(state))


def exported_model(path: Path, dtype: torch.dtype, build: Callable[[], nn.Module],
                   attach: Callable[[nn.Module], None] | None, shortcut_keys: list[str]) -> StreamedModel:
    """The export as `from_pretrained(path, dtype=dtype)` builds it, streamed from its shards.
    attach(model): puts the LoR2C shortcut modules on (None: a plain transformers export)."""
    _header.cache_clear()
    with parameters_on_meta():
        model = build()
    _keep_fp32(model, dtype)
    backbone = set(model.state_dict())
    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    if attach is not None:
        attach(model)
        _assign(model, {k: _read_tensor(path / weight_map[k], k) for k in shortcut_keys})
        _check_adapters_real(model, backbone, path)
    model.requires_grad_(False)
    stray = sorted(set(weight_map) - backbone - set(shortcut_keys))
    if stray:
        raise ExportError(f"{path} holds tensors its model does not have: {stray[:5]}")
    sources = _file_sources({k: (path / f, k) for k, f in weight_map.items() if k in backbone})
    return StreamedModel(model, sources, backbone)
