"""The paths real runs take: a checkpoint written at an event step, re-runs into the same directory,
and preemption at any step (2 CPU ranks or 1, DeepSpeed ZeRO-3). Slow; they need `lor2c-assets`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_distributed import REPO, classification_recipe, metrics, needs_assets, run_cli, tiny_bert4  # noqa: F401
from test_topology_distributed import IM, probe

pytestmark = [pytest.mark.slow, needs_assets]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in metrics(out, "train")]


def close(a: list[float], b: list[float], atol: float = 1e-5) -> bool:
    return len(a) == len(b) and torch.allclose(torch.tensor(a), torch.tensor(b), rtol=0, atol=atol)


def test_checkpoint_at_an_event_step_holds_the_state_after_the_event(tmp_path, tiny_bert4):
    """Step 3 merges and injects, evaluates and saves its best checkpoint; resuming from it continues
    with the losses of the run that did not stop, through both events."""
    recipe = classification_recipe(tmp_path, tiny_bert4, adapter=IM, max_steps=8, lr=1e-2, eval_every=3,
                                   eval={"best_metric": "loss"})
    probe(recipe, tmp_path / "whole", 0, f"output_dir={tmp_path / 'a'}")
    probe(recipe, tmp_path / "part", 4, f"output_dir={tmp_path / 'b'}")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_4")  # as if killed after step 3's checkpoint
    state = json.loads((tmp_path / "b" / "checkpoints" / "step_3" / "run_state.json").read_text())
    topology = state["callbacks"]["topology"]
    assert (topology["merges_done"], topology["injections_done"]) == (1, 1), topology
    assert [e["event"] for e in topology["events"]] == ["merge", "inject"]
    best = json.loads((tmp_path / "b" / "checkpoints" / "best.json").read_text())
    assert best["tag"] == "step_3"  # the evaluation it names saw the layout after the events
    probe(recipe, tmp_path / "resumed", 0, f"output_dir={tmp_path / 'b'}")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert close(a, b[:4] + b[5:]), (a, b)  # b logged step 4 twice: before the kill and after the resume
    assert [e["step"] for e in metrics(tmp_path / "b", "topology")] == [3, 3]  # never fired twice


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_output_dir_starts_a_fresh_run(tmp_path, tiny_bert4):
    out = tmp_path / "run"
    recipe = classification_recipe(tmp_path, tiny_bert4, output_dir=str(out), nproc=1, save_every=1)
    run_cli(recipe, "max_steps=4")
    old = tree_digest(out)
    assert {f"checkpoints/step_{k}/run_state.json" for k in range(1, 5)} <= set(old)

    bad = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set",
                          "overwrite_output_dir=true", "--set", "adapter.r=0"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert tree_digest(out) == old and not list(tmp_path.glob("run.previous-*"))  # bad input touched nothing

    proc = run_cli(recipe, "overwrite_output_dir=true", "max_steps=3", "keep_checkpoints=2", "lr=1e-3")
    aside = list(tmp_path.glob("run.previous-*"))
    assert len(aside) == 1 and tree_digest(aside[0]) == old  # the previous run, whole, in one sibling
    assert str(aside[0]) in proc.stderr
    tags = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_2", "step_3"], tags  # retention saw only this run's checkpoints
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3]  # a fresh metrics.jsonl
    assert len(list((out / "tensorboard").iterdir())) == 1
    ids = {json.loads((out / "checkpoints" / t / "run_state.json").read_text())["run_id"] for t in tags}
    assert len(ids) == 1 and ids != {json.loads((aside[0] / "checkpoints/step_4/run_state.json").read_text())["run_id"]}


def test_a_requeued_job_resumes_despite_overwrite_output_dir(tmp_path, tiny_bert4):
    """overwrite_output_dir must not wipe the run at every SLURM requeue: the same job id resumes."""
    out = tmp_path / "run"
    recipe = classification_recipe(tmp_path, tiny_bert4, output_dir=str(out), nproc=1, save_every=2,
                                   overwrite_output_dir=True)
    env = dict(os.environ, SLURM_JOB_ID="4242")
    for steps in (4, 6):
        proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set",
                               f"max_steps={steps}"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and not list(tmp_path.glob("run.previous-*"))
    assert [r["step"] for r in metrics(out, "train")] == [1, 2, 3, 4, 5, 6]
    # another job (a new submission) starts fresh
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set", "max_steps=2"],
                          cwd=REPO, capture_output=True, text=True, env=dict(env, SLURM_JOB_ID="4243"), timeout=600)
    assert proc.returncode == 0 and len(list(tmp_path.glob("run.previous-*"))) == 1


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        path = out / "metrics.jsonl"
        if path.is_file() and any(json.loads(line).get("kind") == "train" and json.loads(line)["step"] >= step
                                  for line in path.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def test_preemption_writes_the_checkpoint_before_any_end_of_training_work(tmp_path, tiny_bert4):
    """SIGUSR1 mid-run on 2 ranks (ResLoRA, export on save): the ranks stop after the same step and write
    that checkpoint; no merge report, no export, no final evaluation; the rerun ends as an unstopped run."""
    adapter = {"method": "reslora", "reslora_variant": "is", "r": 4, "alpha": 8, "dropout": 0.0}
    recipe = classification_recipe(tmp_path, tiny_bert4, adapter=adapter, nproc=2, max_steps=30,
                                   export_on_save=True)
    whole = tmp_path / "whole"
    run_cli(recipe, f"output_dir={whole}", "export_on_save=false")
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set", f"output_dir={out}"]
    log = tmp_path / "stopped.log"
    with log.open("w") as sink:  # a file, not a pipe nobody reads while the run goes on
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, text=True)
        wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGUSR1)  # to lor2c-train, as a user or scheduler would: it hands it to the ranks
        proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads((out / "checkpoints" / "latest").read_text().strip().join(['"', '"']))
    step = int(stopped.split("_")[1])
    assert 2 <= step < 30 and (out / "checkpoints" / stopped / "run_state.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows if r["kind"] in ("eval", "reslora_merge")] == []
    assert not (out / "export").exists() and not (out / "adapter").exists()
    (event,) = [r for r in rows if r["kind"] == "preempted"]
    assert event["step"] == step and 0 < event["signal_to_checkpoint_s"] < 120
    assert "complete" in err and "after the preemption signal" in err

    run_cli(recipe, f"output_dir={out}")  # the requeue: resumes and finishes, now with the export
    assert close(losses(whole), losses(out)), (losses(whole), losses(out))
    assert (out / "export" / "export_report.json").is_file() and metrics(out, "reslora_merge")
