"""2-rank ZeRO-3 training smoke on families found by discovery: a dense decoder (Qwen3), an MoE decoder
(Qwen3-MoE, LoRA on attention and LoR2C on the block stream) and an encoder (ModernBERT), each tiny,
three steps through lor2c-train, then exported and loaded back."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_models import family_config
from test_distributed import CHITCHAT, MINILM, POLARITY, SMOLLM, metrics, needs_assets, run_cli, write_recipe

pytestmark = [pytest.mark.slow, needs_assets]

CASES = {
    "qwen3-lor2c": ("qwen3", {"method": "lor2c", "r": 4, "alpha": 8}),
    "qwen3_moe-lora": ("qwen3_moe", {"method": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}),
    "qwen3_moe-lor2c": ("qwen3_moe", {"method": "lor2c", "r": 4, "alpha": 8, "spans": [[0, 1], [2, 2]]}),
    "modernbert-lor2c": ("modernbert", {"method": "lor2c", "r": 4, "alpha": 8}),
}


def save_family(path: Path, family: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    encoder = family == "modernbert"
    tokenizer = AutoTokenizer.from_pretrained(MINILM if encoder else SMOLLM)
    config = family_config(family)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not encoder:
        config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    (AutoModelForSequenceClassification if encoder else AutoModelForCausalLM).from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_two_rank_zero3_training(tmp_path, case):
    from lor2c_ds.export import export, from_pretrained

    family, adapter = CASES[case]
    model = save_family(tmp_path / "model", family)
    if family == "modernbert":
        data = {"path": str(POLARITY), "format": "polarity_csv", "max_length": 32, "max_train_examples": 64,
                "max_eval_examples": 16}
        task = {"task": "classification", "num_labels": 2}
    else:
        data = {"path": str(CHITCHAT), "max_length": 32, "max_train_examples": 64, "max_eval_examples": 8,
                "packing": True}
        task = {"task": "causal_lm"}
    recipe = write_recipe(tmp_path / "recipe.yaml", model=str(model), data=data, adapter=adapter,
                          deepspeed="zero3", nproc=2, global_batch_size=8, micro_batch_size=2, lr=1e-2,
                          log_every=1, max_steps=3, eval_before=False, output_dir=str(tmp_path / "run"), **task)
    run_cli(recipe)
    losses = [r["loss"] for r in metrics(tmp_path / "run", "train")]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and losses[0] != losses[-1], losses
    report = export(tmp_path / "run", model, tmp_path / "export", parity_batches=1)
    assert report["parity"]["passed"], report["parity"]
    assert from_pretrained(tmp_path / "export") is not None
