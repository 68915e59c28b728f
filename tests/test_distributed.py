"""Multi-process DeepSpeed runs on CPU (gloo): the engine's layout, rank-count invariance, the CLI end to
end on the real MiniLM, and the other ZeRO configs. Marked slow; they need `lor2c-assets` to have run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.train import free_port
from lor2c_ds.assets import default_home

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
HOME = default_home()
MINILM = HOME / "models" / "all-MiniLM-L6-v2"
SMOLLM = HOME / "models" / "SmolLM2-135M-Instruct"
POLARITY = HOME / "data" / "polarity-en-pang-lee2.csv"
CHITCHAT = HOME / "data" / "chitchat.jsonl"
CHITCHAT_CHAT = HOME / "data" / "chitchat_chat.jsonl"

needs_assets = pytest.mark.skipif(
    not all(p.exists() for p in (MINILM, SMOLLM, POLARITY, CHITCHAT, CHITCHAT_CHAT)) and not os.environ.get("CI"),
    reason="run lor2c-assets first (CI always does)")


def run_cli(config: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(config)]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"lor2c-train failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def metrics(output_dir: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def save_tiny_bert(path: Path, layers: int) -> Path:
    """A random BERT (hidden 64) with the real MiniLM tokenizer; no dropout, so runs are deterministic."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                             intermediate_size=128, max_position_embeddings=128,
                                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
                                  ).save_pretrained(path)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    return path


def save_tiny_llama(path: Path) -> Path:
    """A random 2-block LLaMA (hidden 64, tied embeddings) with the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=len(tokenizer), tie_word_embeddings=True,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), layers=2)


@pytest.fixture(scope="session")
def tiny_bert4(tmp_path_factory) -> Path:
    """Four blocks: room for merges and injections."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert4"), layers=4)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-block LLaMA with the real SmolLM2 tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


def write_recipe(path: Path, **values) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


def classification_recipe(tmp_path: Path, model: Path, **extra) -> Path:
    base = dict(model=str(model), task="classification",
                data={"path": str(POLARITY), "format": "polarity_csv", "max_length": 32,
                      "max_train_examples": 256, "max_eval_examples": 64},
                adapter={"method": "lor2c", "r": 4, "alpha": 8, "dropout": 0.0},
                global_batch_size=8, micro_batch_size=4, lr=5e-3, log_every=1, max_steps=4, eval_before=False)
    base.update(extra)
    return write_recipe(tmp_path / "recipe.yaml", **base)


@needs_assets
def test_live_engine_partitions_backbone_and_pins_adapters(tmp_path, tiny_bert):
    recipe = classification_recipe(tmp_path, tiny_bert, adapter={"method": "share_lor2c", "r": 4, "alpha": 8})
    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "engine_probe.py"), str(recipe), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["stage"] == 3 and rep["world"] == 2
        for phase in ("before", "after"):
            frozen = [row for row in rep[phase] if not row["trainable"]]
            trainable = [row for row in rep[phase] if row["trainable"]]
            # every frozen weight is split in halves (DeepSpeed pads odd sizes), never held whole
            assert all(row["local_numel"] == -(-row["numel"] // 2) for row in frozen), phase
            assert not any(row["whole"] for row in frozen), phase
            assert trainable and all(row["whole"] for row in trainable), phase
        names = {row["name"] for row in rep["before"] if row["trainable"]}
        assert "lor2c.shared_A.0.weight" in names and sum("shared_A" in n for n in names) == 1
        trainable_numel = sum(row["numel"] for row in rep["before"] if row["trainable"])
        assert rep["stepped_all_trainable"] and rep["stepped_numel"] == trainable_numel
        assert rep["checkpoint_bytes"] < 0.1 * 4 * sum(row["numel"] for row in rep["before"])
        assert rep["restored_client_state"] == 3
        assert rep["resumed"] == pytest.approx(rep["continued"], abs=0, rel=0)
    assert reports[0]["digest"] == reports[1]["digest"]  # ranks never diverge
    assert reports[0]["losses"] == reports[1]["losses"]


@needs_assets
@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_two_ranks_equal_one_rank(tmp_path, tiny_bert, tiny_llama, task):
    if task == "classification":
        recipe = classification_recipe(tmp_path, tiny_bert)
    else:
        recipe = write_recipe(
            tmp_path / "recipe.yaml", model=str(tiny_llama), task="causal_lm",
            data={"path": str(CHITCHAT), "max_length": 48, "max_train_examples": 128, "max_eval_examples": 16,
                  "packing": True},
            adapter={"method": "lor2c", "r": 4, "alpha": 8, "dropout": 0.0},
            global_batch_size=8, micro_batch_size=2, lr=5e-3, log_every=1, max_steps=3, eval_before=False)
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}"
        run_cli(recipe, f"nproc={n}", f"output_dir={out}")
        runs[n] = out
    one, two = ([r["loss"] for r in metrics(runs[n], "train")] for n in (1, 2))
    assert len(one) == len(two) >= 3
    assert torch.allclose(torch.tensor(one), torch.tensor(two), rtol=0, atol=1e-5), (one, two)
    if task == "causal_lm":  # recomputing the blocks in backward changes no number
        run_cli(recipe, "nproc=2", f"output_dir={tmp_path / 'ckpt'}", "activation_checkpointing=true")
        recomputed = [r["loss"] for r in metrics(tmp_path / "ckpt", "train")]
        assert torch.allclose(torch.tensor(recomputed), torch.tensor(two), rtol=0, atol=1e-5), (recomputed, two)
    assert one[0] != one[-1]  # it trained
    e1, e2 = metrics(runs[1], "eval")[-1], metrics(runs[2], "eval")[-1]
    assert e1["loss"] == pytest.approx(e2["loss"], abs=1e-5)


@needs_assets
def test_cli_end_to_end_on_real_minilm(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lor2c_ds import load_adapters
    from lor2c_ds.config import load_config
    from lor2c_ds.data import eval_loader, prepare_data
    from lor2c_ds.evaluation import evaluate
    from lor2c_ds.train import load_tokenizer

    recipe = REPO / "launcher" / "configs" / "minilm_lor2c.yaml"
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "max_steps=12", "log_every=4", "data.max_eval_examples=96"]
    proc = run_cli(recipe, *overrides)
    assert "held-out accuracy: untuned" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # DeepSpeed's resumable checkpoint leaves the 22.7M frozen weights (91 MB in fp32) out: it holds the
    # trainable tensors (the adapters, the head and MiniLM's never-trained pooler) about 4 times in fp32
    # (weights, master copy, Adam's two moments), plus small state files
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_12"
    trainable = int(next(x for x in proc.stdout.splitlines() if x.startswith("trainable params")).split()[2]
                    .replace(",", ""))
    assert trainable == 37_634 + 384 * 384 + 384  # the pooler trains with the head, as one line says once
    assert (proc.stdout + proc.stderr).count("bert.pooler.dense in the checkpoint as initialised") == 1
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    assert 16 * trainable < ckpt_bytes < 16 * trainable + 500_000, (ckpt_bytes, trainable)
    train_rows = metrics(out, "train")
    assert [r["step"] for r in train_rows] == [4, 8, 12]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in train_rows)
    after = metrics(out, "eval")[-1]

    # The saved adapter, loaded into a plain single-process model, reproduces the trained model.
    cfg = load_config(recipe, overrides)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.model, num_labels=2)
    load_adapters(model, out / "adapter")
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, tokenizer)
    plain = evaluate(model, eval_loader(data.eval, data.collator, 32, 0, 1), cfg.task)
    assert plain["accuracy"] == pytest.approx(after["accuracy"], abs=1e-9)
    assert plain["loss"] == pytest.approx(after["loss"], rel=1e-5)


@needs_assets
@pytest.mark.parametrize("ds_config,precision", [("zero2", "fp32"), ("zero3_offload", "bf16"), ("zero3", "bf16")])
def test_other_zero_configs_and_bf16_train(tmp_path, tiny_bert, ds_config, precision):
    recipe = classification_recipe(tmp_path, tiny_bert, deepspeed=ds_config, precision=precision,
                                   adapter={"method": "lora", "r": 4, "alpha": 8})
    out = tmp_path / "run"
    run_cli(recipe, "nproc=2", f"output_dir={out}")
    losses = [r["loss"] for r in metrics(out, "train")]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
