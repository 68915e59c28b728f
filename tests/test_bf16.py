"""bf16 end to end, single process: adapters follow the dtype and device of the layer they attach to,
a bf16 base with fp32 adapters works, and bf16 results track the fp32 computation.

The bound: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); each matmul of the tiny models
rounds its inputs and output once, and 3 blocks compound about a dozen such roundings on the logits,
so the relative Frobenius difference to fp32 stays near 1e-2. BF16_REL = 3e-2 leaves room for that
and still catches an adapter that is dropped (its contribution is O(1) relative here) or computed in
the wrong place.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_input_ids, make_model

from lor2c_ds import AdapterConfig, apply_adapters, load_adapters, save_adapters

BF16_REL = 3e-2
METHODS = {
    "lora": dict(method="lora"),
    "lor2c": dict(method="lor2c"),
    "share_lor2c": dict(method="share_lor2c"),
    "reslora_bs": dict(method="reslora", reslora_variant="bs", pre_num=1),
    "inject": dict(method="lor2c", injections=1),  # q/v LoRA of rank r/2 beside the shortcuts
}


def randomize(model: torch.nn.Module, seed: int = 7) -> None:
    """Non-zero B everywhere (and every injected LoRA switched on), so each adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    for m in model.modules():
        if hasattr(m, "active") and hasattr(m, "chunks"):
            m.active = True


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def adapted(family: str, method: str, base_dtype, adapter_dtype=None):
    model = make_model(family).to(base_dtype)
    torch.manual_seed(0)
    apply_adapters(model, AdapterConfig(r=4, alpha=8, dropout=0.0, **METHODS[method]), dtype=adapter_dtype)
    randomize(model)
    return model


def adapter_params(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if p.requires_grad and ("lora_" in n or "shared_A" in n)]


def adapter_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in adapter_params(model)}


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_base_and_adapters_track_fp32(family, method):
    ids = make_input_ids()
    ref_model = adapted(family, method, torch.float32)
    ref = ref_model(input_ids=ids).logits
    bare = make_model(family)(input_ids=ids).logits
    assert rel(bare, ref) > 3 * BF16_REL  # the adapters matter at this scale
    for adapter_dtype in (None, torch.float32):
        model = adapted(family, method, torch.bfloat16, adapter_dtype)
        assert adapter_dtypes(model) == {adapter_dtype or torch.bfloat16}
        out = model(input_ids=ids).logits
        assert out.dtype == torch.bfloat16
        assert rel(out, ref) < BF16_REL, (adapter_dtype, rel(out, ref))
        out.float().sum().backward()  # gradients reach the adapters in their own dtype
        grads = [p.grad for p in adapter_params(model)]
        assert grads and all(g is not None and g.dtype == (adapter_dtype or torch.bfloat16) for g in grads)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", ["lora", "lor2c", "reslora_bs"])
def test_load_adapters_on_a_bf16_model(tmp_path, family, method):
    ids = make_input_ids()
    trained = adapted(family, method, torch.float32)
    save_adapters(trained, tmp_path / "adapter")
    ref = trained(input_ids=ids).logits
    model = load_adapters(make_model(family).to(torch.bfloat16), tmp_path / "adapter")
    assert adapter_dtypes(model) == {torch.bfloat16}
    assert rel(model(input_ids=ids).logits, ref) < BF16_REL


def test_adapters_follow_the_device_and_dtype_of_their_layer():
    model = make_model("llama")
    model.model.layers[1].to(torch.bfloat16)  # a mixed-precision model: one block kept in bf16
    apply_adapters(model, AdapterConfig(method="lora", r=4))
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora" in n}
    assert all((d == torch.bfloat16) == (".layers.1." in n) for n, d in dtypes.items()), dtypes
    lor2c = apply_adapters(make_model("llama").to(torch.bfloat16), AdapterConfig(method="share_lor2c", r=4))
    assert {p.dtype for p in lor2c.lor2c.parameters()} == {torch.bfloat16}


def test_lor2c_assets_writes_bf16_copies_of_the_models():
    """`lor2c-assets --bf16` (what CI runs): each model again, saved in bf16 as hub checkpoints ship."""
    import json
    import os

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lor2c_ds.assets import default_home

    models = default_home() / "models"
    if not (models / "SmolLM2-135M-Instruct-bf16").is_dir():
        if os.environ.get("CI"):
            raise AssertionError("CI runs lor2c-assets --bf16: the bf16 copies must be there")
        pytest.skip("run lor2c-assets --bf16 first")
    for name in ("all-MiniLM-L6-v2", "SmolLM2-135M-Instruct"):
        path = models / f"{name}-bf16"
        assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    ids = make_input_ids(seq=12) + 200  # SmolLM2's vocabulary
    fp32 = AutoModelForCausalLM.from_pretrained(models / "SmolLM2-135M-Instruct")
    bf16 = AutoModelForCausalLM.from_pretrained(models / "SmolLM2-135M-Instruct-bf16")
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert rel(bf16(input_ids=ids).logits, fp32(input_ids=ids).logits) < 0.1  # 30 blocks of bf16 rounding
