"""lor2c-plan: the planner on a tiny config and on every shipped shape, its JSON, bad input, --validate,
and (slow) its memory and communication predictions against a real ZeRO-3 engine at 1 and 2 ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.plan import main, shipped_shapes

REPO = Path(__file__).resolve().parents[1]
# published parameter counts (the shapes' model cards) and LoR2C r = 8: 2 r d L
PUBLISHED = {"llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
             "llama-3-8b": 8_030_261_248, "qwen2-7b": 7_615_616_512, "qwen2-0.5b": 494_032_768,
             "tinyllama-1.1b": 1_100_048_384}
CLUSTER = ["--nodes", "2", "--gpus-per-node", "8", "--gpu-mem", "80", "--net-gbps", "400"]
MEMORY_KEYS = {"backbone", "hpz_secondary", "trainable", "trainable_partition", "optimizer_state", "gradients",
               "buffers", "gathered"}
OPTION_KEYS = {"activations_saved", "activations_transient", "activations", "total", "fits", "max_micro_batch",
               "compute_s", "step_s_no_overlap", "step_s_full_overlap"}
COMM_KEYS = {"what", "collective", "group", "bytes", "message_bytes", "wire_bytes_per_rank",
             "inter_node_bytes_per_node", "time_s"}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}


def plan_json(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "plan.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def check_fields(plan: dict) -> None:
    assert {"label", "model", "cluster", "workload", "zero", "gathers", "compute_flops_per_step", "layouts",
            "recommendation"} <= set(plan)
    for name, layout in plan["layouts"].items():
        assert set(layout["memory"]) == MEMORY_KEYS, name
        assert all(v >= 0 for v in layout["memory"].values())
        for opt in ("no_checkpointing", "checkpointing"):
            assert set(layout["options"][opt]) == OPTION_KEYS
        for c in layout["comm"]:
            assert set(c) == COMM_KEYS
        assert {"comm_bytes_per_step", "comm_message_bytes_per_step", "comm_time_s", "fixed_bytes"} <= set(layout)
    rec = plan["recommendation"]
    assert rec["layout"] in plan["layouts"] and plan["layouts"][rec["layout"]]["runnable"]
    assert rec["reasons"] and rec["micro_batch"] >= 1 and rec["total_bytes"] <= rec["usable_bytes"]


@pytest.mark.parametrize("name", shipped_shapes())
def test_every_shipped_shape(name, tmp_path, capsys):
    plan = plan_json(tmp_path, "--model-config", name, *CLUSTER, "--method", "lor2c", "--seq", "2048")
    check_fields(plan)
    m = plan["model"]
    assert m["backbone_params"] == PUBLISHED[name]
    assert m["trainable_params"] == 2 * 8 * m["hidden_size"] * m["num_hidden_layers"]
    assert set(plan["layouts"]) == {"zero2", "zero3", "hpz", "mics"}
    z3 = plan["layouts"]["zero3"]
    # ZeRO-3 shards the backbone over 16 ranks, hpZ adds a node-local (/ 8) copy, MiCS shards over 8
    assert z3["memory"]["backbone"] == pytest.approx(2 * PUBLISHED[name] / 16, rel=1e-3)
    assert plan["layouts"]["hpz"]["memory"]["hpz_secondary"] == pytest.approx(2 * PUBLISHED[name] / 8, rel=1e-3)
    # forward gathers the whole bf16 backbone (and prefetches some of what backward needs), backward
    # gathers again what was released: at most the backbone twice; no collective reduces its gradients
    fwd, bwd = (next(c for c in z3["comm"] if c["what"] == f"backbone all-gather, {phase}")["bytes"]
                for phase in ("forward", "backward"))
    assert 2 * PUBLISHED[name] <= fwd * 1.001 and fwd + bwd <= 2 * 2 * PUBLISHED[name] * 1.001
    assert z3["comm_bytes_per_step"]["reduce_scatter"] == 2 * m["trainable_params"]
    out = capsys.readouterr().out
    assert "recommendation: deepspeed:" in out and "memory per GPU" in out


def test_tiny_config_and_model_directory(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lor2c_ds.adapters import AdapterConfig, apply_adapters

    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY))
    plan = plan_json(tmp_path, "--model-config", str(model_dir), "--nodes", "1", "--gpus-per-node", "2",
                     "--gpu-mem", "4", "--net-gbps", "100", "--method", "lora", "--seq", "32", "--micro-batch", "2",
                     "--precision", "fp32")
    check_fields(plan)
    assert set(plan["layouts"]) == {"zero2", "zero3"}  # one node: hpZ and MiCS are plain ZeRO-3
    real = apply_adapters(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})),
                          AdapterConfig(method="lora", r=8, alpha=16))
    assert plan["model"]["trainable_params"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan["model"]["backbone_params"] == sum(p.numel() for p in real.parameters() if not p.requires_grad)
    z3 = plan["layouts"]["zero3"]
    halves = sum(-(-p.numel() // 2) for p in real.parameters() if not p.requires_grad)
    assert z3["memory"]["backbone"] == 4 * halves  # ZeRO pads each tensor to a multiple of the ranks
    assert z3["memory"]["optimizer_state"] == 12 * sum(-(-p.numel() // 2) for p in real.parameters()
                                                       if p.requires_grad)
    # a model this small stays gathered across forward and backward: nothing is fetched twice
    assert plan["gathers"]["backward_params"] == 0
    assert z3["comm_bytes_per_step"]["all_gather"] == 2 * 4 * halves + 4 * plan["model"]["trainable_params"]


def test_encoder_config_plans_classification(tmp_path):
    bert = {"model_type": "bert", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 500, "max_position_embeddings": 64}
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(bert))
    plan = plan_json(tmp_path, "--model-config", str(path), "--nodes", "1", "--gpus-per-node", "2",
                     "--gpu-mem", "8", "--net-gbps", "100", "--method", "share_lor2c", "--seq", "64")
    check_fields(plan)
    # ShareLoR2C: one shared A (r d) and a B per block (L r d), plus the classifier head (d x 2 + 2)
    assert plan["model"]["task"] == "classification"
    assert plan["model"]["trainable_params"] == 8 * 64 + 2 * 8 * 64 + 64 * 2 + 2


def test_default_zero_knobs_are_the_shipped_zero3_config():
    from lor2c_ds.planner import DEFAULT_ZERO

    zero = json.loads((REPO / "ds_configs" / "zero3.json").read_text())["zero_optimization"]
    assert {k: float(zero[k]) for k in DEFAULT_ZERO} == DEFAULT_ZERO


@pytest.mark.parametrize("argv, message, code", [
    (["--model-config", "/nonexistent/config.json"], "not found", 2),
    (["--model-config", "llama-9t"], "unknown model 'llama-9t'", 2),
    (["--model-config", "llama-2-7b", "--method", "dora"], "unknown adapter.method", 2),
    (["--model-config", "llama-2-7b", "--nodes", "0"], "--nodes must be a positive integer", 2),
    (["--model-config", "llama-2-70b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "24"],
     "does not fit", 3),
    (["--validate", "/nonexistent/bench.json"], "--validate", 2),
])
def test_bad_input_is_one_clear_message(argv, message, code, capsys):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("lor2c-plan: error:") and message in err, err


def test_bad_model_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model-config", str(tmp_path / "empty")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["--model-config", str(tmp_path / "bad.json")]) == 2
    assert "not readable JSON" in capsys.readouterr().err
    (tmp_path / "other.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    assert main(["--model-config", str(tmp_path / "other.json")]) == 2
    assert "not supported" in capsys.readouterr().err


def test_does_not_fit_says_how_many_gpus(capsys):
    assert main(["--model-config", "llama-2-70b", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem", "40"]) == 3
    err = capsys.readouterr().err
    assert "ZeRO-3 needs at least" in err and "GPUs of this size" in err


def handmade_record(tmp_path: Path, **changes) -> Path:
    """A bench.json (launcher/bench.py's layout) for the tiny model, values worked out by hand."""
    model_dir = tmp_path / "tiny"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(TINY))
    # tiny LLaMA: embeddings 64,000 (tied), per block 36,992 (q 4096, k 2048, v 2048, o 4096, 3 x 8192 MLP,
    # 2 x 64 norms) -> 138,048 frozen; LoR2C r=8: 2 x 2 x 8 x 64 = 2,048 trainable, fp32
    record = {"model": str(model_dir), "task": "causal_lm", "method": "lor2c", "r": 8, "ranks": 2,
              "zero_stage": 3, "precision": "fp32", "seq": 32, "micro_batch": 2,
              "backbone_bytes_per_rank": [4 * 138_048 // 2] * 2, "trainable_bytes_per_rank": [4 * 2048] * 2,
              "optimizer_state_bytes_per_rank": [12 * 2048 // 2] * 2,
              "comm_bytes_per_step": {"all_gather": 4 * (138_048 + 2048), "reduce_scatter": 4 * 2048,
                                      "all_reduce": 16},
              "peak_rss_bytes": [600_000_000, 600_000_000], "cuda_max_allocated_bytes": None, **changes}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"machine": {}, "records": [record, {**record, "method": "floor"}]}))
    return path


def test_validate_handmade_bench_json(tmp_path, capsys):
    assert main(["--validate", str(handmade_record(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "backbone_bytes_per_rank" in out and "+0.0%" in out and "not modelled" in out
    wrong = handmade_record(tmp_path, backbone_bytes_per_rank=[100_000, 100_000])
    assert main(["--validate", str(wrong)]) == 1
    assert "largest relative error of the checked fields: 176.1%" in capsys.readouterr().out


@pytest.mark.slow
def test_predictions_match_a_real_zero3_engine(tmp_path):
    """1 and 2 ranks of a real DeepSpeed ZeRO-3 engine on a random tiny LLaMA (tests/plan_probe.py): the
    per-rank backbone, adapter and optimizer bytes, the collectives and the saved activations."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.train import free_port
    from lor2c_ds.planner import Cluster, Workload, compare, make_plan

    model_dir = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"})).save_pretrained(model_dir)
    records = []
    for ranks in (1, 2):  # one after the other (concurrent first runs would race to JIT-build DeepSpeed's
        # comm op); one rank needs no launcher (as launcher/bench.py runs it)
        out = tmp_path / f"rank{ranks}.json"
        probe = [str(REPO / "tests" / "plan_probe.py"), str(model_dir), "lor2c", str(out), "--seq", "32",
                 "--micro-batch", "2"]
        env = dict(os.environ)
        if ranks == 1:
            cmd = [sys.executable, *probe]
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}", *probe]
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records.append(json.loads(out.read_text()))
    for record in records:
        plan = make_plan(json.loads((model_dir / "config.json").read_text()),
                         Cluster(nodes=1, gpus_per_node=record["ranks"], gpu_mem_gib=1e3, net_gbps=100),
                         Workload(method="lor2c", r=8, seq=32, micro_batch=2, precision="fp32"),
                         layouts=("zero3",))
        errors = {row["field"]: row["rel_error"] for row in compare(plan, record) if row["checked"]}
        for field in ("backbone_bytes_per_rank", "trainable_bytes_per_rank", "optimizer_state_bytes_per_rank",
                      "comm_bytes_per_step reduce_scatter", "activation_bytes"):
            assert abs(errors[field]) <= 0.15, (record["ranks"], field, errors)
        if record["ranks"] == 2:
            assert abs(errors["comm_bytes_per_step all_gather"]) <= 0.15, errors
    (tmp_path / "records.json").write_text(json.dumps(records))
    assert main(["--validate", str(tmp_path / "records.json")]) == 0


def test_every_shipped_ds_config_knob_is_documented_and_checked(tmp_path, capsys):
    """ds_configs/README.md has a row per knob; lor2c-plan rejects an undocumented knob, a stray "auto"
    and an hpZ partition that does not divide a node, and warns on unpinned offload / no overlap."""
    from launcher import plan as cli

    for path in sorted((REPO / "ds_configs").glob("*.json")):
        assert cli.check_zero_config(str(path), gpus_per_node=8) == [], path.name
    base = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())

    def write(**zero):
        cfg = json.loads(json.dumps(base))
        cfg["zero_optimization"].update(zero)
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    args = ["--model-config", "llama-2-7b", "--gpus-per-node", "8"]
    for zero, message in [({"mystery_knob": 1}, "no row in ds_configs/README.md"),
                          ({"reduce_bucket_size": "auto"}, "which only"),
                          ({"zero_hpz_partition_size": 3}, "does not divide the 8 GPUs")]:
        assert cli.main([*args, "--zero-config", write(**zero)]) == 2
        assert message in capsys.readouterr().err
    off = write(overlap_comm=False, offload_param={"device": "cpu", "pin_memory": False})
    assert cli.main([*args, "--zero-config", off]) == 0
    err = capsys.readouterr().err
    assert "overlap_comm is false" in err and "offload_param.pin_memory is false" in err


def test_auto_knobs_resolve_from_the_accelerator_and_the_node(monkeypatch):
    import torch

    from lor2c_ds import engine as ds

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    cfg = {"zero_optimization": {"overlap_comm": "auto", "zero_hpz_partition_size": "auto",
                                 "offload_param": {"device": "cpu", "pin_memory": "auto"}}}
    zero = ds.resolve_auto_knobs(cfg)["zero_optimization"]
    cuda = torch.cuda.is_available()
    assert zero == {"overlap_comm": cuda, "zero_hpz_partition_size": 4,
                    "offload_param": {"device": "cpu", "pin_memory": cuda}}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert ds.gpus_per_node() == 8
