"""Hand-written pre-flight cases: the mistakes users make that a field's type and range do not show (the
model directory's files, the DeepSpeed JSON, the world size and the batch split, the event schedule,
the labels, the row lengths, the checkpoint to resume), and the warnings pre-flight says once.

Each bad case runs `launcher.train.main` in this process (see test_bad_recipes): exit code 2, one
`lor2c-train: error:` line naming the problem, the output directory untouched."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from test_bad_recipes import _check, _recipe, _snapshot, assets, in_process  # noqa: F401 (fixtures)
from test_cli_errors import KEEP_NAME, KEEP_TEXT


@pytest.fixture
def case(assets, tmp_path, in_process, capsys):  # noqa: F811 (fixtures)
    """case(recipe changes, expected text, env=...) -> the error line, after the common checks."""
    root, model_dir = assets

    def run(changes: dict, expected: str, field: str | None = None, env: dict | None = None,
            model: Path | None = None) -> str:
        out = tmp_path / "out"
        if not out.exists():
            out.mkdir()
            (out / KEEP_NAME).write_text(KEEP_TEXT)
        recipe = _recipe(root, model or model_dir, out)
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = recipe
            for part in parents:
                node = node[part]
            node[leaf] = value
        config = tmp_path / "recipe.yaml"
        config.write_text(json.dumps(recipe))
        before = _snapshot(out)
        import os
        os.environ.update(env or {})
        logging.root.handlers.clear()
        rc = in_process(["--config", str(config)])
        err = capsys.readouterr().err
        _check(rc, err, field or expected, out, before)
        line = err.splitlines()[-1]
        assert expected in line, line
        return line

    return run


def _model_copy(model_dir: Path, dest: Path, skip=()) -> Path:
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name not in skip:
            shutil.copy(f, dest / f.name)
    return dest


# -- the model directory -----------------------------------------------------------------------------

def test_weights_missing(case, assets, tmp_path):
    model = _model_copy(assets[1], tmp_path / "m", skip={"model.safetensors"})
    line = case({}, "holds no weights", "model", model=model)
    assert str(model) in line  # the directory it means


def test_weights_truncated(case, assets, tmp_path):
    model = _model_copy(assets[1], tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) - 1000])
    line = case({}, "is damaged: truncated", "model", model=model)
    assert f"{len(data) - 1000}" in line


def test_weights_header_cut(case, assets, tmp_path):
    model = _model_copy(assets[1], tmp_path / "m")
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:100])
    line = case({}, "is damaged", "model", model=model)
    assert str(model) in line  # the directory it means


def test_weight_index_names_a_missing_shard(case, assets, tmp_path):
    model = _model_copy(assets[1], tmp_path / "m", skip={"model.safetensors"})
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    line = case({}, "names shard(s) ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'] that are "
         "missing", "model", model=model)
    assert str(model) in line  # the directory it means


def test_config_json_broken(case, assets, tmp_path):
    model = _model_copy(assets[1], tmp_path / "m")
    (model / "config.json").write_text("{not json")
    line = case({}, "config.json cannot be read", "model", model=model)
    assert str(model) in line  # the directory it means


def test_tokenizer_missing(case, assets, tmp_path):
    """transformers 5 builds an empty tokenizer from the config alone: pre-flight refuses it."""
    model = _model_copy(assets[1], tmp_path / "m", skip={"tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                        "special_tokens_map.json"})
    line = case({}, "has no tokenizer", "model", model=model)
    assert str(model) in line  # the directory it means


def test_unknown_lora_target_found_on_the_meta_model(case):
    line = case({"adapter.method": "lora", "adapter.targets": ["q", "nope"]}, "unknown LoRA target(s) ['nope']", "LoRA target")
    assert line.startswith("lor2c-train: error: ") and line.count("lor2c-train: error:") == 1


def test_unknown_module_to_save(case):
    line = case({"adapter.modules_to_save": ["no_such_head"]}, "adapter.modules_to_save names 'no_such_head'")
    assert line.startswith("lor2c-train: error: ") and line.count("lor2c-train: error:") == 1


def test_rows_longer_than_the_model_positions(case, assets, tmp_path):
    long = tmp_path / "long.csv"
    long.write_text("text,label\n" + "".join(f"{' '.join(['good movie'] * 60)} {i},{i % 2}\n" for i in range(8)))
    line = case({"data.path": str(long), "data.max_length": 200}, "but the model has 64 positions", "data.max_length")
    assert line.startswith("lor2c-train: error: ") and line.count("lor2c-train: error:") == 1


# -- DeepSpeed JSON ----------------------------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    ({"optimizer": {"type": "SGD"}, "zero_optimization": {"stage": 3}}, "sets ['optimizer']; these come from the training recipe"),
    ({"train_batch_size": 64}, "sets ['train_batch_size']"),
    ({"zero_optimization": {"stage": 4}}, "stage is 0, 1, 2 or 3"),
    ([1, 2], "must hold a JSON object, not list"),
    ("{broken", "is not valid JSON"),
], ids=["optimizer", "batch", "stage4", "list", "broken"])
def test_deepspeed_json(case, tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    case({"deepspeed": str(path)}, expected, "deepspeed")


# -- world size and batch ----------------------------------------------------------------------------

def test_nproc_3_does_not_split_the_batch(case):
    line = case({"nproc": 3, "global_batch_size": 32, "micro_batch_size": 16},
         "global_batch_size=32 does not split over 3 ranks (nproc=3)", "global_batch_size")
    assert "multiple of micro_batch_size x ranks = 48" in line  # what the split would need


def test_nproc_3_micro_batch_does_not_divide(case):
    line = case({"nproc": 3, "global_batch_size": 6, "micro_batch_size": 4}, "micro_batch_size", "micro_batch_size")
    assert "valid micro_batch_size values: [1, 2]" in line


def test_micro_batch_larger_than_global(case):
    line = case({"global_batch_size": 32, "micro_batch_size": 64}, "micro_batch_size=64 is larger than global_batch_size=32")
    assert line.count("lor2c-train: error:") == 1


def test_world_size_from_the_launcher_environment(case):
    line = case({"global_batch_size": 4, "micro_batch_size": 2}, "(WORLD_SIZE=3)", "global_batch_size",
         env={"WORLD_SIZE": "3", "RANK": "0"})
    assert "nproc" not in line  # the launcher's world size, not the recipe's


def test_world_size_from_slurm_ntasks(assets, tmp_path):
    from launcher.preflight_checks import check_batch, planned_world_size
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.config import load_config

    root, model_dir = assets
    config = tmp_path / "r.yaml"
    config.write_text(json.dumps(_recipe(root, model_dir, tmp_path / "out")))
    cfg = load_config(config)
    assert planned_world_size(cfg, {"SLURM_NTASKS": "3", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}) == (3, "SLURM_NTASKS=3")
    assert planned_world_size(cfg, {"SLURM_NTASKS": "3"}) == (1, "nproc=1")  # not inside a step: nproc
    assert planned_world_size(cfg, {"LOR2C_SLURM_TASKS": "per_node", "SLURM_STEP_ID": "0", "SLURM_NNODES": "2",
                                    "SLURM_NTASKS": "2"}) == (2, "nproc=1 x SLURM_NNODES=2")
    with pytest.raises(ConfigError, match=r"does not split over 3 ranks \(SLURM_NTASKS=3\)"):
        check_batch(cfg, 3, "SLURM_NTASKS=3")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE='x' is not a number of ranks"):
        planned_world_size(cfg, {"WORLD_SIZE": "x"})


def test_nproc_3_with_a_fitting_batch_passes(assets, tmp_path):
    from launcher.train import preflight
    from lor2c_ds.config import load_config

    root, model_dir = assets
    config = tmp_path / "r.yaml"
    config.write_text(json.dumps({**_recipe(root, model_dir, tmp_path / "out"), "nproc": 3,
                                  "global_batch_size": 6, "micro_batch_size": 2}))
    preflight(load_config(config), env={})
    assert not (tmp_path / "out").exists()


# -- the event schedule, labels, data ----------------------------------------------------------------

def test_merges_that_never_fire_with_default_epochs(case):
    """epochs: 1 with any merge under the reference schedule (event_schedule: epochs) fires after the first
    epoch, at the end; the default schedule (quarter) fires in the first quarter, but not in a run too short."""
    line = case({"adapter.merges": 1, "adapter.event_schedule": "epochs", "max_steps": None},
                "would fire at step", "adapter.merges")
    assert "steps per epoch, epochs=1" in line
    case({"adapter.merges": 2, "max_steps": 7}, "needs at least 8 optimizer steps", "adapter.merges")


def test_injection_schedule_by_steps_passes(assets, tmp_path):
    from launcher.train import preflight
    from lor2c_ds.config import load_config

    root, model_dir = assets
    config = tmp_path / "r.yaml"
    recipe = _recipe(root, model_dir, tmp_path / "out")
    recipe.update(max_steps=3)
    recipe["adapter"].update(merges=1, event_every_steps=1)
    config.write_text(json.dumps(recipe))
    assert preflight(load_config(config), env={}) is None  # no ConfigError
    assert not (tmp_path / "out").exists()  # and pre-flight wrote nothing


def test_label_column_mixing_numbers_and_strings(case, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"text": f"good movie {i}", "label": 1 if i % 2 else "pos"}) + "\n"
                            for i in range(10)))
    line = case({"data.path": str(path), "data.format": "jsonl"}, "mixes numbers and strings (e.g. 1 and 'pos')",
         "data.label_field")
    assert str(path) in line or "train split" in line


def test_more_label_values_than_num_labels(case, tmp_path):
    path = tmp_path / "three.csv"
    path.write_text("text,label\n" + "".join(f"good movie {i},{i % 3}\n" for i in range(12)))
    line = case({"data.path": str(path)}, "num_labels=2, but the train split", "num_labels")
    assert "3" in line.split("num_labels=2", 1)[1]  # the values it found


def test_broken_multiple_choice_file(case, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("{not json\n")
    line = case({"eval.multiple_choice_path": str(path)}, "not valid JSON", "eval.multiple_choice_path")
    assert str(path) in line


def test_chat_form_multiple_choice_needs_a_chat_template_before_training(case, tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "choices": ["a", "b"],
                                "label": 0}) + "\n")
    line = case({"eval.multiple_choice_path": str(path)}, "in chat form need a tokenizer with a chat template",
                "eval.multiple_choice_path")
    assert str(path) in line


# -- resuming --------------------------------------------------------------------------------------

def _checkpointed_run(out: Path, saved_recipe: dict, run_state: str = '{"step": 1, "epoch": 0}') -> None:
    tag = out / "checkpoints" / "step_1"
    tag.mkdir(parents=True)
    (tag / "run_state.json").write_text(run_state)
    (out / "train_config.json").write_text(json.dumps(saved_recipe))


def test_resume_with_another_adapter(case, assets, tmp_path):
    from lor2c_ds.config import load_config

    root, model_dir = assets
    config = tmp_path / "saved.yaml"
    config.write_text(json.dumps(_recipe(root, model_dir, tmp_path / "out")))
    saved = load_config(config, ["adapter.r=8"]).to_dict()
    (tmp_path / "out").mkdir()
    _checkpointed_run(tmp_path / "out", saved)
    line = case({"overwrite_output_dir": False}, "adapter.r=4, but the checkpoint", "adapter.r")
    assert "was trained with 8" in line


def test_resume_from_an_unreadable_run_state(case, assets, tmp_path):
    (tmp_path / "out").mkdir()
    _checkpointed_run(tmp_path / "out", {}, run_state="{truncated")
    case({"overwrite_output_dir": False}, "cannot be read", "output_dir")


# -- warnings said once --------------------------------------------------------------------------------

def test_warnings_said_once(assets, tmp_path, caplog):
    """No pad token, an odd r with injections, truncated rows: one line each from pre-flight."""
    from transformers import AutoTokenizer

    from launcher.train import preflight
    from lor2c_ds.config import load_config

    root, model_dir = assets
    model = _model_copy(model_dir, tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(model)
    recipe = _recipe(root, model, tmp_path / "out")
    recipe["data"]["max_length"] = 3
    recipe["adapter"].update(r=3, injections=1, event_every_steps=1)
    recipe["max_steps"] = 2
    config = tmp_path / "r.yaml"
    config.write_text(json.dumps(recipe))
    with caplog.at_level(logging.WARNING):
        preflight(load_config(config), env={})
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("has no pad token" in m for m in said) == 1, said
    assert sum("adapter.r=3 is odd" in m for m in said) == 1, said
    assert sum("truncated to max_length 3" in m for m in said) == 2, said  # one line per split (train, eval)


# -- the other tools' model directories ----------------------------------------------------------------

@pytest.mark.parametrize("tool", ["export", "eval", "bench"])
def test_other_tools_refuse_truncated_weights(assets, tmp_path, capsys, tool):
    import importlib

    model = _model_copy(assets[1], tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-10])
    out = tmp_path / "o"
    argv = {"export": ["--checkpoint", str(tmp_path / "run"), "--base", str(model), "--out", str(out)],
            "eval": ["--model", str(model), "--out", str(out / "metrics.json")],
            "bench": ["--model", str(model), "--out", str(out), "--methods", "lor2c"]}[tool]
    logging.root.handlers.clear()
    rc = importlib.import_module(f"launcher.{tool}").main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"lor2c-{tool}: error: ") and "\n" not in err, err
    assert "is damaged: truncated" in err and ("--base" if tool == "export" else "--model") in err, err
    assert not out.exists()
