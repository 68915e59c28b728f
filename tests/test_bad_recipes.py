"""Generated bad recipes: every field of the recipe and of its data, eval and adapter sections, set to a
wrong type, to a value out of its range, one outside its choices, and (for paths) a missing file.

Each case must end with exit code 2, exactly one `lor2c-train: error:` line that names the field, and the
output directory byte-identical. The fields come from the config dataclasses and their annotations, the
ranges from the bounds the config declares: a new field gets its cases without editing this file.

Most cases call `launcher.train.main(argv)` in this process (pre-flight runs before any process starts;
getting past it fails the test at once); a handful run the installed `lor2c-train` console script.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from test_cli_errors import GOOD_CSV, KEEP_NAME, KEEP_TEXT, PREFIX, REPO, _tiny_model_dir

from lor2c_ds.adapters.config import ADAPTER_BOUNDS, AdapterConfig
from lor2c_ds.config import (BAD_ROWS, DATA_BOUNDS, DATA_FORMATS, EVAL_BOUNDS, PRECISIONS, TASKS, TRAIN_BOUNDS,
                             DataConfig, EvalConfig, TrainConfig)
from launcher.preflight_checks import PATH_FIELDS

SECTIONS = {"": (TrainConfig, TRAIN_BOUNDS), "data.": (DataConfig, DATA_BOUNDS), "eval.": (EvalConfig, EVAL_BOUNDS),
            "adapter.": (AdapterConfig, ADAPTER_BOUNDS)}
NESTED = {"data", "eval", "adapter"}
# Fields whose valid values are a closed set: one value outside it each.
CHOICES = {"task": TASKS, "precision": PRECISIONS, "data.format": DATA_FORMATS, "data.on_bad_rows": BAD_ROWS,
           "data.loss_on": ("response", "all"), "eval.best_mode": ("auto", "max", "min"),
           "export_dtype": ("fp32", "bf16", "fp16"), "adapter.method": ("lora", "lor2c", "share_lor2c", "reslora"),
           "adapter.reslora_variant": ("is", "bs", "ms"), "adapter.merge_rule": ("inputs", "weights"),
           "deepspeed": ("zero2", "zero3"), "eval.best_metric": ("accuracy",)}
REQUIRED_TEXT = ("model", "output_dir", "data.path")  # an empty string is no value


def _wrong_values(hint) -> list:
    """Values of the wrong type for annotation `hint` (None is right for an Optional one)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _wrong_values(next(a for a in args if a is not type(None)))
    if hint is int:
        return ["many", 2.5]
    if hint is float:
        return ["fast", [1.0]]
    if hint is bool:
        return ["maybe", 1]
    if hint is str:
        return [5, ["a"]]
    if typing.get_origin(hint) is list and typing.get_args(args[0]):
        return ["0-1", [["a", 1]]]
    if typing.get_origin(hint) is list:
        return ["q", [7]]
    return ["a string"]  # bare list


def _out_of_range(bound, integer: bool) -> list:
    step = 1 if integer else 0.5
    values = []
    if bound.low is not None:
        values.append(bound.low if bound.low_open else bound.low - step)
    if bound.high is not None:
        values.append(bound.high if bound.high_open else bound.high + step)
    return values


def _cases() -> list[tuple[str, str, object]]:
    """(case id, dotted field, bad value)."""
    cases = []
    for prefix, (cls, bounds) in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            name = prefix + spec.name
            if name in NESTED:
                cases.append((f"{name}-not-a-mapping", name, "everything"))
                continue
            for i, value in enumerate(_wrong_values(hints[spec.name])):
                cases.append((f"{name}-type{i}", name, value))
            if spec.name in bounds:
                inner = next((a for a in typing.get_args(hints[spec.name]) if a is not type(None)), hints[spec.name])
                for i, value in enumerate(_out_of_range(bounds[spec.name], inner is int)):
                    cases.append((f"{name}-range{i}", name, value))
            if name in CHOICES:
                cases.append((f"{name}-choice", name, "no_such_choice"))
            if name in PATH_FIELDS:
                cases.append((f"{name}-missing", name, "{case}/missing/thing.jsonl"))
            if name in REQUIRED_TEXT:
                cases.append((f"{name}-empty", name, ""))
    cases.append(("deepspeed-missing", "deepspeed", "{case}/missing/ds.json"))
    cases.append(("data.max_length-zero", "data.max_length", 0))
    return cases


CASES = _cases()
# Values the recipe needs for a field's check to be reached (the field's method, or its feature switched on).
CONTEXT = {"adapter.reslora_variant": {"method": "reslora"}, "adapter.merge_rule": {"method": "reslora"},
           "adapter.pre_num": {"method": "reslora", "reslora_variant": "bs"},
           "adapter.sfs_k": {"merges": 1}, "adapter.event_every_steps": {"merges": 1},
           "adapter.targets": {"method": "lora"}, "adapter.share_groups": {"method": "share_lor2c"}}


def test_enough_generated_cases():
    assert len(CASES) >= 100, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)


def test_every_numeric_field_declares_its_range():
    """A new int/float field must say its range, so its out-of-range case is generated too."""
    exempt = {"adapter.pre_num"}  # its range depends on the ResLoRA variant (checked by hand)
    for prefix, (cls, bounds) in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            hint = hints[spec.name]
            inner = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
            if inner & {int, float} and prefix + spec.name not in exempt:
                assert spec.name in bounds, f"{prefix}{spec.name} has no declared range"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_recipes")
    model_dir = _tiny_model_dir(root)
    (root / "train.csv").write_text(GOOD_CSV)
    return root, model_dir


def _recipe(root: Path, model_dir: Path, out: Path) -> dict:
    return {"model": str(model_dir), "task": "classification", "num_labels": 2,
            "data": {"path": str(root / "train.csv"), "format": "csv", "max_length": 16},
            "eval": {}, "adapter": {"method": "lor2c", "r": 4, "alpha": 8},
            "deepspeed": "zero3", "nproc": 1, "output_dir": str(out), "overwrite_output_dir": True,
            "max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2, "eval_before": False}


def _write_case(root: Path, model_dir: Path, case_dir: Path, field: str, value) -> tuple[Path, Path]:
    case_dir.mkdir()
    out = case_dir / "out"
    out.mkdir()
    (out / KEEP_NAME).write_text(KEEP_TEXT)
    recipe = _recipe(root, model_dir, out)
    *parents, leaf = field.split(".")
    node = recipe
    for part in parents:
        node = node[part]
    if field in CONTEXT:
        node.update(CONTEXT[field])
    node[leaf] = value.replace("{case}", str(case_dir)) if isinstance(value, str) else value
    config = case_dir / "recipe.yaml"
    config.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    return config, out


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def _check(rc, stderr: str, field: str, out: Path, before: dict) -> None:
    lines = stderr.splitlines()
    errors = [line for line in lines if line.startswith(PREFIX)]
    detail = f"rc={rc}\nstderr:\n{stderr[-3000:]}"
    assert rc == 2, detail
    assert len(errors) == 1 and lines[-1] == errors[0], detail
    assert "Traceback" not in stderr, detail
    assert field in errors[0], f"the error line does not name {field}:\n{errors[0]}"
    assert _snapshot(out) == before, "the output directory changed"


@pytest.fixture
def in_process(monkeypatch):
    """launcher.train.main in this process, stopped with a failure should it get past pre-flight."""
    import launcher.train as train

    def past_preflight(*a, **k):
        raise AssertionError("the bad recipe got past pre-flight")

    def verdict(gate, ranks, passed):  # the ranks start beside pre-flight (nproc > 1): none starts here
        shutil.rmtree(gate.parent, ignore_errors=True)
        if passed:
            past_preflight()

    monkeypatch.setattr(train, "worker", past_preflight)
    monkeypatch.setattr(train, "spawn_local", past_preflight)
    monkeypatch.setattr(train, "start_local", lambda *a, **k: object())
    monkeypatch.setattr(train, "open_gate", verdict)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
                train.PREFLIGHT_DONE):
        monkeypatch.delenv(var, raising=False)
    saved = dict(os.environ)
    yield train.main
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case_id,field,value", CASES, ids=[c[0] for c in CASES])
def test_bad_recipe_in_process(assets, tmp_path, in_process, capsys, case_id, field, value):
    root, model_dir = assets
    config, out = _write_case(root, model_dir, tmp_path / "case", field, value)
    before = _snapshot(out)
    logging.root.handlers.clear()  # main's basicConfig then writes to this test's captured stderr
    try:
        rc = in_process(["--config", str(config)])
    except SystemExit as e:
        rc = e.code
    _check(rc, capsys.readouterr().err, field, out, before)


SUBPROCESS_CASES = ["adapter.r-range0", "data.max_length-zero", "nproc-type0", "model-missing", "adapter.dropout-range1"]


def _console_script() -> list[str]:
    found = shutil.which("lor2c-train")
    return [found] if found else [sys.executable, "-m", "launcher.train"]


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_recipe_console_script(assets, tmp_path, case_id):
    root, model_dir = assets
    _, field, value = next(c for c in CASES if c[0] == case_id)
    config, out = _write_case(root, model_dir, tmp_path / "case", field, value)
    before = _snapshot(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOR2C_PREFLIGHT_DONE")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]),
               HF_HUB_OFFLINE="1")
    proc = subprocess.run(_console_script() + ["--config", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    _check(proc.returncode, proc.stderr, field, out, before)
    assert proc.stdout == ""
