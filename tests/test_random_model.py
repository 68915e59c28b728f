"""lor2c-random-model (launcher/random_model.py): a random-init checkpoint with a real model's shape."""
from __future__ import annotations

import json

import torch

from launcher import random_model


def test_writes_a_loadable_bf16_checkpoint_of_the_given_shape(tmp_path):
    shape = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
             "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 256, "max_position_embeddings": 128, "tie_word_embeddings": True}
    (tmp_path / "shape.json").write_text(json.dumps(shape))
    out = tmp_path / "model"
    assert random_model.main(["--shape", str(tmp_path / "shape.json"), "--out", str(out), "--max-shard-size", "50KB"]) == 0
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded, as hub checkpoints ship
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.vocab_size) == (64, 2, 2, 256)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out, dtype="auto").parameters()} == {torch.bfloat16}
    # seed 0: the same shape gives the same weights
    again = tmp_path / "again"
    assert random_model.main(["--shape", str(tmp_path / "shape.json"), "--out", str(again)]) == 0
    a, b = (AutoModelForCausalLM.from_pretrained(d) for d in (out, again))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_shipped_1b_shape_resolves_and_bad_input_exits_2(tmp_path, capsys):
    from launcher.plan import resolve_model_config

    config, _ = resolve_model_config("tinyllama-1.1b")
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (2048, 22, 5632)
    assert random_model.main(["--shape", "no-such-shape", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'no-such-shape'" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert random_model.main(["--shape", "tinyllama-1.1b", "--out", str(busy)]) == 2
    assert "not an empty directory" in capsys.readouterr().err and (busy / "keep.txt").read_text() == "mine"
