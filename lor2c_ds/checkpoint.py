"""Checkpoints that are either complete or ignored, and resuming from the newest complete one, on any
number of ranks and nodes and under any ZeRO stage.

`OUTPUT_DIR/checkpoints/<tag>/` holds the consolidated trainable state, the adapters as safetensors,
each rank's RNG state, and, written last, `run_state.json` (the run's position: step, epoch, and so the
data position; the recipe it was written under; its callbacks' state: the topology layout, ResLoRA's
statistics). The consolidated state is world-size independent and read without DeepSpeed:
`trainable_state.safetensors` (per trainable tensor `master/<name>` (fp32), `exp_avg/<name>`,
`exp_avg_sq/<name>`) and `trainable_state.json` (each tensor's Adam step count, the LR scheduler, the
world size and ZeRO stage it was written under, the tensor file's size and SHA-256). Every resume reads
it, whatever the world size and stage (it is exact: the same numbers DeepSpeed holds); DeepSpeed's own
per-rank files are not written (a checkpoint of an older version, which has only those, still resumes
through DeepSpeed on the world size that wrote it). On another world size, each rank's RNG (dropout)
is re-seeded from (seed, step, rank) and the log says so; on the same one it continues.

A tag without `run_state.json` is a partial write and is never resumed from. `checkpoints/latest` names
the newest complete tag and is replaced atomically after `run_state.json` exists.

Every run has a `run_id` (kept across its resumes) and records the job that wrote each checkpoint
(SLURM job id, torchrun restart). Retention deletes only checkpoints of the current run. A fresh run
(`overwrite_output_dir`) moves the previous run's files aside first, unless the job is a requeue or
restart of the very job that wrote them: that one resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import engine as ds
from .adapters import save_adapters
from .config import ConfigError

RUN_STATE = "run_state.json"
LATEST = "latest"
BEST = "best.json"
TENSORS = "trainable_state.safetensors"
TENSORS_INDEX = "trainable_state.json"
STATE_FORMAT = 1
log = logging.getLogger(__name__)


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def job_identity(env=os.environ) -> dict:
    """What identifies the scheduler job writing a checkpoint: a requeued SLURM job keeps its id."""
    return {"slurm_job_id": env.get("SLURM_JOB_ID"), "torchelastic_run_id": env.get("TORCHELASTIC_RUN_ID")}


def is_restart_of(run_state: dict | None, env=os.environ) -> bool:
    """True when this process is a requeue (same SLURM job id) or a torchrun restart (same elastic run id,
    restart count > 0) of the job that wrote `run_state`."""
    if not run_state:
        return False
    wrote, now = run_state.get("job") or {}, job_identity(env)
    if now["slurm_job_id"] and wrote.get("slurm_job_id") == now["slurm_job_id"]:
        return True
    restarted = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    return bool(restarted and now["torchelastic_run_id"] and wrote.get("torchelastic_run_id") == now["torchelastic_run_id"])


def move_aside(output_dir: Path) -> Path | None:
    """Move everything in `output_dir` into one new sibling `<name>.previous-<time>` (None if empty)."""
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = output_dir.with_name(f"{output_dir.name}.previous-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = output_dir.with_name(f"{output_dir.name}.previous-{stamp}-{n}")
    os.replace(output_dir, target)
    output_dir.mkdir()
    return target


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_state_rank{rank}.safetensors"


def _step_of(tag: str) -> int:
    match = re.fullmatch(r"step_(\d+)", tag)
    return int(match.group(1)) if match else -1


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under `root`, oldest first."""
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and (p / RUN_STATE).is_file()]
    return sorted(tags, key=_step_of)


def latest_complete(root: Path) -> str | None:
    """The tag `latest` names if it is complete, else the newest complete tag, else None."""
    named = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    if named and (root / named / RUN_STATE).is_file():
        return named
    tags = complete_tags(root)
    return tags[-1] if tags else None


def read_run_state(root: Path, tag: str) -> dict:
    return json.loads((root / tag / RUN_STATE).read_text())


def _run_id_of(root: Path, tag: str) -> str | None:
    try:
        return read_run_state(root, tag).get("run_id")
    except (OSError, ValueError):
        return None


def recipe_identity(cfg) -> dict:
    """What a checkpoint must share with the recipe that resumes it (recorded in `run_state.json`)."""
    return {"model": str(Path(cfg.model).resolve()), "task": cfg.task, "num_labels": cfg.num_labels,
            "adapter": cfg.adapter.to_dict(), "global_batch_size": cfg.global_batch_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(engine, root: Path, tag: str, run_state: dict, rank: int, keep: int | None = None,
         protect: str | None = None) -> Path:
    """Write checkpoint `tag` on every rank; returns its directory once it is complete. With `keep`,
    only the newest `keep` complete checkpoints of this run (`run_state["run_id"]`) stay, and `protect`
    (the best one) as well; checkpoints of other runs are never deleted."""
    tag_dir = root / tag
    if rank == 0 and (tag_dir / RUN_STATE).exists():
        (tag_dir / RUN_STATE).unlink()  # rewriting a tag: it is partial until the end
    ds.barrier()
    tensors, steps, scheduler = ds.trainable_state(engine)  # a collective: whole on every rank
    tag_dir.mkdir(parents=True, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(_rng_file(tag_dir, rank)))
    with ds.gathered_trainable(engine):
        if rank == 0:
            save_adapters(engine.module, tag_dir)
    if rank == 0:
        save_file(tensors, str(tag_dir / TENSORS), metadata={"format": str(STATE_FORMAT), "library": "lor2c_ds"})
        index = {"format": STATE_FORMAT, "steps": steps, "scheduler": scheduler, "world": run_state.get("world"),
                 "zero_stage": engine.zero_optimization_stage(),
                 "tensors_file": {"bytes": (tag_dir / TENSORS).stat().st_size, "sha256": _sha256(tag_dir / TENSORS)}}
        _write_atomic(tag_dir / TENSORS_INDEX, json.dumps(index, indent=2) + "\n")
    ds.barrier()  # every rank's files are on disk
    if rank == 0:
        _write_atomic(tag_dir / RUN_STATE, json.dumps(run_state, indent=2) + "\n")
        _write_atomic(root / LATEST, tag + "\n")
        if keep:
            ours = [t for t in complete_tags(root) if _run_id_of(root, t) == run_state.get("run_id")]
            for old in ours[:-keep]:
                if old != protect:
                    shutil.rmtree(root / old, ignore_errors=True)
    ds.barrier()
    return tag_dir


def mark_best(root: Path, best: dict) -> None:
    """`checkpoints/best.json` names the best checkpoint and its metric (rank 0)."""
    _write_atomic(root / BEST, json.dumps(best, indent=2) + "\n")


def resume_point(cfg) -> tuple[str | None, dict | None]:
    """(the tag a run of `cfg` resumes from, its run_state), or (None, None) for a fresh start (then,
    with overwrite_output_dir, the previous files are moved aside: see `train._start_or_resume`)."""
    root = Path(cfg.output_dir) / "checkpoints"
    tag = latest_complete(root) if cfg.resume or cfg.overwrite_output_dir else None
    restored = read_run_state(root, tag) if tag else None
    if cfg.overwrite_output_dir and not (cfg.resume and is_restart_of(restored)):
        return None, None
    return (tag, restored) if restored else (None, None)


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (checkpoint {a!r}, recipe {b!r})")
    return out


def check_resumable(cfg, tag: str, run_state: dict) -> None:
    """Raise ConfigError naming what makes checkpoint `tag` unfit for `cfg`: a different model, task,
    adapter config or global batch, or a missing, truncated or damaged consolidated state file."""
    tag_dir = Path(cfg.output_dir) / "checkpoints" / tag
    saved = run_state.get("recipe")
    if saved is not None:
        differ = _differences(saved, recipe_identity(cfg))
        if differ:
            batch = " (the LR schedule's length and the data position depend on it)" \
                if any(d.startswith("global_batch_size") for d in differ) else ""
            raise ConfigError(f"checkpoint {tag_dir} was written for another recipe: {'; '.join(differ)}{batch}; "
                              "restore the recipe, or start afresh with overwrite_output_dir=true or "
                              "another output_dir")
    index_path, tensors_path = tag_dir / TENSORS_INDEX, tag_dir / TENSORS
    if not index_path.is_file():
        return  # an older checkpoint: DeepSpeed's own files only
    try:
        index = json.loads(index_path.read_text())
        expected = index["tensors_file"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{index_path} is not a readable consolidated state index ({e})") from None
    size = tensors_path.stat().st_size if tensors_path.is_file() else None
    if size != expected["bytes"]:
        raise ConfigError(f"{tensors_path} is truncated or missing ({size or 0} of {expected['bytes']} bytes); "
                          "remove that checkpoint directory to resume from an older one")
    if _sha256(tensors_path) != expected["sha256"]:
        raise ConfigError(f"{tensors_path} is damaged (its SHA-256 differs from {index_path.name}'s)")


def check_resume(cfg) -> None:
    """Pre-flight: ConfigError when the checkpoint a run of `cfg` would resume from is unfit for it."""
    tag, run_state = resume_point(cfg)
    if run_state:
        check_resumable(cfg, tag, run_state)


def read_trainable_state(tag_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The consolidated state of a checkpoint, by one process without DeepSpeed: (tensors, index)."""
    return load_file(str(tag_dir / TENSORS)), json.loads((tag_dir / TENSORS_INDEX).read_text())


def _check_tensors(engine, tensors: dict[str, torch.Tensor], tag_dir: Path) -> None:
    expected = {f"{kind}/{name}": tuple(ds.full_shape(p)) for name, p in engine.module.named_parameters()
                if p.requires_grad for kind in ("master", *ds.MOMENTS)}
    got = {key: tuple(t.shape) for key, t in tensors.items()}
    if expected != got:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shape = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ConfigError(f"{tag_dir / TENSORS} does not fit the model's trainable tensors: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}, other shape {shape[:3]}")


def restore(engine, root: Path, tag: str, rank: int, world: int, seed: int) -> dict:
    """Load checkpoint `tag` into `engine` (every rank): the consolidated trainable state on any world
    size and ZeRO stage, then this rank's RNG when the world size is the one that saved it, else a
    re-seeded one. Returns what was read: {"state", "saved_world", "saved_stage", "rng"}."""
    tag_dir = root / tag
    run_state = read_run_state(root, tag)
    saved_world = run_state.get("world")
    if (tag_dir / TENSORS_INDEX).is_file():
        tensors, index = read_trainable_state(tag_dir)
        _check_tensors(engine, tensors, tag_dir)
        global_batch = (run_state.get("recipe") or {}).get("global_batch_size") or engine.train_batch_size()
        ds.load_trainable_state(engine, tensors, index["steps"], index["scheduler"], run_state["step"], global_batch)
        how = {"state": "consolidated", "saved_stage": index["zero_stage"]}
    else:  # written before the consolidated state existed: DeepSpeed's files, same world size only
        ds.load_checkpoint(engine, root, tag)
        how = {"state": "deepspeed", "saved_stage": engine.zero_optimization_stage()}
    rng_path = _rng_file(tag_dir, rank)
    if saved_world == world and rng_path.is_file():
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        how["rng"] = "restored"
    else:  # another world size: each rank's dropout stream starts afresh, reproducibly
        torch.manual_seed(seed * 1_000_003 + run_state["step"] * 1_009 + rank)
        how["rng"] = "re-seeded"
    return {**how, "saved_world": saved_world}
