"""ResLoRA in bf16 and mixed dtypes, and its statistics at ZeRO-3 scale (shard-local weight norms,
low-rank merge factors); split from tests/test_reslora.py, whose helpers it uses."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import make_input_ids, make_model
from lor2c_ds import AdapterConfig, apply_adapters
from lor2c_ds.adapters.reslora import merge_reslora, merged_view, reslora_modules
from lor2c_ds.reslora_training import ResLoRAStats

from test_reslora import L, _with_stats, build, projections  # noqa: F401

# ----------------------------------------------------------------------------------------------------
# bf16 and mixed dtypes
# ----------------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3). Rounding the weights and the
# activations of a 3-layer model to bf16 moves the output by a few u in relative Frobenius norm (the
# roundings are independent and partly cancel; measured 1.5u-3u here): 2e-2 (about 5u) bounds it, while
# the adapters change the last hidden state by more than 5x that (checked), so a dropped or mis-scaled
# low-rank path fails.
BF16_BOUND = 2e-2
BF16, FP32 = torch.bfloat16, torch.float32
DTYPE_CASES = [(f, v, base, ad) for f in ("llama", "bert") for v in ("is", "bs", "ms")
               for base, ad in ((BF16, BF16), (BF16, FP32), (FP32, FP32))]


def rel_diff(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build_in(family, variant, base, adapter, like):
    """`like` (fp32) loaded into a model in `base` dtype, whose ResLoRA weights are then cast to `adapter`."""
    model = make_model(family).to(base)
    apply_adapters(model, AdapterConfig(method="reslora", r=4, alpha=8.0, reslora_variant=variant,
                                        pre_num=1 if variant == "is" else 2))
    assert all(m.lora_A.weight.dtype == base for _, m in reslora_modules(model))  # its projection's dtype
    for _, m in reslora_modules(model):
        m.to(adapter)
    model.load_state_dict(like.state_dict())
    return model


@pytest.mark.parametrize("family,variant,base,adapter", DTYPE_CASES,
                         ids=[f"{f}-{v}-{str(b)[6:]}-{str(a)[6:]}" for f, v, b, a in DTYPE_CASES])
def test_bf16_and_mixed_dtypes_match_fp32(family, variant, base, adapter):
    ref = build(family, variant, 1 if variant == "is" else 2)
    model = build_in(family, variant, base, adapter, ref)
    for m in (ref, model):
        _with_stats(m, [(1.0 + i, 2.0 + i, 3.0 + i) for i in range(2 * L)])
    ids = make_input_ids(batch=3, seq=8)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    bound = 1e-5 if base == adapter == FP32 else BF16_BOUND
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert got.logits.dtype == base
        plain = make_model(family)(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert rel_diff(plain.hidden_states[-1], want.hidden_states[-1]) > 5 * BF16_BOUND
        assert rel_diff(got.logits, want.logits) < bound
        assert rel_diff(got.hidden_states[-1], want.hidden_states[-1]) < bound
        with merged_view(ref):
            merged_want = ref(input_ids=ids, attention_mask=mask).logits
        with merged_view(model):
            merged_got = model(input_ids=ids, attention_mask=mask).logits
        assert merged_got.dtype == base and rel_diff(merged_got, merged_want) < bound
    # training: gradients in the adapter dtype; statistics in fp64, within the bound of fp32's
    for m in (ref, model):
        m.train()
        m(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean().backward()
        assert all(mod.acc.dtype == torch.float64 for _, mod in reslora_modules(m))
        ResLoRAStats().step(m)
    for (_, a), (_, b) in zip(reslora_modules(ref), reslora_modules(model)):
        for w in (b.lora_A.weight, b.lora_B.weight):
            assert w.grad.dtype == adapter and bool(torch.isfinite(w.grad).all()) and w.grad.abs().max() > 0
        assert b.stats == pytest.approx(a.stats, rel=bound, nan_ok=True)


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("adapter", [BF16, FP32], ids=["bf16", "fp32"])
def test_bs_merge_into_bf16(family, adapter):
    ref = build(family, "bs", 2)
    model = build_in(family, "bs", BF16, adapter, ref).eval()
    ids = make_input_ids(batch=3, seq=8)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        merged = merge_reslora(copy.deepcopy(model))
        out = merged(input_ids=ids).logits
    assert all(p.dtype == BF16 for p in merged.parameters()) and out.dtype == BF16
    assert rel_diff(out, want) < BF16_BOUND
    # W' is W + delta rounded once to bf16, delta computed in fp32: within half a bf16 ulp (2^-8 relative)
    for t in ("q", "v"):
        before, _ = projections(model, t)
        after, _ = projections(merged, t)
        res = [p.get_submodule(f"reslora_{t}") for p in before]
        for n in range(L):
            exact = before[n].weight.float() + res[n].scaling * sum(
                res[k].lora_B.weight.float() @ res[k].lora_A.weight.float() for k in range(max(0, n - 2), n + 1))
            err = (after[n].weight.float() - exact).abs()
            assert bool((err <= 2.0 ** -8 * exact.abs() * (1 + 1e-3)).all()), (t, n, err.max())



@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("world", [2, 3])
def test_weight_norm_from_flat_partitions_equals_whole(family, world):
    """The shard-local form of ||W + s B A||: each simulated rank holds a flat slice of W (ZeRO-3's
    layout, cut mid-row); summing their partials == the norm of the whole matrix (gpt2: fused c_attn)."""
    from lor2c_ds.reslora_training import weight_norms, weight_partials

    model = build(family, "is", 1, ["q", "v"], merge_rule="weights")
    with torch.no_grad():
        for _, m in reslora_modules(model):
            m.lora_B.weight.normal_(0, 0.3)
    named = reslora_modules(model)
    mods = [m for _, m in named]
    parents = {id(m): model.get_submodule(n.rpartition(".")[0]) for n, m in named}

    def slices(rank):
        def partition(param):
            flat = param.detach().reshape(-1)
            size = -(-flat.numel() // world)
            return flat[rank * size:(rank + 1) * size], rank * size
        return partition

    parts = [weight_partials(model, mods, partition=slices(r), rank=r)[0] for r in range(world)]
    low_rank = weight_partials(model, mods, partition=slices(0))[1]
    sharded = (sum(parts) + low_rank).sqrt()
    whole = weight_norms(model, mods)  # every weight held whole: counted once, on rank 0
    want = []
    for m in mods:
        proj = parents[id(m)]
        W = proj.weight if isinstance(proj, nn.Linear) else proj.weight.T
        width = m.lora_B.weight.shape[0]
        W = W[m.chunk * width:(m.chunk + 1) * width].double()
        want.append((W + m.scaling * m.lora_B.weight.double() @ m.lora_A.weight.double()).norm().item())
    torch.testing.assert_close(sharded, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(whole, torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=0)
    assert weight_partials(model, mods, rank=1)[0].abs().sum() == 0  # a whole weight is not counted twice


@pytest.mark.parametrize("variant,m,rule", [("is", 1, "inputs"), ("is", 1, "weights"), ("bs", 2, None),
                                            ("ms", 2, "inputs"), ("ms", 2, "middle")])
def test_merged_view_holds_low_rank_factors_only(variant, m, rule):
    """The merge report's deltas are (d_out x k, k x d_in) with k <= (m+1) r, and L @ R == delta_weight."""
    model = build("llama", variant, m, ["q", "v"], merge_rule=rule)
    _with_stats(model, [(1.0 + 0.1 * i, 2.0 - 0.05 * i, 3.0 + 0.2 * i) for i in range(2 * L)])
    with merged_view(model):
        for _, mod in reslora_modules(model):
            left, right = mod._merged_delta
            d_out, d_in = mod.lora_B.weight.shape[0], mod.lora_A.weight.shape[1]
            assert left.shape[0] == d_out and right.shape[1] == d_in
            assert left.shape[1] == right.shape[0] <= (m + 1) * mod.r
            torch.testing.assert_close(left @ right, mod.delta_weight(), rtol=1e-6, atol=1e-7)
