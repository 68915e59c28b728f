"""ResLoRA (METHOD.md 9): the three variants against independent computations of their formulas, the
merge rules, the statistics, config errors, activation checkpointing, and (slow) 2-rank runs."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import FAMILIES, TINY_LAYERS, make_input_ids, make_model
from lor2c_ds import AdapterConfig, apply_adapters
from lor2c_ds.adapters.config import ConfigError
from lor2c_ds.adapters.reslora import ResLoRA, merge_reslora, merged_view, reslora_modules
from lor2c_ds.reslora_training import ResLoRAStats, load_reslora_stats, merge_report, save_reslora_stats
from lor2c_ds.registry import find_blocks, spec_for

L = TINY_LAYERS
VARIANTS = [("is", 1), ("bs", 1), ("bs", 2), ("ms", 1), ("ms", 2)]


def build(family, variant, m=1, targets=None, r=4, alpha=8.0, merge_rule=None, seed=7, dtype=torch.float32):
    model = make_model(family).to(dtype)
    apply_adapters(model, AdapterConfig(method="reslora", r=r, alpha=alpha, targets=targets,
                                        reslora_variant=variant, pre_num=m, merge_rule=merge_rule))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def projections(model, target):
    spec = spec_for(model)
    proj = spec.projections[target]
    return [b.get_submodule(proj.path) for b in find_blocks(model, spec)], proj


def base_out(proj_module, x):
    if isinstance(proj_module, nn.Linear):
        return F.linear(x, proj_module.weight, proj_module.bias)
    return x @ proj_module.weight + proj_module.bias  # Conv1D


def reference_delta(variant, m, s, xs, As, Bs, n):
    """The formula of METHOD.md 9, with plain tensor ops (x: (..., d_in), A: (r, d_in), B: (d_out, r))."""
    if variant == "is":
        prev = xs[n - 1] if n > 0 else xs[n]
        return s * ((xs[n] + prev) @ As[n].T @ Bs[n].T)
    if variant == "bs":
        return s * sum(xs[n] @ As[n - k].T @ Bs[n - k].T for k in range(m + 1) if n - k >= 0)
    mid = xs[n] @ As[n].T + sum(xs[n - k] @ As[n - k].T for k in range(1, m + 1) if n - k >= 0)
    return s * (mid @ Bs[n].T)


def weights_of(model, target):
    mods, _ = projections(model, target)
    res = [getattr(p, f"reslora_{target}") for p in mods]
    return [r.lora_A.weight.detach() for r in res], [r.lora_B.weight.detach() for r in res]


# ----------------------------------------------------------------------------------------------------
# forward = formula
# ----------------------------------------------------------------------------------------------------

FORWARD_CASES = [(f, v, m, t) for f in FAMILIES for v, m in VARIANTS for t in (["q", "v"],)] + [
    ("llama", "ms", 2, ["q", "down"]), ("gpt2", "bs", 2, ["v"])]


@pytest.mark.parametrize("family,variant,m,targets", FORWARD_CASES,
                         ids=[f"{f}-{v}{m}-{'+'.join(t)}" for f, v, m, t in FORWARD_CASES])
def test_forward_matches_independent_formula(family, variant, m, targets):
    r, alpha = 4, 12.0
    model = build(family, variant, m, targets, r=r, alpha=alpha)
    seen = {}  # projection -> (input, final output), captured after the adapters' hooks
    for t in targets:
        mods, _ = projections(model, t)
        for i, p in enumerate(mods):
            if p not in seen:
                seen[p] = None
                p.register_forward_hook(lambda mod, a, o: seen.__setitem__(mod, (a[0].detach(), o.detach())))
    with torch.no_grad():
        model(input_ids=make_input_ids())
    for p in seen:
        x, out = seen[p]
        expected = base_out(p, x)
        for t in targets:
            mods, proj = projections(model, t)
            if p not in mods:
                continue
            n = mods.index(p)
            As, Bs = weights_of(model, t)
            xs = [seen[q][0] for q in mods]
            delta = reference_delta(variant, m, alpha / r, xs, As, Bs, n)
            width = delta.shape[-1]
            expected = expected + F.pad(delta, (proj.chunk * width, (proj.chunks - proj.chunk - 1) * width))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant,m", [("is", 1), ("bs", 2), ("ms", 2)])
def test_gradients_flow_through_the_shortcuts(variant, m):
    model = build("llama", variant, m, ["q"])
    model.train()
    mods, _ = projections(model, "q")
    res = [p.reslora_q for p in mods]
    # the blocks in layer order on independent leaf inputs: block n reaches block n-k only by a shortcut
    xs = [torch.randn(2, 5, mods[0].in_features, requires_grad=True) for _ in range(L)]
    outs = [mod(x) for mod, x in zip(res, xs)]
    last = L - 1
    wrt = [res[last - 1].lora_A.weight, res[last - 1].lora_B.weight, xs[last - 1]]
    gA, gB, gx = torch.autograd.grad(outs[last].sum(), wrt, allow_unused=True, retain_graph=True)
    if variant == "is":  # x_{n-1} enters block n
        assert gx.abs().max() > 0 and gA is None and gB is None
    elif variant == "bs":  # B_{n-1} A_{n-1} act on x_n
        assert gA.abs().max() > 0 and gB.abs().max() > 0 and gx is None
    else:  # A_{n-1} x_{n-1} enters B_n
        assert gA.abs().max() > 0 and gx.abs().max() > 0 and gB is None
    if m == 2:  # two layers down too
        g2 = torch.autograd.grad(outs[last].sum(), res[last - 2].lora_A.weight, allow_unused=True)[0]
        assert g2 is not None and g2.abs().max() > 0
    # and the whole-model gradient reaches every A and B
    model.zero_grad()
    model(input_ids=make_input_ids()).logits.pow(2).mean().backward()
    for mod in res:
        assert mod.lora_A.weight.grad.abs().max() > 0 and mod.lora_B.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("m", [1, 2])
def test_bs_merge_is_exact_and_plain(family, m):
    model = build(family, "bs", m).eval()
    ids = make_input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    merged = merge_reslora(copy.deepcopy(model))
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    assert (out - ref).norm() / ref.norm() <= 1e-5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # an ordinary model: no adapter modules, no hooks left, the base model's state-dict keys
    assert not reslora_modules(merged) and not hasattr(merged, "adapter_config")
    assert set(merged.state_dict()) == set(make_model(family).state_dict())
    assert not any(m_._forward_hooks or m_._forward_pre_hooks for m_ in merged.modules())


def _with_stats(model, rows):
    for (name, mod), row in zip(reslora_modules(model), rows):
        mod.stats = row


@pytest.mark.parametrize("variant,m,rule", [("is", 1, "inputs"), ("is", 1, "weights"), ("ms", 2, "inputs"),
                                            ("ms", 2, "middle"), ("ms", 1, "middle")])
def test_is_ms_merges_follow_formulas(variant, m, rule):
    r, alpha = 4, 8.0
    s = alpha / r
    model = build("bert", variant, m, ["q"], r=r, alpha=alpha, merge_rule=rule)
    mods, _ = projections(model, "q")
    # recorded norms per block: (input, middle, weight)
    f = [(1.0 + n, 2.0 + 3 * n, 5.0 - n) for n in range(L)]
    _with_stats(model, f)
    As, Bs = weights_of(model, "q")
    W0 = [p.weight.detach().clone() for p in mods]
    merged = merge_reslora(copy.deepcopy(model))
    mods2, _ = projections(merged, "q")
    for n in range(L):
        if variant == "is" and rule == "inputs":
            ratio = 1.0 if n == 0 else f[n - 1][0] / f[n][0]
            delta = (1 + ratio) * s * Bs[n] @ As[n]
        elif variant == "is":
            ratio = 1.0 if n < 2 else f[n - 2][2] / f[n - 1][2]
            delta = (1 + ratio) * s * Bs[n] @ As[n]
        elif rule == "inputs":
            mixed = As[n] + sum(f[n - k][0] / f[n][0] * As[n - k] for k in range(1, m + 1) if n - k >= 0)
            delta = s * Bs[n] @ mixed
        else:
            factor = 1 + sum(f[n - k][1] / f[n][1] for k in range(1, m + 1) if n - k >= 0)
            delta = factor * s * Bs[n] @ As[n]
        torch.testing.assert_close(mods[n].reslora_q.delta_weight(), delta, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mods2[n].weight, W0[n] + delta, rtol=1e-6, atol=1e-7)
        assert torch.equal(mods[n].weight, W0[n])  # the training model's W is untouched


def test_is_merge_without_statistics_is_an_error():
    model = build("bert", "is")
    with pytest.raises(RuntimeError, match="needs recorded statistics"):
        merge_reslora(copy.deepcopy(model))


def test_first_is_block_merges_exactly():
    """Block 0 uses x_{-1} := x_0, so its merge (factor 2) is exact whatever the statistics."""
    model = build("bert", "is", targets=["q"])
    _with_stats(model, [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (2.0, 1.0, 1.0)])
    q0 = projections(model, "q")[0][0]
    x = torch.randn(2, 5, q0.in_features)
    with torch.no_grad():
        ref = q0(x)
        merged = merge_reslora(copy.deepcopy(model))
        out = projections(merged, "q")[0][0](x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------

def rms(parts):
    """sqrt(sum_t ||v_t||^2 / T) over (vectors (b, t, d), mask (b, t)) pairs, in fp64: METHOD.md 9's f."""
    sq = sum((v.double().pow(2).sum(-1) * w).sum().item() for v, w in parts)
    return math.sqrt(sq / sum(w.sum().item() for _, w in parts))


def mean_norm(parts):  # the old statistic, to check that a test tells the two apart
    return sum((v.double().norm(dim=-1) * w).sum().item() for v, w in parts) / sum(w.sum().item() for _, w in parts)


def spread_token_norms(mods):
    """Pre-hooks scaling the projections' input tokens by 1e-2 .. 1e2 by position: very different norms."""
    def hook(mod, args):
        x = args[0]
        scale = 10.0 ** (torch.arange(x.shape[-2], dtype=x.dtype) % 5 - 2)
        return (x * scale[:, None],) + tuple(args[1:])
    for p in mods:
        p.register_forward_pre_hook(hook)


def record_inputs(mods):
    """Training-mode projection inputs per block, one list entry per forward (after the pre-hooks)."""
    xs = {}
    for i, p in enumerate(mods):
        p.register_forward_hook(lambda mod, a, o, i=i: xs.setdefault(i, []).append(a[0].detach())
                                if mod.training else None)
    return xs


def middles(variant, res, xs, n):
    """a_n of each forward, from the recorded inputs: A_n x_n (ms), A_n (x_n + x_{n-1}) (is)."""
    A = res[n].lora_A.weight.detach()
    return [((x + (xs[n - 1][j] if n else x)) if variant == "is" else x) @ A.T for j, x in enumerate(xs[n])]


def summed_over_ranks(models):
    """`reduce` for models[0]'s step: adds the other (simulated) ranks' accumulators, then clears them."""
    others = [torch.stack([m.acc for _, m in reslora_modules(model)]) for model in models[1:]]
    for model in models[1:]:
        for _, m in reslora_modules(model):
            m.acc = None
    return lambda t: t + sum(others) if others else t


@pytest.mark.parametrize("family,variant", [("llama", "ms"), ("bert", "is")])
def test_statistics_do_not_depend_on_the_batch_split(family, variant):
    """One global batch (padding in it) as 1 micro-batch, as 2 uneven ones, or on 2 simulated ranks whose
    accumulators are summed: the same f = sqrt(sum_t ||x_t||^2 / T), equal to the one computed from the
    projection inputs (fp64 model, so 1e-12 relative holds through the backbone's arithmetic)."""
    ids = make_input_ids(batch=4, seq=6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 2:], mask[3, 4:] = 0, 0
    results = []
    for parts in ([[slice(0, 4)]], [[slice(0, 1), slice(1, 4)]], [[slice(0, 3)], [slice(3, 4)]]):
        models = [build(family, variant, 1, ["q"], dtype=torch.float64).train() for _ in parts]
        xs = []
        for model, micro in zip(models, parts):
            mods, _ = projections(model, "q")
            spread_token_norms(mods)
            xs.append(record_inputs(mods))
            for rows in micro:
                model(input_ids=ids[rows], attention_mask=mask[rows])
        ResLoRAStats().step(models[0], reduce=summed_over_ranks(models))
        results.append([m.stats for _, m in reslora_modules(models[0])])
        if len(results) == 1:
            one = xs[0]  # the single micro-batch's inputs
        assert all(m.acc is None for model in models for _, m in reslora_modules(model))
    res = [p.reslora_q for p in projections(models[0], "q")[0]]
    for n in range(L):
        want_x, want_a = rms([(one[n][0], mask)]), rms([(middles(variant, res, one, n)[0], mask)])
        assert abs(mean_norm([(one[n][0], mask)]) / want_x - 1) > 0.1  # the old per-token mean differs
        for stats in results:
            assert stats[n][0] == pytest.approx(want_x, rel=1e-12, abs=0)
            assert stats[n][1] == pytest.approx(want_a, rel=1e-12, abs=0)


@pytest.mark.parametrize("family,variant,rule", [("bert", "ms", "middle"), ("gpt2", "is", "weights"),
                                                 ("llama", "is", "inputs")])
def test_statistics_are_window_rms_of_the_norms(family, variant, rule):
    """Over the window: f = sqrt(sum of the steps' sum_t ||x_t||^2 / sum of their T), not a mean of
    per-step values; weight: the mean of the per-step ||W + s B A||_F. Resuming continues it exactly."""
    model = build(family, variant, 1, ["q"], merge_rule=rule)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    mods, proj = projections(model, "q")
    res = [p.reslora_q for p in mods]
    spread_token_norms(mods)
    xs = record_inputs(mods)
    stats = ResLoRAStats(window=3)
    model.train()
    steps = []  # per step and block: (input parts, middle parts, weight norm)
    for step in range(5):
        xs.clear()
        masks = []
        for micro in range(2):  # two micro-batches per optimizer step, of different sizes, one padded
            ids = make_input_ids(batch=2 + micro, seed=step * 10 + micro)
            mask = torch.ones_like(ids)
            mask[0, 5 - step % 3:] = micro
            masks.append(mask)
            model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        with torch.no_grad():
            # evaluation and no-grad forwards record nothing
            model.eval()
            model(input_ids=make_input_ids(seed=99))
            model.train()
        rows = []
        for n in range(L):
            W = mods[n].weight if isinstance(mods[n], nn.Linear) else mods[n].weight.T
            width = res[n].lora_B.weight.shape[0]
            W = W[proj.chunk * width:(proj.chunk + 1) * width]
            wn = (W + res[n].scaling * res[n].lora_B.weight @ res[n].lora_A.weight).norm().item()
            rows.append((list(zip(xs[n], masks)), list(zip(middles(variant, res, xs, n), masks)),
                         wn if rule == "weights" else math.nan))
        steps.append(rows)
        stats.step(model)
    assert len(stats.window) == 3
    for n, mod in enumerate(res):
        last = [steps[s][n] for s in (2, 3, 4)]
        want_x, want_a = rms(sum((r[0] for r in last), [])), rms(sum((r[1] for r in last), []))
        assert abs(want_x / (sum(rms(r[0]) for r in last) / 3) - 1) > 1e-4  # not a mean of per-step values
        assert mod.stats[0] == pytest.approx(want_x, rel=1e-5)
        assert mod.stats[1] == pytest.approx(want_a, rel=1e-5)
        want_w = sum(r[2] for r in last) / 3
        assert math.isnan(mod.stats[2]) if math.isnan(want_w) else mod.stats[2] == pytest.approx(want_w, rel=1e-5)
    for name, p in model.named_parameters():  # statistics never touch a frozen weight
        if not p.requires_grad:
            assert torch.equal(p, frozen[name]), name
    # JSON round trip (as in run_state.json), pushed into a fresh model, then one more step on both
    state = json.loads(json.dumps(stats.state_dict()))
    again = ResLoRAStats(window=3)
    again.load_state_dict(state)
    fresh = build(family, variant, 1, ["q"], merge_rule=rule)
    again.push_to(fresh)
    model(input_ids=make_input_ids(seed=5)).logits.sum().backward()
    accs = [m.acc.clone() for _, m in reslora_modules(model)]
    for (_, m), acc in zip(reslora_modules(fresh), accs):
        m.acc = acc
    fresh.load_state_dict(model.state_dict())
    stats.step(model)
    again.step(fresh)
    assert json.dumps(again.state_dict()) == json.dumps(stats.state_dict())
    for (_, a), (_, b) in zip(reslora_modules(model), reslora_modules(fresh)):
        assert all(math.isnan(u) and math.isnan(v) or u == v for u, v in zip(a.stats, b.stats))


def test_statistics_leave_padding_out():
    model = build("bert", "ms", 1, ["q"]).train()
    ids = make_input_ids(batch=2, seq=6)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    q0 = projections(model, "q")[0][0]
    xs = []
    q0.register_forward_hook(lambda mod, a, o: xs.append(a[0].detach()))
    model(input_ids=ids, attention_mask=mask)
    st = ResLoRAStats()
    st.step(model)
    assert reslora_modules(model)[0][1].stats[0] == pytest.approx(rms([(xs[0], mask)]), rel=1e-6)


def test_old_format_window_is_refused():
    """A window of per-step means (3 per module, no "format") cannot be turned into sums: refused."""
    names = [n for n, _ in reslora_modules(build("bert", "ms"))]
    with pytest.raises(ValueError, match=r"old format.*per-step means.*cannot be converted"):
        ResLoRAStats().load_state_dict({"names": names, "window": [[1.0, 2.0, math.nan] * len(names)]})
    ResLoRAStats().load_state_dict({"names": [], "window": []})  # nothing recorded: nothing to convert


def test_stats_files_round_trip(tmp_path):
    model = build("bert", "ms", 2)
    _with_stats(model, [(1.0 + i, 2.0, math.nan) for i in range(2 * L)])
    save_reslora_stats(model, tmp_path)
    fresh = build("bert", "ms", 2)
    load_reslora_stats(fresh, tmp_path)
    for (_, a), (_, b) in zip(reslora_modules(model), reslora_modules(fresh)):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())


# ----------------------------------------------------------------------------------------------------
# evaluation of the merge: reported, and read-only on the base
# ----------------------------------------------------------------------------------------------------

def _batches(task, n=2):
    out = []
    for i in range(n):
        ids = make_input_ids(batch=3, seq=6, seed=50 + i)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0
        labels = torch.tensor([0, 1, 1]) if task == "classification" else ids.clone()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels, "valid": torch.tensor([1, 1, 0])})
    return out


@pytest.mark.parametrize("family,variant,task", [("bert", "ms", "classification"), ("llama", "is", "causal_lm"),
                                                 ("gpt2", "bs", "causal_lm")])
def test_merge_report_matches_merged_copy_and_leaves_base_bit_identical(family, variant, task):
    model = build(family, variant, 2 if variant != "is" else 1)
    _with_stats(model, [(1.0 + i, 2.0 + i, 3.0) for i in range(2 * L)])
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    report = merge_report(model, _batches(task), task)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the merged view equals the plain merged model
    merged = merge_reslora(copy.deepcopy(model)).eval()
    with torch.no_grad():
        for b in _batches(task):
            with merged_view(model):
                view = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            plain = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            torch.testing.assert_close(view, plain, rtol=1e-5, atol=1e-5)
    metric = "accuracy" if task == "classification" else "perplexity"
    assert {f"{metric}_train_graph", f"{metric}_merged", "rel_logit_diff", "max_abs_logit_diff"} <= set(report)
    if variant == "bs":
        assert report["rel_logit_diff"] <= 1e-5
    else:
        assert report["rel_logit_diff"] > 1e-5  # approximate, and reported as such


# ----------------------------------------------------------------------------------------------------
# structure: state dict, deep copies
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,m", [("is", 1), ("bs", 3), ("ms", 3)])
def test_state_dict_holds_each_weight_once(variant, m):
    model = build("llama", variant, m)
    lora = make_model("llama")
    apply_adapters(lora, AdapterConfig(method="lora", r=4, alpha=8.0))
    keys = [k for k in model.state_dict() if "reslora" in k]
    assert len(keys) == 2 * 2 * L  # A and B, per target (q, v), per layer
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in lora.parameters() if p.requires_grad)


def test_deep_copy_rebinds_hooks_and_groups():
    model = build("bert", "ms", 2).eval()
    ids = make_input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        for name, p in twin.named_parameters():
            if name.endswith("lora_A.weight"):
                p.mul_(2)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=0, atol=0)
        assert not torch.allclose(twin(input_ids=ids).logits, ref)
    for _, mod in reslora_modules(twin):
        assert all(any(member is t for _, t in reslora_modules(twin)) for member in mod.group.members)


def test_inputs_never_outlive_a_forward():
    model = build("bert", "is").train()
    model(input_ids=make_input_ids()).logits.sum().backward()
    assert all(not mod.group.saved for _, mod in reslora_modules(model))
    model(input_ids=make_input_ids(batch=5, seq=4))  # another shape next time: no stale tensors


# ----------------------------------------------------------------------------------------------------
# config errors
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"reslora_variant": "bs", "pre_num": 0}, r"pre_num=0.*needs pre_num >= 1"),
    ({"reslora_variant": "ms", "pre_num": -1}, r"pre_num=-1"),
    ({"reslora_variant": "is", "pre_num": 2}, r"pre_num must be 1"),
    ({"reslora_variant": "xs"}, r"unknown adapter.reslora_variant"),
    ({"reslora_variant": "is", "merge_rule": "middle"}, r"adapter.merge_rule 'middle'.*\['inputs', 'weights'\]"),
    ({"reslora_variant": "bs", "merge_rule": "inputs"}, r"adapter.merge_rule 'inputs'.*\['exact'\]"),
    ({"reslora_variant": "ms", "merge_rule": "nope"}, r"adapter.merge_rule 'nope'"),
    ({"spans": [[0, 1]]}, r"adapter.spans"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdapterConfig.from_dict({"method": "reslora", **kwargs})


def test_reslora_keys_need_the_reslora_method():
    with pytest.raises(ConfigError, match="need method: reslora"):
        AdapterConfig(method="lora", reslora_variant="ms").validate()


def test_targets_that_do_not_line_up_are_refused():
    model = make_model("bert")
    find_blocks(model, spec_for(model))[1].attention.self.query = nn.Linear(32, 16)
    with pytest.raises(ConfigError, match=r"target 'q' does not line up across layers"):
        apply_adapters(model, AdapterConfig(method="reslora", r=4))
    with pytest.raises(ConfigError, match=r"unknown ResLoRA target"):
        apply_adapters(make_model("bert"), AdapterConfig(method="reslora", r=4, targets=["gate"]))


# ----------------------------------------------------------------------------------------------------
# activation checkpointing
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["is", "ms"])
def test_checkpointing_with_cross_layer_inputs_is_a_clear_error(variant):
    model = make_model("llama")
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="activation checkpointing"):
        apply_adapters(model, AdapterConfig(method="reslora", r=4, reslora_variant=variant))
    model = build("llama", variant)  # enabled after the adapters
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(RuntimeError, match="activation checkpointing"):
        model(input_ids=make_input_ids())
    model.eval()
    with torch.no_grad():  # inference is unaffected
        model(input_ids=make_input_ids())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_bs_checkpointing_gives_the_same_gradients_and_statistics(family):
    ids = make_input_ids()
    grads, stats = [], []
    for ckpt in (False, True):
        model = make_model(family)
        if ckpt:
            model.gradient_checkpointing_enable()
        model = build_on(model, "bs", 2)
        model.train()
        out = model(input_ids=ids).logits
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * w).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        st = ResLoRAStats()
        st.step(model)
        stats.append(st.window[0])
    for k in grads[0]:
        assert grads[0][k].abs().max() > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)
    assert stats[0] == pytest.approx(stats[1], rel=1e-6, nan_ok=True)  # recomputation is not counted twice


def build_on(model, variant, m):
    apply_adapters(model, AdapterConfig(method="reslora", r=4, alpha=8.0, reslora_variant=variant, pre_num=m))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_modules_are_resLoRA():
    model = build("gpt2", "ms", 2)
    assert all(isinstance(m, ResLoRA) for _, m in reslora_modules(model)) and len(reslora_modules(model)) == 2 * L
