"""Preemption: stop at a step boundary on SIGUSR1/SIGTERM, keep a checkpoint, requeue under SLURM.

The signal handler only records the signal. Each step's closing all-reduce sums that flag over all
ranks (`PreemptionCallback.step_partials`), and `PreemptionCallback.on_step_end` reads the sum, so
every rank stops after the same step; the loop then writes its
checkpoint at once, before any end-of-training work (evaluation, ResLoRA's merge report, exports),
and logs how long after the signal it was complete. Once every rank has left the process group, `finish` has rank 0
run `scontrol requeue $SLURM_JOB_ID` (once), and the requeued job resumes from that checkpoint.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time

import torch

from .callbacks import Callback

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_received: int | None = None  # the last signal seen by this process
_received_at: float | None = None  # time.time() of the first signal
_stopped_at: int | None = None  # the step at which all ranks agreed to stop
_requeued = False


def _on_signal(signum, frame) -> None:
    global _received, _received_at
    _received = signum  # nothing else here: the loop acts at its next step boundary
    _received_at = _received_at or time.time()


def install() -> None:
    """Record SIGUSR1/SIGTERM instead of dying on them (call in every rank process)."""
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


def received() -> int | None:
    return _received


def received_at() -> float | None:
    return _received_at


def stopped_at() -> int | None:
    """The step at which the ranks stopped for a signal, or None if they did not."""
    return _stopped_at


def reset() -> None:
    global _received, _received_at, _stopped_at, _requeued
    _received = _received_at = _stopped_at = None
    _requeued = False


class PreemptionCallback(Callback):
    """Stops every rank after the same step once any rank has received a preemption signal. Each rank's
    vote rides on the step's closing all-reduce (`step_partials`): no collective, no host sync of its own."""

    name = "preemption"

    def __init__(self):
        self.votes = 0.0

    def step_partials(self, run) -> torch.Tensor:
        return torch.tensor([1.0 if _received is not None else 0.0], dtype=torch.float64, device=run.engine.device)

    def on_step_sums(self, run, sums: list[float]) -> None:
        self.votes = sums[0]

    def on_step_end(self, run) -> None:
        global _stopped_at

        if self.votes > 0 and run.step < run.total_steps:
            run.stop = True
            _stopped_at = run.step
            if run.rank == 0:
                log.warning("preemption signal: stopping after step %d of %d to checkpoint", run.step,
                            run.total_steps)


def in_slurm_job(env=os.environ) -> bool:
    return "SLURM_JOB_ID" in env


def requeue(env=os.environ) -> bool:
    """`scontrol requeue` this SLURM job, at most once per process; False when it could not."""
    global _requeued
    if _requeued:
        return True
    if env.get("LOR2C_REQUEUE", "1") == "0":
        log.warning("LOR2C_REQUEUE=0: not requeueing job %s", env.get("SLURM_JOB_ID"))
        return False
    job = env["SLURM_JOB_ID"]  # an array task has its own job id too
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("scontrol requeue %s failed: %s", job, e)
        return False
    if proc.returncode:
        # already requeued by the scheduler (PreemptMode=REQUEUE), cancelled, or --no-requeue
        log.error("scontrol requeue %s failed (%d): %s", job, proc.returncode, proc.stderr.strip())
        return False
    _requeued = True
    log.warning("job %s requeued; it resumes from the checkpoint when it starts again", job)
    return True


def finish(rank: int, output_dir, env=os.environ) -> int:
    """After a preempted run has left the process group: requeue (rank 0, SLURM only); the exit code."""
    if rank != 0:
        return 0
    if in_slurm_job(env):
        requeue(env)
    else:
        log.warning("stopped by signal %s at step %s; checkpoint in %s: run the same command to resume",
                    _received, _stopped_at, f"{output_dir}/checkpoints")
    return 0
