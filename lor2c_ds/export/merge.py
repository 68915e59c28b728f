"""The merge: the adapted model on meta, what folds where, the streamed shards, the atomic rename."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, apply_adapters
from ..adapters.config import ConfigError
from ..config import model_kind
from ..registry import UnsupportedArchitectureError
from .converted import converted_tensors
from .load import SECTION, auto_class, model_config, parity
from .portable import write_portable
from .safetensors_io import INDEX_NAME, ExportError, _base_tensors, _parse_size, _read_tensor, _write_shard

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
REPORT_NAME = "export_report.json"
ADAPTER_SUBDIR = "adapter"  # lor2c_ds adapter files (every method)
PEFT_SUBDIR = "peft"  # PEFT LoRA adapter (LoRA-only runs)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The directory holding the adapter files: a checkpoint tag, an `adapter/` dir, or a run's
    output directory (its newest complete checkpoint, else its `adapter/`)."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"checkpoint directory {path} does not exist")
    if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        if path.parent.name == "checkpoints" and not (path / "run_state.json").is_file():
            raise ExportError(f"checkpoint {path} is partial (no run_state.json): it was never completed")
        return path
    root = path / "checkpoints"
    if root.is_dir():
        latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
        tags = sorted((p for p in root.iterdir() if (p / "run_state.json").is_file()),
                      key=lambda p: int(m.group(1)) if (m := re.fullmatch(r"step_(\d+)", p.name)) else -1)
        chosen = root / latest if latest and (root / latest / "run_state.json").is_file() else (
            tags[-1] if tags else None)
        if chosen is not None and (chosen / WEIGHTS_NAME).is_file():
            return chosen
    if (path / ADAPTER_SUBDIR / WEIGHTS_NAME).is_file():
        return path / ADAPTER_SUBDIR
    raise ExportError(f"{path} holds no {CONFIG_NAME} + {WEIGHTS_NAME} (nor a complete checkpoint of a run)")


def find_train_config(adapter_dir: Path):
    """The run's `train_config.json` next to the checkpoint (the recipe), or None."""
    from ..config import load_config

    for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent):
        if (d / "train_config.json").is_file():
            try:
                return load_config(d / "train_config.json")  # JSON is YAML
            except ConfigError as e:
                log.warning("ignoring %s: %s", d / "train_config.json", e)
                return None
    return None



@dataclass
class Plan:
    model: nn.Module  # adapted, on meta, with the adapter tensors loaded (real)
    hf_config: object
    task: str
    adapter_config: AdapterConfig
    adapter_state: dict[str, torch.Tensor]
    backbone: list[str]  # persistent backbone keys, state_dict order
    folds: dict[str, list[nn.Module]] = field(default_factory=dict)  # backbone weight -> adapters
    folded_modules: list[str] = field(default_factory=list)
    shortcut_keys: list[str] = field(default_factory=list)
    inactive_modules: list[str] = field(default_factory=list)
    exact: bool = True
    layout: dict | None = None


SIDE_FILES = ("reslora_stats.json",)  # non-tensor adapter state some methods keep beside the weights


def _load_side_state(model: nn.Module, adapter_dir: Path) -> None:
    """Statistics an approximate merge rule needs (ResLoRA is/ms): beside the adapter, or in a
    checkpoint's run_state.json (the callback's window)."""
    has_window = (adapter_dir / "run_state.json").is_file() and "reslora" in json.loads(
        (adapter_dir / "run_state.json").read_text()).get("callbacks", {})
    if (adapter_dir / "reslora_stats.json").is_file() or has_window:
        from ..reslora_training import load_reslora_stats

        load_reslora_stats(model, adapter_dir)


def _task_of(adapter_state: dict, train_cfg, heads: tuple[str, ...]) -> tuple[str, int | None]:
    if train_cfg is not None:
        kind = model_kind(train_cfg.task)
        return kind, train_cfg.num_labels if kind == "classification" else None
    for head in heads:
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):  # RoBERTa's head is dense + out_proj
            if key in adapter_state:
                return "classification", adapter_state[key].shape[0]
    return "causal_lm", None


def _describe_head(hf_config, adapter_dir: Path, train_cfg) -> None:
    """The exported config names the labels training used (id2label) and marks a regression head."""
    names = None
    if (adapter_dir / "label_map.json").is_file():
        names = json.loads((adapter_dir / "label_map.json").read_text())
    elif (adapter_dir / "run_state.json").is_file():
        names = json.loads((adapter_dir / "run_state.json").read_text()).get("label_names")
    if names:
        hf_config.id2label = dict(enumerate(names))
        hf_config.label2id = {name: i for i, name in enumerate(names)}
    if train_cfg is not None and train_cfg.task == "regression":
        hf_config.problem_type = "regression"


def _is_projection(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter) and (
        isinstance(module, nn.Linear) or (hasattr(module, "nx") and hasattr(module, "nf")))


def build_plan(adapter_dir: Path, base: Path, train_cfg=None) -> Plan:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from ..registry import ARCHITECTURES, spec_for

    raw = json.loads((adapter_dir / CONFIG_NAME).read_text())
    layout = raw.pop("layout", None)  # a topology changed during training (Merge/Inject)
    adapter_config = AdapterConfig.from_dict(raw)
    state = {k: v.float() if v.is_floating_point() else v
             for k, v in load_file(str(adapter_dir / WEIGHTS_NAME)).items()}
    spec = ARCHITECTURES.get(AutoConfig.from_pretrained(base).model_type)
    heads = spec.heads if spec else ("classifier", "score")
    task, num_labels = _task_of(state, train_cfg, heads)
    hf_config = model_config(base, task, num_labels)
    _describe_head(hf_config, adapter_dir, train_cfg)
    with torch.device("meta"):
        model = auto_class(task).from_config(hf_config)
        spec_for(model)  # unsupported architecture: a clear error before anything else
        backbone = list(model.state_dict().keys())
        apply_adapters(model, adapter_config)
        if layout:
            from ..adapters import set_layout

            set_layout(model, layout)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise ExportError(f"adapter weights in {adapter_dir} do not match its {CONFIG_NAME}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)  # only the adapter tensors become real
    _load_side_state(model, adapter_dir)
    plan = Plan(model, hf_config, task, adapter_config, state, backbone, layout=layout)
    taken: set[str] = set()
    backbone_set = set(backbone)
    for name, module in model.named_modules():
        if not callable(getattr(module, "delta_weight", None)):
            continue
        if getattr(module, "active", True) is False:  # allocated, never switched on: nothing to fold
            plan.inactive_modules.append(name)
            taken |= {f"{name}.{k}" for k in module.state_dict()}
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        target = f"{parent_name}.weight"
        if not (_is_projection(parent) and target in backbone_set):
            raise ExportError(f"adapter {name} has delta_weight() but is not attached under a projection")
        unloaded = [k for k, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if unloaded:
            raise ExportError(f"adapter {name} has no saved value for {unloaded[:4]} in {adapter_dir}")
        plan.folds.setdefault(target, []).append(module)
        plan.folded_modules.append(name)
        plan.exact &= bool(getattr(module, "exact_merge", getattr(module, "merge_rule", "exact") == "exact"))
        taken |= {f"{name}.{k}" for k in module.state_dict()}
    plan.shortcut_keys = sorted(k for k in state if k not in taken and k not in backbone_set)
    stack = getattr(model, "lor2c", None)
    if stack is not None and not any(getattr(a, "active", True) for a in stack.adapters.values()):
        # every span was merged away or swapped for injected LoRA: nothing of the stack runs any more
        plan.shortcut_keys = [k for k in plan.shortcut_keys if not k.startswith("lor2c.")]
    return plan


def _fold(weight: torch.Tensor, module: nn.Module, adapters: list[nn.Module]) -> torch.Tensor:
    """W + sum of deltas, computed in fp32; Conv1D stores (d_in, d_out), so deltas go in transposed."""
    w = weight.float()  # freshly read: folded in place
    conv1d = not isinstance(module, nn.Linear)
    with torch.no_grad():
        for a in adapters:
            delta = a.delta_weight(torch.float32)  # B A in fp32 even from bf16 adapters: one rounding
            part = getattr(a, "out_slice", None)
            view = w.T if conv1d else w
            rows, total = (delta.shape[0], delta.shape[0]) if part is None else (part.size, part.total)
            if delta.shape != (rows, view.shape[1]) or total != view.shape[0]:
                raise ExportError(f"delta of shape {tuple(delta.shape)} does not fit weight {tuple(w.shape)} "
                                  f"(slice {part})")
            if part is None:
                view += delta
            else:
                part.add_(view, delta)
    return w


def _map_base_keys(base_keys, backbone: list[str], prefix: str) -> dict[str, str]:
    """model key -> base key: exact, or through the base-model prefix (BertModel <-> BertFor...)."""
    wanted = set(backbone)
    mapped = {}
    for k in base_keys:
        for cand in (k, f"{prefix}.{k}", k[len(prefix) + 1:] if k.startswith(prefix + ".") else None):
            if cand in wanted and cand not in mapped:
                mapped[cand] = k
                break
    return mapped


def _tied_aliases(model: nn.Module) -> dict[str, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: names for names in groups.values() if len(names) > 1 for n in names}


def _write_config(plan: Plan, tmp: Path, out_dtype: torch.dtype | None, base_dtype: torch.dtype) -> None:
    config = plan.hf_config
    model_type = config.model_type
    config.architectures = [type(plan.model).__name__]
    config.dtype = out_dtype or base_dtype
    raw = config.to_dict()
    if plan.shortcut_keys:
        # A renamed model_type: AutoModel* refuses it loudly; lor2c_ds.export.from_pretrained restores it.
        raw["model_type"] = f"lor2c_{model_type}"
        cfg = plan.adapter_config
        raw[SECTION] = {
            "base_model_type": model_type, "task": plan.task,
            "note": "LoR2C shortcuts are stored in the shards under lor2c.*; load with "
                    "lor2c_ds.export.from_pretrained(path), plain transformers would drop them",
            "adapter_config": cfg.to_dict(),
            "spans": _active_spans(plan.model, cfg, config.num_hidden_layers),
            "shortcut_tensors": plan.shortcut_keys,
            "removed_modules": plan.folded_modules + plan.inactive_modules,  # folded or never switched on
            "layout": plan.layout,
        }
    (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _active_spans(model: nn.Module, cfg: AdapterConfig, num_blocks: int) -> list[list[int]]:
    """The spans the shortcuts cover now (Merge/Inject change them during training)."""
    stack = getattr(model, "lor2c", None)
    if stack is not None and hasattr(stack, "topology"):
        return sorted([int(s), int(e)] for s, e, active in stack.topology().values() if active)
    return [list(s) for s in cfg.resolved_spans(num_blocks)]


def _copy_side_files(base: Path, tmp: Path) -> None:
    """Tokenizer and generation files: every top-level file of the base that holds no weights."""
    for f in sorted(base.iterdir()):
        if f.is_file() and f.name != "config.json" and not f.name.endswith(_WEIGHT_SUFFIXES) \
                and not f.name.endswith(".index.json") and not f.name.startswith("adapter_"):
            shutil.copyfile(f, tmp / f.name)


def _write_peft(plan: Plan, base: Path, target: Path) -> str | None:
    """A PEFT LoRA directory for LoRA-only runs; returns why not when it cannot be written."""
    from safetensors.torch import save_file

    from ..adapters import LoRA

    if plan.shortcut_keys or not plan.folded_modules:
        return "the run has LoR2C shortcuts or no LoRA"
    modules = [plan.model.get_submodule(n) for n in plan.folded_modules]
    if any(type(m) is not LoRA for m in modules):
        return "not every folded adapter is a plain LoRA"
    if any(m.chunks != 1 for m in modules):
        return "LoRA on a slice of a fused projection (GPT-2 c_attn) has no PEFT equivalent"
    state, targets, conv = {}, set(), False
    for name, m in zip(plan.folded_modules, modules):
        proj = name.rpartition(".")[0]
        targets.add(proj)
        conv |= not isinstance(plan.model.get_submodule(proj), nn.Linear)
        state[f"base_model.model.{proj}.lora_A.weight"] = plan.adapter_state[f"{name}.lora_A.weight"].contiguous()
        state[f"base_model.model.{proj}.lora_B.weight"] = plan.adapter_state[f"{name}.lora_B.weight"].contiguous()
    heads = sorted({k.rpartition(".")[0] for k in plan.adapter_state if k in set(plan.backbone)})
    for k in plan.adapter_state:
        if k in set(plan.backbone):
            state[f"base_model.model.{k}"] = plan.adapter_state[k].contiguous()
    cfg = plan.adapter_config
    target.mkdir()
    save_file(state, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    (target / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "SEQ_CLS" if plan.task == "classification" else "CAUSAL_LM",
        "base_model_name_or_path": str(base), "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": "(" + "|".join(re.escape(t) for t in sorted(targets)) + ")",  # exact names
        "fan_in_fan_out": conv, "bias": "none",
        "modules_to_save": heads or None, "inference_mode": True,
    }, indent=2, sort_keys=True) + "\n")
    return None


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} is not empty; choose another or pass --overwrite")


def export(checkpoint: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
           dtype: str | None = None, overwrite: bool = False, max_shard_size="2GB",
           parity_batches: int = 4, train_config=None) -> dict:
    """Fold the adapters of `checkpoint` into the weights of `base` and write `out`; returns the report.

    dtype: fp32, bf16, fp16, or None for the base checkpoint's own dtypes.
    parity_batches: held-out batches run through the trained and the exported model (0 skips).
    train_config: the run's TrainConfig (found next to the checkpoint when None).
    """
    base, out = Path(base), Path(out)
    adapter_dir = resolve_checkpoint(checkpoint)
    if not (base / "config.json").is_file():
        raise ExportError(f"base model directory {base} does not exist or has no config.json")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    check_out(out, overwrite)
    max_bytes = _parse_size(max_shard_size)
    train_cfg = train_config if train_config is not None else find_train_config(adapter_dir)
    try:
        plan = build_plan(adapter_dir, base, train_cfg)
    except (ConfigError, UnsupportedArchitectureError) as e:
        raise ExportError(str(e)) from None
    out_dtype = DTYPES[dtype] if dtype else None
    base_tensors = _base_tensors(base)

    # Where every output tensor comes from.
    mapped = _map_base_keys(base_tensors, plan.backbone, plan.model.base_model_prefix)
    aliases = _tied_aliases(plan.model)
    sources: dict[str, tuple] = {}
    for key in plan.backbone:
        if key in plan.adapter_state:
            sources[key] = ("adapter", key)  # a trained head overrides the base's
        elif key in mapped:
            sources[key] = ("base", mapped[key])
    lacking = [k for k in plan.backbone if k not in sources and not any(a in sources for a in aliases.get(k, ()))]
    converted = converted_tensors(base, plan, lacking, base_tensors) if lacking else None
    for key in lacking:
        if key not in converted:
            raise ExportError(f"{key} is in neither the base checkpoint {base} nor the adapter weights")
        sources[key] = ("converted", key)
    for key in plan.shortcut_keys:
        sources[key] = ("adapter", key)
    unused = sorted(set(base_tensors) - set(mapped.values()))
    if unused:
        log.info("base tensors not used by %s: %s", type(plan.model).__name__, unused[:8])

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t

    entries = []
    for key, (kind, src) in sources.items():
        if kind == "base":
            _, src_dtype, shape = base_tensors[src]
        elif kind == "converted":
            src_dtype, shape = converted.specs[src]
        else:
            src_dtype, shape = plan.adapter_state[src].dtype, tuple(plan.adapter_state[src].shape)
            if kind == "adapter" and key in mapped:
                src_dtype = base_tensors[mapped[key]][1]  # a trained head keeps the base's dtype
        is_float = src_dtype.is_floating_point
        entries.append((key, out_dtype if (out_dtype and is_float) else src_dtype, shape))
    base_dtype = next((d for _, d, _ in base_tensors.values() if d.is_floating_point), torch.float32)

    def produce(key: str) -> torch.Tensor:
        kind, src = sources[key]
        if kind == "adapter":
            t = plan.adapter_state[src]
            return cast(t) if out_dtype or key not in mapped else t.to(base_tensors[mapped[key]][1])
        if kind == "converted":  # built now from the base's files (or taken from the whole-model load)
            src_dtype, t = converted.specs[src][0], converted.read(src)
        else:
            file, src_dtype, _ = base_tensors[src]
            t = _read_tensor(file, src)
        if key in plan.folds:
            module = plan.model.get_submodule(key.rpartition(".")[0])
            t = _fold(t, module, plan.folds[key]).to(out_dtype or src_dtype)
        return cast(t)

    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        log.warning("removing a partial export left by an interrupted run: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, shard in zip(names, shards):
            _write_shard(tmp / name, shard, produce, {"format": "pt"})
            log.info("wrote %s (%d tensors)", name, len(shard))
        total = sum(math.prod(s) * d.itemsize for _, d, s in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k, _, _ in shard}}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_config(plan, tmp, out_dtype, base_dtype)
        if plan.shortcut_keys:
            write_portable(plan, tmp)  # modeling code + auto_map: loads without lor2c_ds
        _copy_side_files(base, tmp)
        (tmp / ADAPTER_SUBDIR).mkdir()
        for f in (CONFIG_NAME, WEIGHTS_NAME, *SIDE_FILES):
            if (adapter_dir / f).is_file():
                shutil.copyfile(adapter_dir / f, tmp / ADAPTER_SUBDIR / f)
        peft_skipped = _write_peft(plan, base, tmp / PEFT_SUBDIR)
        report = {
            "checkpoint": str(adapter_dir), "base": str(base), "task": plan.task,
            "method": plan.adapter_config.method, "dtype": dtype or _DTYPE_NAMES.get(base_dtype, str(base_dtype)),
            "folded_modules": len(plan.folded_modules), "folded_weights": sorted(plan.folds),
            "shortcut_tensors": plan.shortcut_keys, "exact_merge": plan.exact,
            "plain_transformers": not plan.shortcut_keys,
            "peft": PEFT_SUBDIR if peft_skipped is None else None, "peft_skipped": peft_skipped,
            "shards": names, "total_bytes": total,
        }
        if converted is not None:
            report["converted_tensors"] = converted.report()
        del plan.model
        report["parity"] = parity(adapter_dir, base, tmp, plan, train_cfg, parity_batches,
                                  exported_dtype=out_dtype or base_dtype, converted=converted, base_keys=mapped)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        if report["parity"] and report["parity"]["passed"] is False:
            p = report["parity"]
            raise ExportError(f"exact merge missed its bound: max relative logit difference "
                              f"{p['max_rel_diff']:.3g} > {p['bound']:g} (max abs {p['max_abs_diff']:.3g})")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("export written to %s", out)
    return report
