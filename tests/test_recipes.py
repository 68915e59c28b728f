"""Every shipped recipe parses, names its own launch command, and passes the pre-flight checks."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from launcher.train import preflight
from lor2c_ds.assets import default_home
from lor2c_ds.config import load_config

RECIPES = sorted((Path(__file__).resolve().parents[1] / "launcher" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_is_complete(recipe, tmp_path):
    raw = yaml.safe_load(recipe.read_text())
    assert raw["launch"].startswith("lor2c-train --config launcher/configs/" + recipe.name)
    cfg = load_config(recipe, [f"output_dir={tmp_path / 'out'}"])
    if not Path(cfg.model).is_dir() and not os.environ.get("CI"):
        pytest.skip(f"assets missing under {default_home()}: run lor2c-assets")
    preflight(cfg)  # model, architecture, adapter fit, data, output dir


BYOD = sorted((Path(__file__).resolve().parents[1] / "launcher" / "configs" / "byod").glob("*.yaml"))


@pytest.mark.parametrize("recipe", BYOD, ids=[r.stem for r in BYOD])
def test_bring_your_own_data_examples_parse(recipe, monkeypatch):
    """The examples for users' own files: they carry their command and validate (the files are the user's)."""
    monkeypatch.setenv("DATA", "/data")
    raw = yaml.safe_load(recipe.read_text())
    assert raw["launch"] == f"lor2c-train --config launcher/configs/byod/{recipe.name}"
    cfg = load_config(recipe)
    assert cfg.data.path.startswith("/data/")
