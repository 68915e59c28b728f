"""Bring-your-own data through the whole recipe (2 ranks, ZeRO-3, CPU): chat tuning of the real SmolLM2
on the chit-chat conversations, label maps saved with a run, and the best checkpoint kept."""
from __future__ import annotations

import json

import pytest

from test_distributed import CHITCHAT_CHAT, SMOLLM, metrics, needs_assets, run_cli, tiny_bert, write_recipe  # noqa: F401

pytestmark = [pytest.mark.slow, needs_assets]


def test_chat_tuning_smollm2_lowers_validation_perplexity(tmp_path):
    out = tmp_path / "run"
    choices = tmp_path / "mc.jsonl"
    choices.write_text(json.dumps({"context": "The capital of France is", "choices": [" Paris", " a banana"],
                                   "label": 0}) + "\n")
    questions = tmp_path / "gen.jsonl"
    questions.write_text(json.dumps({"prompt": "What is 2 + 2? End with 'The answer is N'.", "answer": "4"}) + "\n")
    recipe = write_recipe(
        tmp_path / "chat.yaml", model=str(SMOLLM), task="chat",
        data={"path": str(CHITCHAT_CHAT), "max_length": 64, "max_train_examples": 96, "max_eval_examples": 16,
              "on_bad_rows": "skip"},
        eval={"best_metric": "perplexity", "multiple_choice_path": str(choices), "generation_path": str(questions),
              "max_new_tokens": 8},
        adapter={"method": "lor2c", "r": 8, "alpha": 16, "dropout": 0.0}, deepspeed="zero3", nproc=2,
        output_dir=str(out), lr=3e-3, warmup_ratio=0.0, max_steps=6, global_batch_size=8, micro_batch_size=4,
        log_every=1, eval_every=3, save_every=2, keep_checkpoints=1)
    run_cli(recipe)
    evals = metrics(out, "eval")
    before, after = evals[0]["perplexity"], evals[-1]["perplexity"]
    assert after < 0.9 * before, (before, after)
    # Every evaluation also scored the multiple-choice and generation sets, gathered over both ranks.
    assert all({"mc_accuracy", "mc_accuracy_norm", "exact_match"} <= set(e) for e in evals)
    report = json.loads((out / "data_report.json").read_text())["splits"]
    assert report["train"]["rows"] == 96 and report["eval"]["rows"] == 16
    # The best evaluation's checkpoint survives keep_checkpoints=1 beside the newest one.
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert best["metric"] == "perplexity" and best["value"] == pytest.approx(min(e["perplexity"] for e in evals[1:]))
    assert (out / "checkpoints" / best["tag"] / "run_state.json").is_file()
    assert (out / "checkpoints" / "step_6" / "run_state.json").is_file()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert set(kept) == {best["tag"], "step_6"}, kept


def test_label_map_is_saved_with_the_run(tmp_path, tiny_bert):
    rows = [{"review": f"{'great' if i % 2 else 'awful'} film number {i}", "stars": ["top", "flop"][i % 2]}
            for i in range(48)]
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "cls.yaml", model=str(tiny_bert), task="classification", num_labels=2,
        data={"path": str(path), "text_field": "review", "label_field": "stars", "eval_fraction": 0.25,
              "max_length": 16},
        adapter={"method": "lora", "r": 4, "alpha": 8}, nproc=2, output_dir=str(out), max_steps=2,
        global_batch_size=8, micro_batch_size=4, eval_before=False)
    run_cli(recipe)
    assert json.loads((out / "adapter" / "label_map.json").read_text()) == ["flop", "top"]
    state = json.loads((out / "checkpoints" / "step_2" / "run_state.json").read_text())
    assert state["label_names"] == ["flop", "top"]
    assert {"accuracy", "f1", "mcc"} <= set(metrics(out, "eval")[-1])
