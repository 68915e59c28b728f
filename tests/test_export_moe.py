"""Exports of MoE bases whose checkpoints store experts one per key (transformers fuses them on load):
the fused tensors are built one at a time from the safetensors files, never through a whole-model load,
and equal what loading the base whole through transformers gives."""
from __future__ import annotations

import re
import weakref
from functools import partial

import pytest
import torch
from export_helpers import fake_run, rel_diff

from lor2c_ds.export import export

MOE_CASES = {  # family, base checkpoint dtype, export dtype
    "qwen3_moe-bf16ckpt": ("qwen3_moe", torch.bfloat16, None),
    "mixtral-bf16ckpt-fp32": ("mixtral", torch.bfloat16, "fp32"),
    "mixtral-fp32ckpt-bf16": ("mixtral", torch.float32, "bf16"),
}


def _layer(key: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", key).group(1))


class LiveTensors:
    """Weak references to the converted tensors handed out (to the shard writer and to the streamed
    parity's models); at each hand-out, the layers of those still alive anywhere."""

    def __init__(self, keys: set[str]):
        self.keys, self.refs, self.layers_alive, self.handed = keys, [], [], {"writer": set(), "parity": set()}

    def record(self, where: str, key: str, t: torch.Tensor) -> torch.Tensor:
        if key in self.keys:
            self.refs = [(k, r) for k, r in self.refs if r() is not None] + [(key, weakref.ref(t))]
            self.layers_alive.append({_layer(k) for k, _ in self.refs})
            self.handed[where].add(key)
        return t

    def install(self, monkeypatch) -> None:
        from lor2c_ds.export import merge, streamed

        write_shard, init = merge._write_shard, streamed.StreamedModel.__init__

        def writing(path, entries, produce, metadata):
            write_shard(path, entries, lambda key: self.record("writer", key, produce(key)), metadata)

        def reading(model_self, model, sources, backbone):
            wrapped = {k: (lambda f, k, *a: self.record("parity", k, f(*a))) for k in sources}
            init(model_self, model, {k: partial(wrapped[k], f, k) for k, f in sources.items()}, backbone)

        monkeypatch.setattr(merge, "_write_shard", writing)
        monkeypatch.setattr(streamed.StreamedModel, "__init__", reading)


def _shard_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_export_converts_one_layer_at_a_time(tmp_path, monkeypatch, caplog, case):
    """No from_pretrained anywhere in the export; at most one layer's converted tensors alive at once, in
    the writer and in the streamed parity; the shards equal those of the whole-model conversion bit for
    bit; the export loads with plain transformers and gives the trained model's logits."""
    import transformers
    from family_models import family_input_ids
    from transformers import AutoModelForCausalLM

    from lor2c_ds.export.safetensors_io import _base_tensors

    family, base_dtype, dtype = MOE_CASES[case]
    base, ckpt, trained = fake_run(tmp_path, f"fam:{family}", base_dtype=base_dtype,
                                   method="lora", targets=["q", "v", "o"])
    stored = _base_tensors(base)
    converted_keys = {k for k in trained.state_dict() if k not in stored and "lora" not in k}
    assert any("experts.gate_up_proj" in k for k in converted_keys), converted_keys
    live = LiveTensors(converted_keys)
    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "from_pretrained",
                  classmethod(lambda *a, **k: pytest.fail("the export loaded a whole model")))
        live.install(m)
        report = export(ckpt, base, tmp_path / "lazy", dtype=dtype, parity_batches=2)
    assert report["parity"]["passed"] and report["parity"]["parity_mode"] == "streamed", report["parity"]
    assert report["converted_tensors"]["mode"] == "lazy", report["converted_tensors"]
    assert report["converted_tensors"]["count"] == len(converted_keys)
    assert live.handed == {"writer": converted_keys, "parity": converted_keys}, live.handed
    assert max(len(layers) for layers in live.layers_alive) == 1, live.layers_alive

    from lor2c_ds.export import converted

    def unsupported(*a, **k):
        raise converted.LazyUnsupported("forced by the test")

    monkeypatch.setattr(converted, "lazy_converted", unsupported)
    with caplog.at_level("WARNING", logger="lor2c_ds.export.converted"):
        whole = export(ckpt, base, tmp_path / "whole", dtype=dtype, parity_batches=2)
    assert "loading it whole through transformers" in caplog.text
    assert whole["converted_tensors"] == {"count": len(converted_keys), "mode": "whole",
                                          "fallback": "forced by the test"}
    lazy_t, whole_t = _shard_tensors(tmp_path / "lazy"), _shard_tensors(tmp_path / "whole")
    assert lazy_t.keys() == whole_t.keys()
    for k in lazy_t:
        assert lazy_t[k].dtype == whole_t[k].dtype and torch.equal(lazy_t[k], whole_t[k]), k

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lazy", dtype=torch.float32).eval()
    ids = family_input_ids()
    with torch.no_grad():
        ref, got = trained(input_ids=ids).logits, exported(input_ids=ids).logits
    # fp32: the exact-merge bound 1e-5; 16 bits: the parity's bound from that format's own rounding
    assert rel_diff(ref, got) <= report["parity"]["bound"], (rel_diff(ref, got), report["parity"])
