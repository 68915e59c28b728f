"""ResLoRA under DeepSpeed ZeRO-3 on 2 CPU ranks: rank-count invariance of the losses, statistics and
merge report, the exact bs merge, and the weights rule with a resumed statistics window. Slow."""
from __future__ import annotations

import json
import math

import pytest
import torch

from test_distributed import (CHITCHAT, classification_recipe, metrics, needs_assets, run_cli,
                              tiny_bert, tiny_llama, write_recipe)

__all__ = ["tiny_bert", "tiny_llama"]  # fixtures, imported for pytest


def run_state(out, tag):
    return json.loads((out / "checkpoints" / tag / "run_state.json").read_text())


@pytest.mark.slow
@needs_assets
def test_two_ranks_equal_one_rank_with_statistics_and_merge_report(tmp_path, tiny_bert):
    """ms, N=1 vs N=2 (fp32, ZeRO-3): losses, the all-ranks statistics and the merge report agree."""
    recipe = classification_recipe(tmp_path, tiny_bert, adapter={
        "method": "reslora", "r": 4, "alpha": 8, "dropout": 0.0, "reslora_variant": "ms", "pre_num": 1})
    runs = {}
    for n in (1, 2):
        runs[n] = tmp_path / f"n{n}"
        run_cli(recipe, f"nproc={n}", f"output_dir={runs[n]}")
    one, two = ([r["loss"] for r in metrics(runs[n], "train")] for n in (1, 2))
    assert len(one) == len(two) == 4 and one[0] != one[-1]
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=0, atol=1e-5), (one, two)
    # the statistics: a window of 4 steps, each the global (all-ranks) sums per module of ||x_t||^2,
    # ||a_t||^2 and the token count (then ||W + s B A||, NaN for ms)
    w1, w2 = (run_state(runs[n], "step_4")["callbacks"]["reslora"] for n in (1, 2))
    assert w1["names"] == w2["names"] and len(w1["window"]) == len(w2["window"]) == 4
    for a, b in zip(w1["window"], w2["window"]):
        assert a[2::4] == b[2::4] and all(t > 0 for t in a[2::4])
        assert a[0::4] == pytest.approx(b[0::4], rel=1e-5) and a[1::4] == pytest.approx(b[1::4], rel=1e-5)
    # the merge's error is reported at the end, for both ms rules, the configured one last
    r1, r2 = metrics(runs[1], "reslora_merge"), metrics(runs[2], "reslora_merge")
    assert [r["merge_rule"] for r in r1] == ["middle", "inputs"] and r1[-1]["configured"]
    for a, b in zip(r1, r2):
        assert a["accuracy_merged"] == pytest.approx(b["accuracy_merged"], abs=1e-9)
        assert a["rel_logit_diff"] == pytest.approx(b["rel_logit_diff"], rel=1e-3, abs=1e-7)
        assert a["rel_logit_diff"] > 0
    assert (runs[2] / "adapter" / "reslora_stats.json").is_file()


@pytest.mark.slow
@needs_assets
def test_bs_merge_is_exact_on_two_ranks(tmp_path, tiny_bert):
    recipe = classification_recipe(tmp_path, tiny_bert, adapter={
        "method": "reslora", "r": 4, "alpha": 8, "dropout": 0.0, "reslora_variant": "bs", "pre_num": 2})
    run_cli(recipe, "nproc=2", f"output_dir={tmp_path / 'run'}")
    (report,) = metrics(tmp_path / "run", "reslora_merge")
    assert report["merge_rule"] == "exact" and report["rel_logit_diff"] <= 1e-5
    assert report["accuracy_merged"] == report["accuracy_train_graph"]


@pytest.mark.slow
@needs_assets
def test_weights_rule_under_zero3_and_statistics_resume(tmp_path, tiny_llama):
    """is with merge by weights gathers the partitioned W; the window is restored on resume."""
    import shutil

    recipe = write_recipe(
        tmp_path / "recipe.yaml", model=str(tiny_llama), task="causal_lm",
        data={"path": str(CHITCHAT), "max_length": 48, "max_train_examples": 128, "max_eval_examples": 16},
        adapter={"method": "reslora", "r": 4, "alpha": 8, "dropout": 0.0, "reslora_variant": "is",
                 "merge_rule": "weights"},
        global_batch_size=8, micro_batch_size=2, lr=5e-3, log_every=1, max_steps=4, save_every=2,
        eval_before=False)
    full = tmp_path / "full"
    run_cli(recipe, "nproc=2", f"output_dir={full}")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    (resumed / "checkpoints" / "latest").write_text("step_2\n")
    run_cli(recipe, "nproc=2", f"output_dir={resumed}")
    a, b = run_state(full, "step_4")["callbacks"]["reslora"], run_state(resumed, "step_4")["callbacks"]["reslora"]
    assert len(a["window"]) == 4 and len(b["window"]) == 4  # two restored steps + two new
    flat_a, flat_b = sum(a["window"], []), sum(b["window"], [])
    assert flat_a == pytest.approx(flat_b, rel=1e-5)
    weights = a["window"][-1][3::4]
    assert all(w > 0 and math.isfinite(w) for w in weights)
    rows = metrics(full, "reslora_merge")
    assert [r["merge_rule"] for r in rows] == ["inputs", "weights"]  # both rules, the configured one last
    report = rows[-1]
    assert report["configured"] and report["rel_logit_diff"] > 0
    assert {"perplexity_train_graph", "perplexity_merged"} <= set(report)


@pytest.mark.slow
@needs_assets
def test_weight_norm_from_partitions_equals_gathered_on_two_ranks(tmp_path):
    """||W + s B A|| from each rank's ZeRO-3 partition (+ one all-reduce) == from the gathered W, within
    1e-6 relative. GPT-2's fused c_attn (Conv1D, 45 x 135: q and v are column chunks) splits mid-row."""
    import subprocess
    import sys

    from transformers import GPT2Config, GPT2LMHeadModel

    from launcher.train import free_port
    from test_distributed import REPO

    torch.manual_seed(0)
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=45, n_layer=3, n_head=3, n_positions=32)).save_pretrained(model_dir)
    recipe = write_recipe(tmp_path / "recipe.yaml", model=str(model_dir), task="causal_lm",
                          data={"path": str(CHITCHAT), "max_length": 16},
                          adapter={"method": "reslora", "r": 4, "alpha": 8, "reslora_variant": "is",
                                   "merge_rule": "weights"},
                          global_batch_size=4, micro_batch_size=2, max_steps=1)
    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "reslora_norm_probe.py"),
           str(recipe), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((tmp_path / f"probe.rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert all(0 < loc < full for loc, full in zip(rep["local"], rep["full"]))  # really partitioned
        assert len(rep["sharded"]) == 6
        for a, b in zip(rep["sharded"], rep["gathered"]):
            assert a == pytest.approx(b, rel=1e-6, abs=0)
    assert reports[0]["sharded"] == reports[1]["sharded"]
