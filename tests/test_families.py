"""Every supported transformers family (tiny random models from transformers' own config classes):
LoR2C against hooks on the unadapted model, LoRA q/v against weights folded by hand (fused projections'
slices included), ResLoRA bs's exact merge, the LoRA export round trip, lor2c-plan, and discovery's errors."""
from __future__ import annotations

import json

import pytest
import torch
from family_models import ENCODERS, FAMILIES, family_config, family_input_ids, make_family

from lor2c_ds import AdapterConfig, apply_adapters, save_adapters
from lor2c_ds.adapters.config import ConfigError
from lor2c_ds.adapters.reslora import merge_reslora
from lor2c_ds.discovery import discover
from lor2c_ds.registry import ARCHITECTURES, UnsupportedArchitectureError, spec_for

# Written down here, not read from lor2c_ds: where each family keeps its blocks and projections.
BLOCKS = {f: "model.layers" for f in FAMILIES}
BLOCKS.update({"gpt2": "transformer.h", "falcon": "transformer.h", "gpt_neox": "gpt_neox.layers",
               "bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer", "deberta-v2": "deberta.encoder.layer"})
QV = {f: ("self_attn.q_proj", "self_attn.v_proj") for f in FAMILIES}
QV.update({"phi3": ("self_attn.qkv_proj",) * 2, "gpt2": ("attn.c_attn",) * 2, "modernbert": ("attn.Wqkv",) * 2,
           "gpt_neox": ("attention.query_key_value",) * 2, "falcon": ("self_attention.query_key_value",) * 2,
           "deepseek_v3": ("self_attn.q_b_proj", "self_attn.kv_b_proj"),
           "bert": ("attention.self.query", "attention.self.value"),
           "roberta": ("attention.self.query", "attention.self.value"),
           "deberta-v2": ("attention.self.query_proj", "attention.self.value_proj")})


def expected_rows(family: str, target: str, config, d_out: int) -> list[int]:
    """The output rows of the q / v projection that hold q / v, by head arithmetic."""
    h = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // h
    if family in ("phi3", "gpt2", "modernbert"):  # [q | k | v]
        kv = getattr(config, "num_key_value_heads", None) or h
        return list(range(0, h * hd)) if target == "q" else list(range((h + kv) * hd, (h + 2 * kv) * hd))
    if family == "gpt_neox":  # per head [q k v]
        return [head * 3 * hd + (0 if target == "q" else 2 * hd) + i for head in range(h) for i in range(hd)]
    if family == "falcon":  # per kv group [its q heads, k, v]
        per = h // config.num_kv_heads
        return [g * (per + 2) * hd + (i if target == "q" else (per + 1) * hd + i)
                for g in range(config.num_kv_heads) for i in range(per * hd if target == "q" else hd)]
    if family == "deepseek_v3" and target == "v":  # kv_b_proj: per head [k_nope v]
        nope, v = config.qk_nope_head_dim, config.v_head_dim
        return [head * (nope + v) + nope + i for head in range(h) for i in range(v)]
    return list(range(d_out))


def randomize_adapters(model, seed: int = 7, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def out_of(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw)


def test_every_family_is_a_transformers_model_type():
    from transformers import CONFIG_MAPPING

    assert [f for f in FAMILIES if f not in CONFIG_MAPPING] == []
    assert len(FAMILIES) == 22


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "bert", "roberta"])
def test_discovery_agrees_with_the_registry_entries(family):
    model = make_family(family, task="classification")
    entry, found = ARCHITECTURES[family], discover(model)
    assert found.block_paths[0] in entry.block_paths
    assert set(found.heads) == {h for h in entry.heads if hasattr(model, h)}
    assert set(found.projections) == set(entry.projections)
    block = model.get_submodule(found.block_paths[0])[0]
    for target, proj in entry.projections.items():
        got = found.projections[target]
        d_out = dict(zip(("in", "out"), _dims(block.get_submodule(proj.path))))["out"]
        assert (got.path, got.output_slice(d_out)) == (proj.path, proj.output_slice(d_out))


def _dims(module):
    from lor2c_ds.registry import projection_dims

    return projection_dims(module)


@pytest.mark.parametrize("family", FAMILIES)
def test_lor2c_equals_hooks_on_the_unadapted_model(family):
    ids = family_input_ids()
    model = apply_adapters(make_family(family), AdapterConfig(method="lor2c", r=4, alpha=8, spans=[[0, 1], [2, 2]]))
    torch.testing.assert_close(out_of(model, ids).logits, out_of(make_family(family), ids).logits)  # B = 0
    randomize_adapters(model)
    ref = make_family(family)
    blocks = ref.get_submodule(BLOCKS[family])
    assert len(blocks) == 3
    stream = {}
    for start, end in ((0, 1), (2, 2)):
        a = model.lor2c.adapters[str(start)]
        A, B = a.lora_A.weight.detach(), a.lora_B.weight.detach()

        def record(block, args, kwargs, start=start):
            stream[start] = args[0] if args else kwargs["hidden_states"]

        def add(block, args, output, start=start, A=A, B=B):
            delta = 2.0 * (stream.pop(start) @ A.T) @ B.T
            return output + delta if isinstance(output, torch.Tensor) else (output[0] + delta, *output[1:])

        blocks[start].register_forward_pre_hook(record, with_kwargs=True)
        blocks[end].register_forward_hook(add)
    want, got = out_of(ref, ids).logits, out_of(model, ids).logits
    assert (want - out_of(make_family(family), ids).logits).abs().max() > 1e-3  # the shortcuts matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_q_v_equals_weights_folded_by_hand(family):
    ids = family_input_ids()
    model = apply_adapters(make_family(family), AdapterConfig(method="lora", r=4, alpha=8, targets=["q", "v"]))
    randomize_adapters(model)
    ref = make_family(family)
    config = family_config(family)
    with torch.no_grad():
        for block, adapted in zip(ref.get_submodule(BLOCKS[family]), model.get_submodule(BLOCKS[family])):
            for target, path in zip("qv", QV[family]):
                proj = block.get_submodule(path)
                lora = adapted.get_submodule(path).get_submodule(f"lora_{target}")
                W = proj.weight if isinstance(proj, torch.nn.Linear) else proj.weight.T  # Conv1D: (in, out)
                rows = expected_rows(family, target, config, W.shape[0])
                assert lora.lora_B.weight.shape[0] == len(rows) < W.shape[0] or family not in (
                    "phi3", "gpt2", "modernbert", "gpt_neox", "falcon")
                W[rows] += 2.0 * lora.lora_B.weight @ lora.lora_A.weight
    want, got = out_of(ref, ids).logits, out_of(model, ids).logits
    assert (want - out_of(make_family(family), ids).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_v_leaves_the_attention_pattern_alone_and_q_does_not(family):
    """The rows taken for v are values: the first layer's attention probabilities do not move; for q they do."""
    ids = family_input_ids()
    base = out_of(make_family(family), ids, output_attentions=True).attentions[0]
    for target in ("v", "q"):
        model = apply_adapters(make_family(family), AdapterConfig(method="lora", r=4, alpha=8, targets=[target]))
        randomize_adapters(model)
        probs = out_of(model, ids, output_attentions=True).attentions[0]
        moved = (probs - base).abs().max().item()
        assert (moved < 1e-6) if target == "v" else (moved > 1e-4), (target, moved)


@pytest.mark.parametrize("family", FAMILIES)
def test_reslora_bs_merges_exactly(family):
    ids = family_input_ids()
    model = apply_adapters(make_family(family), AdapterConfig(method="reslora", r=4, alpha=8, targets=["q", "v"],
                                                              reslora_variant="bs", pre_num=2))
    randomize_adapters(model)
    before = out_of(model, ids).logits
    assert (before - out_of(make_family(family), ids).logits).abs().max() > 1e-3
    merged = merge_reslora(model)
    assert not [n for n, _ in merged.named_modules() if "reslora" in n]
    torch.testing.assert_close(out_of(merged, ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_export_round_trip(tmp_path, family):
    from lor2c_ds.export import export, from_pretrained

    base, ckpt = tmp_path / "base", tmp_path / "ckpt"
    make_family(family).save_pretrained(base)
    model = apply_adapters(make_family(family), AdapterConfig(method="lora", r=4, alpha=8, targets=["q", "v"]))
    randomize_adapters(model)
    save_adapters(model, ckpt)
    report = export(ckpt, base, tmp_path / "export", parity_batches=1)
    assert report["plain_transformers"] and report["parity"]["passed"], report["parity"]
    ids = family_input_ids()
    loaded = from_pretrained(tmp_path / "export")
    torch.testing.assert_close(out_of(loaded, ids).logits, out_of(model, ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_reads_the_family_config(tmp_path, family, capsys):
    from launcher.plan import main

    path = tmp_path / "config.json"
    path.write_text(family_config(family).to_json_string())
    code = main(["--model-config", str(path), "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem", "80",
                 "--json", str(tmp_path / "plan.json")])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["model"]["model_type"] == family
    assert plan["model"]["hidden_size"] == 32


def test_moe_mlp_target_names_what_was_looked_for():
    with pytest.raises(ConfigError, match=r"unknown LoRA target\(s\) \['up'\] for mixtral; known: \['k', 'o', 'q', "
                                          r"'v'\] \(discovery looked for .*up=up_proj/c_fc"):
        apply_adapters(make_family("mixtral"), AdapterConfig(method="lora", r=4, targets=["q", "up"]))


def test_fused_split_that_cannot_be_derived_is_named():
    model = make_family("phi3")
    model.config.num_key_value_heads = 3  # the weights were built for 2
    with pytest.raises(UnsupportedArchitectureError, match=r"model type 'phi3' is not supported.*cannot derive "
                                                           r"the q/k/v split of fused projection 'qkv_proj'"):
        spec_for(model)


def test_a_model_without_block_stack_is_named():
    from transformers import PretrainedConfig, PreTrainedModel

    class FlatConfig(PretrainedConfig):
        model_type = "flat"

    class Flat(PreTrainedModel):
        config_class = FlatConfig

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(8, 8)

    with pytest.raises(UnsupportedArchitectureError, match=r"'flat' is not supported.*no block stack"):
        spec_for(Flat(FlatConfig(hidden_size=8)))
    with pytest.raises(UnsupportedArchitectureError, match=r"'t5' is not supported.*more than one block stack"):
        from transformers import T5Config, T5ForConditionalGeneration

        spec_for(T5ForConditionalGeneration(T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                                     num_heads=4)))


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_heads_are_trained(family):
    model = apply_adapters(make_family(family), AdapterConfig(method="lor2c", r=4))
    assert all(p.requires_grad for p in model.classifier.parameters())


@pytest.mark.parametrize("family,adapter,missing", [
    ("mixtral", {"method": "lora", "r": 4, "targets": ["q", "up"]}, r"unknown LoRA target\(s\) \['up'\] for mixtral"),
    ("deepseek_v3", {"method": "reslora", "r": 4, "targets": ["gate"]}, r"unknown ResLoRA target\(s\) \['gate'\] for deepseek_v3"),
    ("t5", {"method": "lor2c", "r": 4}, r"model type 't5' is not supported.*more than one block stack"),
])
def test_train_refuses_before_any_rank_starts(tmp_path, capsys, family, adapter, missing):
    from launcher.train import main

    model = tmp_path / "model"
    model.mkdir()
    config = family_config(family) if family != "t5" else __import__("transformers").T5Config(d_model=16, num_layers=2)
    (model / "config.json").write_text(config.to_json_string())
    data = tmp_path / "data.csv"  # pre-flight checks paths first: a real file, so the architecture is what fails
    data.write_text("text,label\na b,0\nc d,1\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps({"model": str(model), "task": "classification" if family == "t5" else "causal_lm", "data": {"path": str(data)},
                                  "adapter": adapter, "output_dir": str(tmp_path / "out"), "nproc": 2}))
    assert main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lor2c-train: error:") and "\n" not in err, err
    assert __import__("re").search(missing, err), err
    assert not (tmp_path / "out").exists()
