"""lor2c-bench (launcher/bench.py, launcher/bench_peft.py): end to end on a tiny random LLaMA on 1 and 2
ranks under ZeRO-3, and the driver's bookkeeping. Not a timed test: no speed target is asserted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher import bench

REQUIRED = ("model", "task", "method", "ranks", "zero_stage", "precision", "seq", "micro_batch",
            "step_time_median_s", "step_time_min_s", "step_time_max_s", "step_time_iqr_s", "tokens_per_s",
            "peak_rss_bytes", "cuda_max_allocated_bytes", "cuda_max_reserved_bytes", "comm_bytes_per_step",
            "backbone_bytes_per_rank", "trainable_bytes_per_rank", "optimizer_state_bytes_per_rank",
            "trainable_params", "checkpoint_bytes", "vs_floor", "vs_peft_lora")
METHODS = ("floor", "lora", "lor2c", "peft_lora")
RESLORA = ("reslora-is", "reslora-is-weights")


def save_llama(path: Path) -> Path:
    """A random 2-block LLaMA, wide enough (hidden 128) that adapter bytes outweigh checkpoint metadata."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=256, max_position_embeddings=64,
                                 tie_word_embeddings=False)).save_pretrained(path)
    return path


def run_bench(tmp: Path, methods, ranks: str) -> tuple[Path, dict]:
    out = tmp / f"out-{ranks}"
    code = bench.main(["--model", str(tmp / "llama"), "--task", "causal_lm", "--methods", ",".join(methods),
                       "--ranks", ranks, "--zero", "3", "--r", "16", "--seq", "16", "--micro-batch", "2",
                       "--steps", "2", "--warmup", "1", "--comm-steps", "1", "--out", str(out)])
    assert code == 0
    return out, json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """Every method on 2 ranks; the floor (the halving check needs one method) on 1 rank."""
    tmp = tmp_path_factory.mktemp("bench")
    save_llama(tmp / "llama")
    out, two = run_bench(tmp, METHODS + RESLORA, "2")
    _, one = run_bench(tmp, ("floor",), "1")
    return out, two, one["records"]


@pytest.mark.slow
def test_bench_records(bench_run):
    out, result, one_rank = bench_run
    records = {(r["method"], r["ranks"]): r for r in result["records"] + one_rank}
    assert set(records) == {(m, 2) for m in METHODS + RESLORA} | {("floor", 1)}
    assert {"hostname", "cpu_model", "cores", "torch", "deepspeed", "transformers", "peft", "device"} <= set(
        result["machine"])
    for (method, ranks), r in records.items():
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, (method, ranks, missing)
        assert r["zero_stage"] == 3 and r["task"] == "causal_lm" and r["precision"] == "fp32"
        assert 0 < r["step_time_min_s"] <= r["step_time_median_s"] <= r["step_time_max_s"]
        assert r["step_time_iqr_s"] >= 0 and r["tokens_per_s"] > 0
        for key in ("peak_rss_bytes", "backbone_bytes_per_rank", "trainable_bytes_per_rank",
                    "optimizer_state_bytes_per_rank"):
            assert len(r[key]) == ranks and all(v > 0 for v in r[key]), (method, key)
        assert all(v > 100e6 for v in r["peak_rss_bytes"])  # a process with torch loaded
        assert r["cuda_max_allocated_bytes"] is None and r["cuda_max_reserved_bytes"] is None  # CPU
        # the fp32 master copy and two Adam moments of the trainable tensors, split over the ranks
        assert sum(r["optimizer_state_bytes_per_rank"]) == pytest.approx(12 * r["trainable_params"], rel=0.01)
        # gradients: only the trainable tensors are reduced (ZeRO-3 reduce-scatter), never the backbone
        assert r["comm_bytes_per_step"]["reduce_scatter"] == pytest.approx(4 * r["trainable_params"], rel=0.01)
        assert r["grad_reduce_bytes_per_step"] == r["comm_bytes_per_step"]["reduce_scatter"]
        if ranks == 2:
            # the frozen backbone is gathered, and that is all the traffic there is
            assert r["comm_bytes_per_step"]["all_gather"] >= r["backbone_bytes"]
            assert r["comm_vs_backbone"] <= 2.1
        else:  # one rank holds the whole backbone: at most the trainable tensors are re-gathered
            assert r["comm_bytes_per_step"].get("all_gather", 0) <= 4 * r["trainable_params"]
        if method != "floor":  # the floor trains one d-vector: its checkpoint is metadata
            assert 0.5 < r["checkpoint_ratio"] <= 1.1, (method, ranks, r["checkpoint_ratio"])
        assert r["checkpoint_bytes"] > 0
        assert r["vs_floor"] > 0
    one, two = records[("floor", 1)], records[("floor", 2)]
    assert two["backbone_bytes_per_rank"][0] == pytest.approx(one["backbone_bytes_per_rank"][0] / 2, rel=0.01)
    assert one["backbone_bytes_per_rank"][0] == one["backbone_bytes"]
    assert records[("floor", 2)]["vs_floor"] == 1.0 and records[("peft_lora", 2)]["vs_peft_lora"] == 1.0
    # the baseline adapts the same projections with the same rank
    assert records[("peft_lora", 2)]["trainable_params"] == records[("lora", 2)]["trainable_params"]
    assert records[("floor", 2)]["trainable_params"] == 128  # the d-vector

    assert all(t["met"] for t in result["targets"] if t["target"].startswith(("bytes communicated",
                                                                             "adapter checkpoint")))
    table = (out / "bench.md").read_text()
    assert all(f"| {m} | 2 | 3 |" in table for m in METHODS + RESLORA) and "| target |" in table
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_pinned_trainable_tensors_are_regathered_in_one_collective(bench_run):
    """ZeRO-3 re-gathers the pinned (persistent) trainable tensors after every step. DeepSpeed's
    persistent-list gather launches one collective per tensor; lor2c_ds routes it through the coalesced
    gather, so a method with 2 adapted projections per block makes as many all-gathers per step as the
    floor, which trains one tensor."""
    _, result, _ = bench_run
    calls = {r["method"]: sum(n for name, n in r["comm_calls_per_step"].items() if "all_gather" in name)
             for r in result["records"]}
    assert calls["floor"] >= 1
    for method in ("lora", "lor2c", *RESLORA):
        assert calls[method] == calls["floor"], calls


@pytest.mark.slow
def test_reslora_is_gathers_what_lora_gathers(bench_run):
    """Item 1's invariant: ResLoRA-is, with either merge rule, all-gathers per step the bytes LoRA does
    (within 1%): its ||W + s B A|| statistic reads each rank's own partition and gathers no weight."""
    _, result, _ = bench_run
    gathered = {r["method"]: r["comm_bytes_per_step"]["all_gather"] for r in result["records"]}
    assert gathered["lora"] > 0
    for method in RESLORA:
        assert gathered[method] == pytest.approx(gathered["lora"], rel=0.01), gathered
    checks = [t for t in result["targets"] if t["target"].startswith("ResLoRA all-gather bytes")]
    assert {t["method"] for t in checks} == set(RESLORA) and all(t["met"] for t in checks)


def _result(method, round_, times, ranks=2):
    sizes = {"backbone": 50, "backbone_whole": 100, "trainable": 40, "trainable_partition": 20,
             "trainable_numel": 10, "optimizer_state": 60, "peak_rss_bytes": 1000,
             "cuda_max_allocated_bytes": None, "cuda_max_reserved_bytes": None}
    return {"method": method, "round": round_, "ranks": ranks, "zero": 3, "zero_stage": 3, "times": times,
            "comm": {"bytes": {"all_gather": 200, "reduce_scatter": 40}, "message_bytes": {}, "calls": {}},
            "per_rank": [sizes] * ranks, "checkpoint_bytes": 150 if round_ == 0 else None}


def test_ratios_pair_rounds_and_targets():
    """A method's ratio is the median over rounds of its round median over the reference's."""
    args = bench.parse_args(["--model", "m", "--out", "o", "--comm-steps", "2"])
    results = [_result("floor", 0, [1.0, 1.0, 1.2]), _result("lor2c", 0, [1.1, 1.1, 1.0]),
               _result("floor", 1, [2.0, 2.0]), _result("lor2c", 1, [2.0, 2.0]),
               _result("floor", 2, [1.0]), _result("lor2c", 2, [1.5])]
    records = {r["method"]: r for r in bench.build_records(results, args)}
    assert records["lor2c"]["vs_floor_rounds"] == pytest.approx([1.1, 1.0, 1.5])
    assert records["lor2c"]["vs_floor"] == pytest.approx(1.1)
    assert records["lor2c"]["vs_peft_lora"] is None
    assert records["lor2c"]["comm_bytes_per_step"] == {"all_gather": 100, "reduce_scatter": 20}
    assert records["lor2c"]["checkpoint_ratio"] == pytest.approx(150 / (40 + 2 * 60))
    assert records["lor2c"]["step_time_median_s"] == pytest.approx(1.3)  # every round's steps pooled
    targets = bench.check_targets(list(records.values()))
    lor2c = [t for t in targets if t["target"].startswith("LoR2C")]
    assert len(lor2c) == 1 and not lor2c[0]["met"]
    assert "floor" not in {t["method"] for t in targets if t["target"].startswith("adapter checkpoint")}


@pytest.mark.parametrize("argv,message", [
    (["--methods", "floor,nope"], "unknown method"),
    (["--methods", "lora,lora"], "twice"),
    (["--zero", "4"], "--zero"),
    (["--steps", "0"], "--steps"),
    (["--ds-config", "zero3_offload", "--zero", "2"], "use it with --zero 3"),
    (["--ds-config", "no_such_config"], "not found"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert bench.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_model_and_busy_out(tmp_path, capsys):
    assert bench.main(["--model", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    assert bench.main(["--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err
