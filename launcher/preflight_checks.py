"""The checks lor2c-train's pre-flight runs before any rank starts; each raises ConfigError naming the
recipe field, its value and what would be valid. They read files and environment, and write nothing."""
from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

from lor2c_ds.adapters.config import ConfigError

log = logging.getLogger("lor2c_ds.preflight")

# Recipe fields that name files or directories: field -> what it must be.
PATH_FIELDS = {"model": "directory", "data.path": "file or directory", "data.eval_path": "file or directory",
               "data.test_path": "file or directory", "data.chat_template": "file",
               "eval.multiple_choice_path": "file", "eval.generation_path": "file"}
# A tokenizer's vocabulary is in one of these (transformers builds an empty one when none is there).
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
               "sentencepiece.bpe.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def field_value(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_paths(cfg) -> None:
    """Every path the recipe names exists (and is a directory or file where it must be)."""
    for name, kind in PATH_FIELDS.items():
        value = field_value(cfg, name)
        if not value:
            continue
        path = Path(value)
        if not path.exists():
            raise ConfigError(f"{name}: {kind} {path} does not exist")
        if kind == "directory" and not path.is_dir():
            raise ConfigError(f"{name}: {path} is not a directory")
        if kind == "file" and not path.is_file():
            raise ConfigError(f"{name}: {path} is not a file")
    if cfg.deepspeed.endswith(".json") and not Path(cfg.deepspeed).is_file():
        raise ConfigError(f"deepspeed: file {cfg.deepspeed} does not exist")
    out = Path(cfg.output_dir).absolute()
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir: {out} cannot be created or written: {parent} is not a writable directory")


def read_model_config(model_dir: Path, field: str = "model"):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{field}: directory {model_dir} has no config.json")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as e:  # a broken config.json: say which file and why, in one line
        raise ConfigError(f"{field}: {model_dir / 'config.json'} cannot be read ({_first_line(e)})") from None


def has_vocabulary(model_dir: Path) -> bool:
    return any((Path(model_dir) / name).is_file() for name in VOCAB_FILES)


def check_model_dir(model_dir: Path, field: str) -> None:
    """For the other tools (lor2c-export --base, lor2c-bench --model): a model directory with a
    readable config and complete weights."""
    if not model_dir.is_dir():
        raise ConfigError(f"{field}: directory {model_dir} does not exist")
    read_model_config(model_dir, field)
    check_weights(model_dir, field)


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unreadable or truncated (from its header alone), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"its header claims {n} bytes but the file holds {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"its header is not readable ({_first_line(e)})"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + n + max(ends, default=0)
    if expected != size:
        return f"truncated: its header describes {expected} bytes, the file holds {size}"
    return None


def check_weights(model_dir: Path, field: str = "model") -> None:
    """Weights are present; every safetensors file (and every shard an index names) has a readable,
    complete header."""
    present = [name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not present:
        raise ConfigError(f"{field}: {model_dir} holds no weights (looked for {', '.join(WEIGHT_FILES)})")
    files = []
    for name in present:
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads((model_dir / name).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ConfigError(f"{field}: {model_dir / name} is not a readable weight index ({_first_line(e)})") from None
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ConfigError(f"{field}: {model_dir / name} names shard(s) {missing} that are missing")
            files += [model_dir / s for s in shards]
        else:
            files.append(model_dir / name)
    for path in files:
        problem = _safetensors_problem(path) if path.suffix == ".safetensors" else None
        if problem:
            raise ConfigError(f"{field}: weights file {path} is damaged: {problem}")


def load_tokenizer_checked(model_dir: Path):
    """The tokenizer as the ranks load it; says once (here) when it has no pad token."""
    from transformers import AutoTokenizer

    if not has_vocabulary(model_dir):
        raise ConfigError(f"model: {model_dir} has no tokenizer (looked for {', '.join(VOCAB_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise ConfigError(f"model: {model_dir} has no usable tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model: the tokenizer in {model_dir} has neither a pad nor an eos token to pad with")
        log.warning("the tokenizer in %s has no pad token; padding with its eos token %r", model_dir,
                    tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_lengths(cfg, model_config, data) -> None:
    """No encoded row is longer than the model's position table."""
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if not isinstance(limit, int) or cfg.data.max_length <= limit:
        return
    for name in ("train", "eval", "test"):
        split = getattr(data, name)
        if split is None or not hasattr(split, "__len__") or not len(split):
            continue
        longest = max(len(ids) for ids in split["input_ids"])
        if longest > limit:
            raise ConfigError(f"data.max_length={cfg.data.max_length} lets rows of {longest} tokens into the {name} "
                              f"split, but the model has {limit} positions; choose data.max_length 2..{limit}")


def check_adapters_attach(cfg, model_config) -> None:
    """Attach the recipe's adapters to the model built on the meta device (no weights read): targets,
    spans, modules_to_save and the event budgets against the real block stack."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lor2c_ds.adapters import apply_adapters
    from lor2c_ds.config import model_kind

    with torch.device("meta"):
        if model_kind(cfg.task) == "classification":
            model_config.num_labels = cfg.num_labels
            model = AutoModelForSequenceClassification.from_config(model_config)
        else:
            model = AutoModelForCausalLM.from_config(model_config)
        try:
            apply_adapters(model, cfg.adapter)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"adapter: the adapters do not attach to {cfg.model} ({_first_line(e)})") from None
    if cfg.adapter.injections and cfg.adapter.r % 2:
        log.warning("adapter.r=%d is odd: an injection replaces a rank-%d shortcut by LoRA of rank %d, which does "
                    "not keep the parameter count; an even r does", cfg.adapter.r, cfg.adapter.r, cfg.adapter.r // 2)


def planned_world_size(cfg, env=os.environ) -> tuple[int, str]:
    """(the number of ranks the run will have, where that number comes from)."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var == "SLURM_NTASKS" and ("SLURM_STEP_ID" not in env or env.get("LOR2C_SLURM_TASKS") == "per_node"):
            continue
        if var in env:
            try:
                world = int(env[var])
            except ValueError:
                raise ConfigError(f"the launcher's {var}={env[var]!r} is not a number of ranks") from None
            if world < 1:
                raise ConfigError(f"the launcher's {var}={world} is not a number of ranks (need >= 1)")
            return world, f"{var}={world}"
    if env.get("LOR2C_SLURM_TASKS") == "per_node" and "SLURM_STEP_ID" in env:
        nodes = int(env.get("SLURM_NNODES", "1"))
        return cfg.nproc * nodes, f"nproc={cfg.nproc} x SLURM_NNODES={nodes}"
    return cfg.nproc, f"nproc={cfg.nproc}"


def check_batch(cfg, world: int, source: str) -> None:
    """The global batch splits into micro-batches x ranks x accumulation steps."""
    g, m = cfg.global_batch_size, cfg.micro_batch_size
    if m > g:
        raise ConfigError(f"micro_batch_size={m} is larger than global_batch_size={g}; choose a micro_batch_size "
                          f"that divides global_batch_size / ranks ({source})")
    if g % (m * world) == 0:
        return
    if g % world:
        raise ConfigError(f"global_batch_size={g} does not split over {world} ranks ({source}); choose a "
                          f"global_batch_size that is a multiple of micro_batch_size x ranks = {m * world}")
    fits = [d for d in range(1, g // world + 1) if (g // world) % d == 0]
    raise ConfigError(f"global_batch_size={g} is not a multiple of micro_batch_size x ranks = {m} x {world} "
                      f"({source}); valid micro_batch_size values: {fits}, or a global_batch_size that is a "
                      f"multiple of {m * world}")


def check_labels(cfg, data) -> None:
    if cfg.task == "classification" and data.label_names is not None and len(data.label_names) != cfg.num_labels:
        shown = data.label_names[:10]
        raise ConfigError(f"num_labels={cfg.num_labels}, but the train split ({cfg.data.path}) has "
                          f"{len(data.label_names)} label values {shown}; set num_labels: {len(data.label_names)} "
                          "or list the values in data.labels")


def check_schedule(cfg, data) -> None:
    """The merge/inject events fall inside the run, with the real number of steps per epoch."""
    if not (cfg.adapter.merges or cfg.adapter.injections) or cfg.adapter.method not in ("lor2c", "share_lor2c"):
        return
    from lor2c_ds.topology import EventSchedule

    rows = None if data.streaming else len(data.train)
    steps_per_epoch, total = cfg.schedule_steps(rows)
    try:
        EventSchedule(cfg.adapter, cfg.epochs, steps_per_epoch, total).check()
    except ConfigError as e:
        raise ConfigError(f"adapter.merges/adapter.injections: {e} ({rows} training rows, global_batch_size="
                          f"{cfg.global_batch_size}: {steps_per_epoch} steps per epoch, epochs={cfg.epochs})") from None


# Recipe fields a resumed run must share with the run that wrote the checkpoint.
RESUME_FIELDS = ("model", "task", "num_labels", "adapter")


def check_resume(cfg) -> None:
    """A checkpoint the run would resume from is readable and was written by a compatible recipe."""
    from lor2c_ds.checkpoint import is_restart_of, latest_complete, read_run_state

    out = Path(cfg.output_dir)
    root = out / "checkpoints"
    tag = latest_complete(root) if cfg.resume and root.is_dir() else None
    if tag is None:
        return
    try:
        state = read_run_state(root, tag)
    except (OSError, ValueError) as e:
        raise ConfigError(f"output_dir: checkpoint {root / tag} cannot be read ({_first_line(e)}); "
                          "set resume: false or another output_dir") from None
    if cfg.overwrite_output_dir and not is_restart_of(state):
        return  # a fresh run: the old files are moved aside
    saved_path = out / "train_config.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except ValueError as e:
        raise ConfigError(f"output_dir: {saved_path} is not valid JSON ({e}); it records the run to resume") from None
    now = cfg.to_dict()
    for key in RESUME_FIELDS:
        if key not in saved or saved[key] == now[key]:
            continue
        if isinstance(now[key], dict):
            diff = [k for k in now[key] if saved[key].get(k) != now[key][k]]
            name, was, wants = f"{key}.{diff[0]}", saved[key].get(diff[0]), now[key][diff[0]]
        else:
            name, was, wants = key, saved[key], now[key]
        raise ConfigError(f"{name}={wants!r}, but the checkpoint {root / tag} was trained with {was!r}; resuming "
                          f"needs the same value (or set resume: false / overwrite_output_dir: true, or another "
                          "output_dir)")

