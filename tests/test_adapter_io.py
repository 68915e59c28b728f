"""Adapter files (save/load round trips), deep copies and architecture support."""
from __future__ import annotations

import copy
import json
import re
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from conftest import (TINY_HIDDEN, TINY_LABELS,
                      TINY_LAYERS, make_input_ids, make_model)
from lor2c_ds import (AdapterConfig, ArchSpec, Projection, apply_adapters, load_adapters,
                      register_architecture, save_adapters)
from lor2c_ds.adapters import CONFIG_NAME, WEIGHTS_NAME
from lor2c_ds.registry import ARCHITECTURES, UnsupportedArchitectureError
from test_adapters import adapters_of, logits, randomize_B, run_blocks, trainable_count

D, L = TINY_HIDDEN, TINY_LAYERS
HEAD_PARAMS = {"bert": D * TINY_LABELS + TINY_LABELS, "llama": 0, "gpt2": 0}  # trainable task heads


# ----------------------------------------------------------------------------------------------------
# save_adapters / load_adapters
# ----------------------------------------------------------------------------------------------------

SAVE_CASES = [
    ("bert", AdapterConfig(method="lor2c", r=4, alpha=8, spans=[[0, 1], [2, 2]])),
    ("bert", AdapterConfig(method="share_lor2c", r=4)),
    ("llama", AdapterConfig(method="lora", r=2, targets=["q", "v", "down"])),
    ("gpt2", AdapterConfig(method="lora", r=2)),
]


@pytest.mark.parametrize("family,cfg", SAVE_CASES, ids=[f"{f}-{c.method}" for f, c in SAVE_CASES])
def test_save_load_round_trip(tmp_path, family, cfg):
    model = apply_adapters(make_model(family), copy.deepcopy(cfg))
    randomize_B(model)
    with torch.no_grad():  # make the head differ from a fresh model's too
        for n, p in model.named_parameters():
            if p.requires_grad and "lora" not in n and "shared_A" not in n:
                p.add_(0.25)
    ids = make_input_ids()
    want = logits(model, ids)

    out = save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    saved = json.loads((out / CONFIG_NAME).read_text())
    layout = saved.pop("layout", None)  # lor2c methods record their current topology
    assert saved == cfg.to_dict()
    assert (layout is not None) == cfg.method.endswith("lor2c")
    raw = (out / WEIGHTS_NAME).read_bytes()
    assert not raw.startswith((b"PK", b"\x80"))  # not a torch zip / pickle
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "pt"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        assert set(f.keys()) == trainable

    fresh = make_model(family)
    assert not torch.equal(logits(fresh, ids), want)
    load_adapters(fresh, out)
    assert fresh.adapter_config.to_dict() == cfg.to_dict()
    assert torch.equal(logits(fresh, ids), want)


def test_load_into_model_with_other_adapters_raises(tmp_path):
    model = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4))
    save_adapters(model, tmp_path)
    other = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=2))
    with pytest.raises(ValueError, match="differ"):
        load_adapters(other, tmp_path)
    same = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4))
    load_adapters(same, tmp_path)  # the same adapters load fine


def test_apply_twice_raises():
    model = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig(method="lora", r=4))


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_load_missing_file_names_it(tmp_path, missing):
    save_adapters(apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4)), tmp_path)
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_adapters(make_model("bert"), tmp_path)


def test_load_mismatched_weights_names_them(tmp_path):
    from safetensors.torch import load_file, save_file
    save_adapters(apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4)), tmp_path)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    state.pop("lor2c.adapters.1.lora_B.weight")
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError, match=r"missing \['lor2c.adapters.1.lora_B.weight'\]"):
        load_adapters(make_model("bert"), tmp_path)


# ----------------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------------

class FooBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.proj(h))


class FooModel(nn.Module):
    def __init__(self, d=16, n=3, model_type="foo"):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type, hidden_size=d)
        self.blocks = nn.ModuleList(FooBlock(d) for _ in range(n))

    def forward(self, h):
        for block in self.blocks:
            h = block(h)
        return h


def _assert_unsupported_message(err: UnsupportedArchitectureError, model_type: str):
    msg = str(err)
    assert repr(model_type) in msg
    for known in ("bert", "gpt2", "llama", "qwen2", "roberta", "mistral"):
        assert known in msg
    assert "register_architecture" in msg


def test_t5_is_unsupported():
    from transformers import T5Config, T5ForConditionalGeneration
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                             num_heads=4))
    with pytest.raises(UnsupportedArchitectureError) as info:
        apply_adapters(t5, AdapterConfig(method="lor2c", r=4))
    _assert_unsupported_message(info.value, "t5")
    assert not hasattr(t5, "adapter_config")


def test_custom_module_unsupported_then_registered():
    torch.manual_seed(0)
    model = FooModel()
    with pytest.raises(UnsupportedArchitectureError) as info:
        apply_adapters(model, AdapterConfig(method="lor2c", r=2))
    _assert_unsupported_message(info.value, "foo")

    assert "foo" not in ARCHITECTURES
    register_architecture("foo", ArchSpec(block_paths=("blocks",), projections={"q": Projection("proj")},
                                          default_targets=("q",)))
    try:
        h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
        base = copy.deepcopy(model)
        with torch.no_grad():
            want_base = base(h)

        apply_adapters(model, AdapterConfig(method="lor2c", r=2, alpha=4, spans=[[0, 1], [2, 2]]))
        assert torch.equal(model(h).detach(), want_base)
        randomize_B(model)
        with torch.no_grad():
            got = model(h)
            want = run_blocks(h, base.blocks, lambda b, x: b(x), adapters_of(model, 4, 2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert trainable_count(model) == 2 * 2 * 2 * 16

        lora_model = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lora", r=2, alpha=3))
        assert all(hasattr(b.proj, "lora_q") for b in lora_model.blocks)
        randomize_B(lora_model)
        with torch.no_grad():
            want = h
            for blk, adapted in zip(base.blocks, lora_model.blocks):
                A, B = adapted.proj.lora_q.lora_A.weight, adapted.proj.lora_q.lora_B.weight
                want = want + torch.tanh(F.linear(want, blk.proj.weight, blk.proj.bias) + 1.5 * (want @ A.T) @ B.T)
            got = lora_model(h)
        assert not torch.allclose(got, want_base, atol=1e-3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    finally:
        ARCHITECTURES.pop("foo", None)


def test_custom_module_without_block_list_is_reported():
    register_architecture("foo2", ArchSpec(block_paths=("layers", "stack"), projections={}))
    try:
        with pytest.raises(UnsupportedArchitectureError, match=r"no block list found.*\('layers', 'stack'\)"):
            apply_adapters(FooModel(model_type="foo2"), AdapterConfig(method="lor2c", r=2))
    finally:
        ARCHITECTURES.pop("foo2", None)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "lor2c", "share_lor2c"])
def test_deep_copy_uses_its_own_adapters(family, method):
    model = apply_adapters(make_model(family), AdapterConfig(method=method, r=4))
    randomize_B(model)
    ids = make_input_ids()
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if "lora_B" in name:
                p.zero_()
        base = make_model(family)
    torch.testing.assert_close(clone(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=0)
    assert not torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
