"""A head never reads through frozen random weights: modules the checkpoint lacks train with the head."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import make_input_ids, make_model
from safetensors.torch import load_file, save_file

from lor2c_ds import AdapterConfig, load_adapters, save_adapters
from lor2c_ds.adapters.config import ConfigError
from lor2c_ds.config import TrainConfig
from lor2c_ds.train import load_model, whole_modules


def _checkpoint(tmp_path, family: str, drop: tuple[str, ...] = (), untouched: tuple[str, ...] = ()):
    """A saved tiny model whose safetensors file lacks every tensor whose name starts with `drop`.
    Every bias looks trained (non-zero) except those of the modules in `untouched`."""
    path = tmp_path / family
    make_model(family).save_pretrained(path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    for k, v in state.items():
        if k.endswith(".bias") and not k.startswith(untouched):
            v.copy_(torch.linspace(-0.1, 0.1, v.numel()).reshape(v.shape))
    kept = {k: v for k, v in state.items() if not k.startswith(drop)}
    assert drop == () or len(kept) < len(state)
    save_file(kept, str(weights), metadata={"format": "pt"})
    return path


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_missing_pooler_trains_with_the_head(tmp_path, caplog):
    path = _checkpoint(tmp_path, "bert", drop=("bert.pooler.",))
    cfg = TrainConfig(model=str(path), adapter=AdapterConfig(method="lor2c", r=4))
    with caplog.at_level(logging.INFO, logger="lor2c_ds.train"):
        model = load_model(cfg, {})
    assert model.newly_initialised == ["bert.pooler"]  # the tiny checkpoint ships its classifier
    assert model.adapter_config.modules_to_save == ["classifier", "bert.pooler"]
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= _trainable(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "lor2c_ds.train" and "not in the checkpoint" in r.getMessage()]
    assert lines == ["bert.pooler not in the checkpoint (initialised at random): trained with the head, "
                     "1,056 parameters; adapter.modules_to_save overrides"]  # 32 x 32 + 32

    # the saved adapter carries the pooler: a fresh load (export, lor2c-eval) gets the trained one back
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(1.0)
    save_adapters(model, tmp_path / "adapter")
    again = load_adapters(type(model).from_pretrained(path), tmp_path / "adapter")
    assert torch.equal(again.bert.pooler.dense.weight, model.bert.pooler.dense.weight)
    ids = make_input_ids()
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_pooler_shipped_as_initialised_trains_with_the_head(tmp_path, caplog):
    path = _checkpoint(tmp_path, "bert", untouched=("bert.pooler.",))
    cfg = TrainConfig(model=str(path), adapter=AdapterConfig(method="lor2c", r=4))
    with caplog.at_level(logging.INFO, logger="lor2c_ds.train"):
        model = load_model(cfg, {})
    assert model.newly_initialised == []  # transformers loaded it: only its values tell
    assert model.adapter_config.modules_to_save == ["classifier", "bert.pooler.dense"]
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= _trainable(model)
    lines = [r.getMessage() for r in caplog.records if "bert.pooler" in r.getMessage()]
    assert lines == ["bert.pooler.dense in the checkpoint as initialised (its bias is exactly 0): trained with the "
                     "head, 1,056 parameters; adapter.modules_to_save overrides"]


def test_shipped_pooler_stays_frozen(tmp_path):
    cfg = TrainConfig(model=str(_checkpoint(tmp_path, "bert")), adapter=AdapterConfig(method="lor2c", r=4))
    model = load_model(cfg, {})
    assert model.newly_initialised == [] and model.adapter_config.modules_to_save is None
    assert not any(n.startswith("bert.pooler") for n in _trainable(model))


@pytest.mark.parametrize("case, reason", [
    ({"drop": ("bert.pooler.",)}, "bert.pooler not in the checkpoint (initialised at random)"),
    ({"untouched": ("bert.pooler.",)}, "bert.pooler.dense in the checkpoint as initialised (its bias is exactly 0)")])
def test_modules_to_save_overrides_and_warns(tmp_path, caplog, case, reason):
    path = _checkpoint(tmp_path, "bert", **case)
    cfg = TrainConfig(model=str(path), adapter=AdapterConfig(method="lor2c", r=4, modules_to_save=["classifier"]))
    with caplog.at_level(logging.INFO, logger="lor2c_ds.train"):
        model = load_model(cfg, {})
    assert not any(n.startswith("bert.pooler") for n in _trainable(model))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "lor2c_ds.train"]
    assert [r.getMessage() for r in warnings] == [f"{reason} and left frozen by adapter.modules_to_save"]


def test_weights_missing_inside_the_block_stack_are_refused(tmp_path):
    path = _checkpoint(tmp_path, "llama", drop=("model.layers.1.mlp.",))
    cfg = TrainConfig(model=str(path), task="causal_lm", adapter=AdapterConfig(method="lor2c", r=4))
    with pytest.raises(ConfigError, match=r"lacks weights of \['model.layers.1.mlp'\] inside the block stack"):
        load_model(cfg, {})


def test_whole_modules_takes_the_outermost():
    model = make_model("bert")
    names = {n for n, _ in model.named_parameters() if n.startswith(("bert.pooler.", "bert.encoder.layer.0.output."))}
    names.add("bert.embeddings.word_embeddings.weight")
    names.discard("bert.encoder.layer.0.output.LayerNorm.bias")  # part of a module: only the dense is whole
    assert whole_modules(model, names) == ["bert.embeddings.word_embeddings", "bert.encoder.layer.0.output.dense",
                                           "bert.pooler"]


def test_missing_task_head_is_just_the_head(tmp_path):
    """A base checkpoint lacks the classifier: it is the head (trained anyway), nothing more is added."""
    cfg = TrainConfig(model=str(_checkpoint(tmp_path, "bert", drop=("classifier.",))),
                      adapter=AdapterConfig(method="lor2c", r=4))
    model = load_model(cfg, {})
    assert model.newly_initialised == ["classifier"] and cfg.adapter.modules_to_save is None
    assert {"classifier.weight", "classifier.bias"} <= _trainable(model)


@pytest.mark.parametrize("case", [{"drop": ("bert.pooler.",)}, {"untouched": ("bert.pooler.",)}])
def test_the_automatic_choice_leaves_the_recipe_as_written_so_a_resume_matches_it(tmp_path, case):
    from lor2c_ds.checkpoint import recipe_identity

    path = _checkpoint(tmp_path, "bert", **case)
    cfg = TrainConfig(model=str(path), adapter=AdapterConfig(method="lor2c", r=4))
    written = recipe_identity(TrainConfig(model=str(path), adapter=AdapterConfig(method="lor2c", r=4)))
    model = load_model(cfg, {})
    assert cfg.adapter.modules_to_save is None and recipe_identity(cfg) == written  # what a resume compares
    assert model.adapter_config.modules_to_save[0] == "classifier"  # what adapter_config.json records
    assert len(model.adapter_config.modules_to_save) == 2
