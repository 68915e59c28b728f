"""`export_on_save`: each saved checkpoint exported in a process of its own, which training never waits for.

Why its own process (not rank 0 with the others in a barrier, not only after the run): a 7B-70B export
takes longer than the collective timeout, so no rank may wait for it inside the process group; a
separate process also keeps the export's host memory out of the training process and survives the
run's end. But not the job's: SLURM ends every process of a job step with it, so a run that completes
waits, after its process group is gone, for the exports it started (`wait_for_exports`) and reports
how they ended; a preempted run does not wait (its grace time is for the checkpoint).

Rank 0 copies the checkpoint tag to OUTPUT_DIR/export_staging/<tag> (retention may delete the tag while
the export runs), then starts `python -m lor2c_ds.export.background` in a new session with its output in
OUTPUT_DIR/export_logs/<tag>.log, and goes on. The exports take a file lock on OUTPUT_DIR/export.lock, so
one runs at a time; one that finds a newer step already in OUTPUT_DIR/export leaves it. A failed export
leaves its log and OUTPUT_DIR/export_logs/<tag>.failed; training is not affected.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
_started: list[tuple[str, Path, subprocess.Popen]] = []  # (tag, log file, process) on rank 0


def _step(tag: str) -> int:
    return int(tag.rsplit("_", 1)[-1]) if tag.rsplit("_", 1)[-1].isdigit() else -1


def export_run_checkpoint(cfg, tag_dir: Path, rank: int) -> subprocess.Popen | None:
    """Training's merge-on-save. On rank 0: stage `tag_dir` and start its export to output_dir/export in a
    process of its own; returns the process (other ranks: None). No rank waits for it."""
    if rank != 0:
        return None
    out = Path(cfg.output_dir)
    stage = out / "export_staging" / tag_dir.name
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(tag_dir, stage)
    logs = out / "export_logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / f"{tag_dir.name}.failed").unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lor2c_ds.export.background", str(stage), str(tag_dir), cfg.model,
           str(out / "export"), cfg.export_dtype or ""]
    with open(logs / f"{tag_dir.name}.log", "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ))
    log.info("exporting %s in process %d (log: %s)", tag_dir.name, proc.pid, logs / f"{tag_dir.name}.log")
    _started.append((tag_dir.name, logs / f"{tag_dir.name}.log", proc))
    return proc


def wait_for_exports() -> list[tuple[str, Path]]:
    """Wait for every export this process started; returns (tag, log) of those that failed. Call it
    with no process group left to time out (a 70B export takes longer than any collective timeout)."""
    failed = []
    while _started:
        tag, log_file, proc = _started.pop(0)
        if proc.poll() is None:
            log.info("waiting for the export of %s (process %d, log: %s)", tag, proc.pid, log_file)
        if proc.wait() != 0:
            failed.append((tag, log_file))
    return failed


def main(stage: str, tag: str, base: str, out: str, dtype: str) -> int:
    from .merge import export, find_train_config  # here: this module is imported by the package

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stage_dir, tag_dir, out_dir = Path(stage), Path(tag), Path(out)
    run_dir = tag_dir.parent.parent  # OUTPUT_DIR/checkpoints/<tag>
    with open(run_dir / "export.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one export at a time
        try:
            report_path = out_dir / "export_report.json"
            if report_path.is_file():
                done = json.loads(report_path.read_text()).get("checkpoint", "")
                if _step(Path(done).name) > _step(tag_dir.name):
                    log.info("%s already holds %s, newer than %s: left as it is", out_dir, done, tag_dir.name)
                    return 0
            train_cfg = find_train_config(run_dir)
            report = export(stage_dir, base, out_dir, dtype=dtype or None, overwrite=True, train_config=train_cfg)
            report["checkpoint"] = str(tag_dir)
            report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            return 0
        except Exception:
            log.exception("export of %s failed", tag_dir)
            (run_dir / "export_logs" / f"{tag_dir.name}.failed").write_text("see the log beside this file\n")
            return 1
        finally:
            shutil.rmtree(stage_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
