"""Checkpoints that are either complete or ignored, and resuming from the newest complete one.

`OUTPUT_DIR/checkpoints/<tag>/` holds DeepSpeed's own files (optimizer, scheduler; the frozen backbone
excluded), the adapters as safetensors, each rank's RNG state, and, written last, `run_state.json`
(the run's position and its callbacks' state). A tag without `run_state.json` is a partial write and
is never resumed from. `checkpoints/latest` names the newest complete tag and is replaced atomically
after `run_state.json` exists.

Every run has a `run_id` (kept across its resumes) and records the job that wrote each checkpoint
(SLURM job id, torchrun restart). Retention deletes only checkpoints of the current run. A fresh run
(`overwrite_output_dir`) moves the previous run's files aside first, unless the job is a requeue or
restart of the very job that wrote them: that one resumes.
"""
from __future__ import annotations

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

RUN_STATE = "run_state.json"
LATEST = "latest"
BEST = "best.json"
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


def save(engine, root: Path, tag: str, run_state: dict, rank: int, keep: int | None = None,
         protect: str | None = None) -> Path:
    """Write checkpoint `tag` on every rank; returns its directory once it is complete. With `keep`,
    only the newest `keep` complete checkpoints of this run (`run_state["run_id"]`) stay, and `protect`
    (the best one) as well; checkpoints of other runs are never deleted."""
    tag_dir = root / tag
    if rank == 0 and (tag_dir / RUN_STATE).exists():
        (tag_dir / RUN_STATE).unlink()  # rewriting a tag: it is partial until the end
    ds.barrier()
    ds.save_checkpoint(engine, root, tag, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(_rng_file(tag_dir, rank)))
    with ds.gathered_trainable(engine):
        if rank == 0:
            save_adapters(engine.module, tag_dir)
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


def restore(engine, root: Path, tag: str, rank: int) -> None:
    """Load DeepSpeed's state (adapters, optimizer, scheduler) and this rank's RNG."""
    ds.load_checkpoint(engine, root, tag)
    rng_path = _rng_file(root / tag, rank)
    if rng_path.is_file():  # a run resumed on more ranks than it saved keeps its fresh RNG there
        rng = load_file(str(rng_path))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
