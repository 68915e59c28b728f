"""Elastic resume: a checkpoint written on N ranks under one ZeRO stage resumes on M ranks and under
another stage, through a merge and an injection and for ResLoRA, with the uninterrupted run's losses;
checkpoints unfit for the recipe are refused before anything starts; the consolidated state is read by
one process without DeepSpeed and stays within the size bound. Multi-process runs are slow-marked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import (REPO, classification_recipe, metrics, needs_assets, run_cli, tiny_bert,  # noqa: F401
                              tiny_bert4)
import checkpoint_size
from test_slurm import cluster  # noqa: F401  (the local SLURM cluster fixture)

from launcher.train import free_port
from lor2c_ds import checkpoint
from lor2c_ds.config import ConfigError, load_config

IM = {"method": "lor2c", "r": 4, "alpha": 8, "dropout": 0.0, "merges": 1, "injections": 1, "event_every_steps": 3}


def probe(recipe: Path, out: Path, nproc: int, stop_after: int, *overrides: str) -> tuple[list[dict], str]:
    """tests/run_probe.py on `nproc` ranks, stopped after step `stop_after` (0: to the end)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "run_probe.py"), str(recipe),
           str(stop_after), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)], proc.stderr


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out, "train")}


@pytest.mark.slow
@needs_assets
def test_resume_on_other_world_sizes_and_stages_through_merge_and_injection(tmp_path, tiny_bert4):
    """One run, stopped and resumed four times: 2 ranks ZeRO-3 -> 1 rank (the merge and injection at step 3
    happen there) -> 2 ranks -> ZeRO-2 -> ZeRO-3, against the uninterrupted 2-rank ZeRO-3 run."""
    recipe = classification_recipe(tmp_path, tiny_bert4, adapter=IM, max_steps=8, lr=1e-2)
    whole, _ = probe(recipe, tmp_path / "whole", 2, 0, f"output_dir={tmp_path / 'ref'}")
    legs = [(2, "zero3", 2), (1, "zero3", 4), (2, "zero3", 5), (2, "zero2", 6), (2, "zero3", 0)]
    out = tmp_path / "elastic"
    logs = []
    for i, (nproc, stage, stop) in enumerate(legs):
        reports, stderr = probe(recipe, tmp_path / f"leg{i}", nproc, stop, f"output_dir={out}", f"deepspeed={stage}")
        logs.append(stderr)
    ref, got = losses(tmp_path / "ref"), losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    ends = [stop or 8 for _, _, stop in legs]
    print("\nfrom -> to: max |loss - uninterrupted| over the resumed leg")
    for (n0, s0, _), (n1, s1, _), start, end in zip(legs, legs[1:], ends, ends[1:]):
        diff = max(abs(got[s] - ref[s]) for s in range(start + 1, end + 1))
        print(f"  {n0} rank(s) {s0} -> {n1} rank(s) {s1}: {diff:.2e}")
        assert diff <= 1e-5, (n0, s0, n1, s1, diff)
    assert [e["event"] for e in metrics(out, "topology")] == ["merge", "inject"]
    assert reports[0]["layout"] == whole[0]["layout"]
    resumed = metrics(out, "resumed")
    assert [(r["state"], r["saved_world"], r["saved_stage"], r["rng"]) for r in resumed] == [
        ("consolidated", 2, 3, "re-seeded"), ("consolidated", 1, 3, "re-seeded"),
        ("consolidated", 2, 3, "restored"), ("consolidated", 2, 2, "restored")]
    assert all(r["to_first_step_s"] >= r["restore_s"] > 0 for r in resumed)
    assert "re-seeded" in logs[1] and "re-seeded" not in logs[3]
    final, expected = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, tmp_path / "ref"))
    assert final.keys() == expected.keys()
    for name in final:
        assert torch.allclose(final[name], expected[name], rtol=0, atol=1e-5), name


@pytest.mark.slow
@needs_assets
def test_reslora_resumes_from_two_ranks_on_one(tmp_path, tiny_bert):
    recipe = classification_recipe(tmp_path, tiny_bert, adapter={
        "method": "reslora", "r": 4, "alpha": 8, "dropout": 0.0, "reslora_variant": "ms", "pre_num": 1})
    run_cli(recipe, "nproc=1", f"output_dir={tmp_path / 'ref'}")
    probe(recipe, tmp_path / "part", 2, 2, f"output_dir={tmp_path / 'b'}")
    probe(recipe, tmp_path / "rest", 1, 0, f"output_dir={tmp_path / 'b'}")
    ref, got = losses(tmp_path / "ref"), losses(tmp_path / "b")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert max(abs(got[s] - ref[s]) for s in ref) <= 1e-5, (ref, got)
    w_ref, w_got = (checkpoint.read_run_state(d / "checkpoints", "step_4")["callbacks"]["reslora"]
                    for d in (tmp_path / "ref", tmp_path / "b"))
    assert w_ref["names"] == w_got["names"] and len(w_got["window"]) == 4  # the 2-rank steps' statistics kept
    for a, b in zip(w_ref["window"], w_got["window"]):
        assert a == pytest.approx(b, rel=1e-5, nan_ok=True)


# --- A single-process checkpoint: its contents, its size, and the bad inputs of a resume ---------------

@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, tiny_bert):
    """A 1-rank ZeRO-3 run of 4 steps (tiny BERT, LoR2C): its recipe and output directory."""
    tmp = tmp_path_factory.mktemp("one_rank")
    recipe = classification_recipe(tmp, tiny_bert, max_steps=4)
    out = tmp / "out"
    run_cli(recipe, "nproc=1", f"output_dir={out}", timeout=1800)  # the shared CPU can be very busy
    return recipe, out


def _snapshot(directory: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


@needs_assets
def test_consolidated_state_is_read_without_deepspeed_and_within_size(one_rank_run):
    _, out = one_rank_run
    tag_dir = out / "checkpoints" / "step_4"
    tensors = load_file(str(tag_dir / checkpoint.TENSORS))  # safetensors only: no DeepSpeed, no process group
    index = json.loads((tag_dir / checkpoint.TENSORS_INDEX).read_text())
    adapters = load_file(str(tag_dir / "adapter_model.safetensors"))
    names = [k.removeprefix("master/") for k in tensors if k.startswith("master/")]
    assert names and set(index["steps"]) == set(names) and set(index["steps"].values()) == {4}
    assert index["world"] == 1 and index["zero_stage"] == 3 and index["scheduler"]["last_batch_iteration"] == 3
    for name in names:  # fp32: the master is the trained tensor; the moments have moved (steps 1-2 have lr 0
        # in the warm-up, so B is 0 until step 3 and A's first non-zero gradient comes at step 4)
        assert torch.equal(tensors[f"master/{name}"], adapters[name]), name
    still = [n for n in names if not tensors[f"exp_avg_sq/{n}"].abs().max() > 0]
    assert not still, still
    # size: within 1.1 x (trainable tensors + fp32 master + Adam moments) plus the JSON, RNG and header metadata
    size = checkpoint_size.report(tag_dir)
    assert size["trainable_numel"] == sum(tensors[f"master/{n}"].numel() for n in names)
    assert size["checkpoint_bytes"] <= 1.1 * size["params_plus_optimizer_bytes"] + size["metadata_bytes"], size


@needs_assets
def test_a_checkpoint_of_another_recipe_is_refused(one_rank_run, tiny_bert4, tmp_path):
    recipe, out = one_rank_run
    before = _snapshot(out)
    for override, named in [("adapter.r=8", "adapter.r (checkpoint 4, recipe 8)"),
                            (f"model={tiny_bert4}", "model (checkpoint"),
                            ("global_batch_size=16", "global_batch_size (checkpoint 8, recipe 16)")]:
        proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set",
                               f"output_dir={out}", "--set", override, "--set", "max_steps=6"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines[-1].startswith("lor2c-train: error: checkpoint "), proc.stderr[-2000:]
        assert named in lines[-1] and sum("error" in line for line in lines) == 1, lines[-1]
        assert _snapshot(out) == before, override
    # the task, checked by the same function (pre-flight refuses a BERT for causal_lm before it gets there)
    cfg = load_config(recipe, [f"output_dir={out}", "task=regression", "num_labels=1"])
    tag, state = checkpoint.resume_point(cfg)
    with pytest.raises(ConfigError, match=r"task \(checkpoint 'classification', recipe 'regression'\)"):
        checkpoint.check_resumable(cfg, tag, state)


@needs_assets
def test_truncated_state_is_refused_and_partial_checkpoints_are_not_latest(one_rank_run, tmp_path):
    import shutil

    recipe, src = one_rank_run
    out = tmp_path / "out"
    shutil.copytree(src, out)
    tensors = out / "checkpoints" / "step_4" / checkpoint.TENSORS
    tensors.write_bytes(tensors.read_bytes()[:-100])
    before = _snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(recipe), "--set",
                           f"output_dir={out}", "--set", "max_steps=6"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("lor2c-train: error: ") and "is truncated" in last, proc.stderr
    assert str(tensors) in last and _snapshot(out) == before
    # a tag being written (no run_state.json yet) is never the latest, even if `latest` names it
    partial = out / "checkpoints" / "step_5"
    partial.mkdir()
    shutil.copy(src / "checkpoints" / "step_4" / checkpoint.TENSORS, partial / checkpoint.TENSORS)
    (out / "checkpoints" / "latest").write_text("step_5\n")
    assert checkpoint.latest_complete(out / "checkpoints") == "step_4"


# --- SLURM: preempted on 2 nodes, submitted again on 1 --------------------------------------------------

@pytest.mark.slow
def test_preempted_two_node_job_resubmitted_on_one_node(cluster, tmp_path):
    """A 2-node job (1 rank per node, ZeRO-3, tiny BERT, 24 steps: tiny steps are fast, and the signal
    sent once step 2 is logged must arrive mid-run) preempted after step 2 and requeued is cancelled and submitted
    again with 1 node: it resumes from the 2-rank checkpoint and ends with the weights of an uninterrupted
    1-node run (fp32, no dropout)."""
    import time

    from test_slurm import JOB_TIMEOUT, adapter_weights, job_log, submit, train_rows, wait_done

    from test_distributed import save_tiny_bert

    extra = {"max_steps": 24, "adapter": {"method": "lor2c", "r": 4, "alpha": 8, "dropout": 0.0},
             "model": str(save_tiny_bert(tmp_path / "tiny_bert", layers=2))}  # small: the CPU is shared
    ref = tmp_path / "ref"
    ref.mkdir()
    wait_done(cluster, submit(cluster, "lor2c_1node.sbatch", ref, "per_gpu", nodes=1, **extra), ref)
    work = tmp_path / "work"
    work.mkdir()
    job = submit(cluster, "lor2c_multinode.sbatch", work, "per_gpu", **extra)
    cluster.wait_state(job, {"RUNNING"}, 120)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not any(r["step"] >= 2 for r in train_rows(work / "out")):
        assert time.monotonic() < deadline and cluster.job(job)["JobState"] == "RUNNING", job_log(work, job)[-4000:]
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    info = cluster.wait_state(job, {"PENDING", "COMPLETED", "FAILED"}, 120)
    assert info["JobState"] == "PENDING", job_log(work, job)[-4000:]  # saved and requeued itself
    cluster.run("scancel", str(job))  # the partition is busy: it is submitted again with 1 node instead
    root = work / "out" / "checkpoints"
    stopped = checkpoint.read_run_state(root, checkpoint.latest_complete(root))
    assert stopped["world"] == 2 and 2 <= stopped["step"] < 24
    again = submit(cluster, "lor2c_1node.sbatch", work, "per_gpu", nodes=1, **extra)
    wait_done(cluster, again, work)
    log = job_log(work, again)
    assert "resumed from" in log and "re-seeded" in log, log[-4000:]
    assert [r["step"] for r in train_rows(work / "out")] == list(range(1, 25))
    expected, got = adapter_weights(ref / "out"), adapter_weights(work / "out")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=0, atol=1e-6), name
