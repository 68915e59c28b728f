"""The export's streamed parity check: it reports what loading both models whole reports, never holds
more backbone bytes than one unit, and falls back to whole models loudly where it cannot stream."""
from __future__ import annotations

import pytest
from export_helpers import fake_run

from lor2c_ds.export import export


STREAMED_CASES = {  # (family, adapter, dtype)
    "llama-lora": ("llama", dict(method="lora", targets=["q", "v", "down"]), None),
    "gpt2-lora-fused-bf16": ("gpt2", dict(method="lora", targets=["q", "v", "o"]), "bf16"),
    "bert-lor2c": ("bert", dict(method="lor2c", spans=[[0, 1], [2, 2]]), None),
    "bert-lor2c-bf16": ("bert", dict(method="lor2c", spans=[[0, 1], [2, 2]]), "bf16"),
    "phi3-lora": ("fam:phi3", dict(method="lora", targets=["q", "v"]), None),  # fused qkv
    "qwen3_moe-lor2c-bf16": ("fam:qwen3_moe", dict(method="lor2c"), "bf16"),  # experts fused on load
    "deberta-lora": ("fam:deberta-v2", dict(method="lora", targets=["q", "v"]), None),  # rel_embeddings
}


@pytest.mark.parametrize("case", list(STREAMED_CASES))
def test_streamed_parity_equals_whole_model_parity(tmp_path, monkeypatch, case):
    """The streamed parity (weights read unit by unit) reports what loading both models whole reports."""
    from functools import partial

    from lor2c_ds.export import load, merge

    family, adapter, dtype = STREAMED_CASES[case]
    base, ckpt, _ = fake_run(tmp_path, family, **adapter)
    streamed = export(ckpt, base, tmp_path / "streamed", dtype=dtype, parity_batches=2)["parity"]
    monkeypatch.setattr(merge, "parity", partial(load.parity, mode="whole"))
    whole = export(ckpt, base, tmp_path / "whole", dtype=dtype, parity_batches=2)["parity"]
    assert streamed["parity_mode"] == "streamed" and whole["parity_mode"] == "whole", (streamed, whole)
    assert streamed["passed"] and whole["passed"]
    assert streamed["max_abs_diff"] == pytest.approx(whole["max_abs_diff"], rel=1e-6, abs=1e-12)
    for key in ("dtype_floor_rel_diff", "bound"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6)
    assert 0 < streamed["peak_weight_bytes"] <= streamed["largest_unit_bytes"] + streamed["resident_weight_bytes"]


def test_parity_never_loads_a_whole_model(tmp_path, monkeypatch):
    """Counted in the model itself: never more backbone bytes real than the largest unit (block, embedding,
    head); transformers' whole-model loading is never called."""
    import transformers

    from lor2c_ds.export import streamed

    base, ckpt, _ = fake_run(tmp_path, "llama", method="lor2c", injections=1)
    total = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    real_at_once, materialise = [], streamed.StreamedModel._materialise

    def counting(self, unit):  # the backbone bytes real in the model right after each unit is read
        materialise(self, unit)
        real = {m._parameters[n].data_ptr(): m._parameters[n] for u in self.units.values()
                for m, n, _, _ in u.slots if not m._parameters[n].is_meta}
        real_at_once.append(sum(p.numel() * p.element_size() for p in real.values()))

    monkeypatch.setattr(streamed.StreamedModel, "_materialise", counting)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("the parity loaded a whole model")))
    for dtype in (None, "bf16"):
        real_at_once.clear()
        parity = export(ckpt, base, tmp_path / f"out_{dtype}", dtype=dtype, parity_batches=3)["parity"]
        assert parity["passed"] and parity["parity_mode"] == "streamed"
        assert real_at_once and max(real_at_once) <= parity["largest_unit_bytes"] < total / 3, (real_at_once, total)
        assert parity["peak_weight_bytes"] == max(real_at_once)


def test_streamed_parity_falls_back_to_whole_models_loudly(tmp_path, monkeypatch, caplog):
    from lor2c_ds.export import streamed

    def unsupported(self, batches):
        raise streamed.StreamingUnsupported("no streamed forward for this test")

    base, ckpt, _ = fake_run(tmp_path, "gpt2", method="lora")
    monkeypatch.setattr(streamed.StreamedModel, "logits", unsupported)
    with caplog.at_level("WARNING", logger="lor2c_ds.export.load"):
        parity = export(ckpt, base, tmp_path / "out", parity_batches=1)["parity"]
    assert parity["parity_mode"] == "whole" and parity["passed"] and "for this test" in parity["parity_fallback"]
    assert "loading whole models instead" in caplog.text
