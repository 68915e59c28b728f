"""Adapters on tiny random models, single process: LoRA, LoR2C and ShareLoR2C against independent
re-implementations of the math in METHOD.md sections 1-3, and the PEFT-style plumbing around them."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (FAMILIES, TINY_HEADS, TINY_HIDDEN, TINY_INTERMEDIATE, TINY_KV_HEADS, TINY_LABELS,
                      TINY_LAYERS, make_input_ids, make_model)
from lor2c_ds import (AdapterConfig, ConfigError, apply_adapters, trainable_summary)
from lor2c_ds.registry import find_blocks, spec_for

D, L = TINY_HIDDEN, TINY_LAYERS
HEAD_PARAMS = {"bert": D * TINY_LABELS + TINY_LABELS, "llama": 0, "gpt2": 0}  # trainable task heads


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def randomize_B(model: nn.Module, seed: int = 7, scale: float = 0.5) -> None:
    """Give every up-projection B (zero at init) random non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return find_blocks(model, spec_for(model))


def span_delta(h_start: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """s * B A h, with plain tensor ops (h: (..., d), A: (r, d), B: (d, r))."""
    return s * ((h_start @ A.T) @ B.T)


def run_blocks(h, blocks, call, adapters):
    """Independent LoR2C reference: `adapters` is a list of (start, end, A, B, s); the hidden state
    entering `start` is remembered and s * B A h_start is added to the output of block `end`."""
    by_start = {a[0]: a for a in adapters}
    by_end = {a[1]: a for a in adapters}
    saved = {}
    for i, block in enumerate(blocks):
        if i in by_start:
            saved[i] = h
        out = call(block, h)
        h = out[0] if isinstance(out, tuple) else out
        if i in by_end:
            start, _, A, B, s = by_end[i]
            h = h + span_delta(saved.pop(start), A, B, s)
    assert not saved, "reference loop: a span never ended"
    return h


def bert_reference(base, ids, adapters):
    h = base.bert.embeddings(input_ids=ids)
    return run_blocks(h, base.bert.encoder.layer, lambda blk, x: blk(x, attention_mask=None), adapters)


def llama_reference(base, ids, adapters):
    inner = base.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    pe = inner.rotary_emb(h, position_ids=pos)
    h = run_blocks(h, inner.layers,
                   lambda blk, x: blk(x, attention_mask=None, position_embeddings=pe, position_ids=pos),
                   adapters)
    return inner.norm(h)


def adapters_of(model, alpha: float, r: int):
    """(start, end, A, B, s) for every LoR2C adapter of `model`, s computed independently."""
    out = []
    for key, adapter in model.lor2c.adapters.items():
        start, end = adapter.start, adapter.end
        assert key == str(start)
        out.append((start, end, adapter.down.weight.detach(), adapter.lora_B.weight.detach(), alpha / r))
    return out


# ----------------------------------------------------------------------------------------------------
# LoRA: the adapted projection equals W x + b + s B A x
# ----------------------------------------------------------------------------------------------------

LORA_CASES = [
    ("bert", ["q", "v"]),
    ("llama", ["q", "v", "down"]),
    ("gpt2", ["q"]),
    ("gpt2", ["v"]),
    ("gpt2", ["q", "v"]),
]


@pytest.mark.parametrize("family,targets", LORA_CASES, ids=[f"{f}-{'+'.join(t)}" for f, t in LORA_CASES])
def test_lora_projection_matches_independent_formula(family, targets):
    r, alpha = 4, 12.0
    s = alpha / r
    model = make_model(family)
    apply_adapters(model, AdapterConfig(method="lora", r=r, alpha=alpha, targets=targets))
    randomize_B(model)
    spec = spec_for(model)
    blocks = blocks_of(model)

    # Capture every adapted projection's input and (adapted) output; these hooks run after LoRA's.
    captured = {}
    paths = {spec.projections[t].path for t in targets}
    for i, block in enumerate(blocks):
        for path in paths:
            def grab(module, args, output, key=(i, path)):
                captured[key] = (args[0].detach(), output.detach())
            block.get_submodule(path).register_forward_hook(grab)
    with torch.no_grad():
        model(input_ids=make_input_ids())
    assert len(captured) == len(blocks) * len(paths)

    for (i, path), (x, y) in captured.items():
        proj = blocks[i].get_submodule(path)
        weight = proj.weight if isinstance(proj, nn.Linear) else proj.weight.T  # Conv1D stores (in, out)
        plain = F.linear(x, weight, proj.bias)
        with torch.no_grad():
            raw = proj.forward(x)  # the frozen projection alone (calling forward skips the hooks)
        torch.testing.assert_close(raw, plain, rtol=1e-5, atol=1e-6)

        chunks = {t: spec.projections[t] for t in targets if spec.projections[t].path == path}
        nchunks = next(iter(chunks.values())).chunks
        width = y.shape[-1] // nchunks
        expected = plain.clone()
        for t, p in chunks.items():
            lora = getattr(proj, f"lora_{t}")
            A, B = lora.lora_A.weight.detach(), lora.lora_B.weight.detach()
            assert A.shape == (r, x.shape[-1]) and B.shape == (width, r)
            delta = s * ((x @ A.T) @ B.T)
            assert delta.abs().max() > 1e-2  # the adapter really contributes
            expected[..., p.chunk * width:(p.chunk + 1) * width] += delta
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

        # Fused projection: the slices of targets that are not adapted are bit-for-bit unchanged.
        adapted = {p.chunk for p in chunks.values()}
        for c in range(nchunks):
            sl = slice(c * width, (c + 1) * width)
            if c in adapted:
                assert not torch.allclose(y[..., sl], raw[..., sl], atol=1e-3)
            else:
                assert torch.equal(y[..., sl], raw[..., sl]), f"slice {c} of {path} changed"


def test_lora_unknown_target_is_refused():
    from lor2c_ds import ConfigError
    with pytest.raises(ConfigError, match=r"unknown LoRA target.*'qq'"):
        apply_adapters(make_model("bert"), AdapterConfig(method="lora", targets=["q", "qq"]))


# ----------------------------------------------------------------------------------------------------
# LoR2C: the model equals a manual loop over the base blocks plus s B A h_start at block `end`
# ----------------------------------------------------------------------------------------------------

SPANS = [None, [[0, 1], [2, 2]], [[0, 2]], [[1, 2]], [[0, 0], [2, 2]]]
SPAN_IDS = ["default", "0-1+2", "0-2", "1-2_only", "0+2_gap"]


@pytest.mark.parametrize("spans", SPANS, ids=SPAN_IDS)
@pytest.mark.parametrize("method", ["lor2c", "share_lor2c"])
def test_lor2c_bert_matches_manual_loop(spans, method):
    r, alpha = 4, 10.0
    model = make_model("bert")
    base = copy.deepcopy(model)  # before adapters
    ids = make_input_ids()
    with torch.no_grad():
        base_out = base.bert(input_ids=ids).last_hidden_state
        # sanity: the reference loop reproduces the unadapted encoder
        torch.testing.assert_close(bert_reference(base, ids, []), base_out, rtol=1e-5, atol=1e-6)

    apply_adapters(model, AdapterConfig(method=method, r=r, alpha=alpha, spans=spans))
    randomize_B(model)
    expected_spans = [(i, i) for i in range(L)] if spans is None else [tuple(s) for s in spans]
    assert sorted(model.lor2c.adapters) == sorted(str(s) for s, _ in expected_spans)
    assert sorted((a.start, a.end) for a in model.lor2c.adapters.values()) == sorted(map(tuple, expected_spans))
    with torch.no_grad():
        got = model.bert(input_ids=ids).last_hidden_state
        want = bert_reference(base, ids, adapters_of(model, alpha, r))
    assert not torch.allclose(got, base_out, atol=1e-3)  # the shortcuts change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _bert_block_with_delta_before_its_last_norm(block, h, delta):
    """A BERT block by hand, the delta added to the input of its output LayerNorm (dropout is off)."""
    attn = block.attention(h)[0]
    out = block.output
    return out.LayerNorm(out.dense(block.intermediate(attn)) + attn + delta)


@pytest.mark.parametrize("spans", [None, [[0, 1], [2, 2]]], ids=["default", "0-1+2"])
def test_lor2c_delta_at_a_submodule_input_matches_a_manual_bert_loop(spans):
    """adapter.delta_at names a module inside the end block: the delta joins that module's input
    (for BERT's output.LayerNorm: before the block's last norm) instead of the block's output."""
    r, alpha = 4, 10.0
    model = make_model("bert").eval()
    base = copy.deepcopy(model)
    ids = make_input_ids()
    apply_adapters(model, AdapterConfig(r=r, alpha=alpha, spans=spans, delta_at="output.LayerNorm"))
    randomize_B(model)
    with torch.no_grad():
        got = model.bert(input_ids=ids).last_hidden_state
        h, saved = base.bert.embeddings(input_ids=ids), {}
        by_end = {end: (start, A, B, s) for start, end, A, B, s in adapters_of(model, alpha, r)}
        starts = {start for start, *_ in by_end.values()}
        for i, block in enumerate(base.bert.encoder.layer):
            if i in starts:
                saved[i] = h
            delta = 0.0
            if i in by_end:
                start, A, B, s = by_end[i]
                delta = span_delta(saved.pop(start), A, B, s)
            h = _bert_block_with_delta_before_its_last_norm(block, h, delta)
        at_output = copy.deepcopy(base)
        apply_adapters(at_output, AdapterConfig(r=r, alpha=alpha, spans=spans))
        at_output.load_state_dict(model.state_dict())
        other = at_output.bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, h, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, other, atol=1e-3)  # the place matters


def test_delta_at_must_name_a_module_of_every_block_that_runs():
    with pytest.raises(ConfigError, match=r"adapter\.delta_at 'output\.Nope' is not a module of block 0"):
        apply_adapters(make_model("bert"), AdapterConfig(delta_at="output.Nope"))
    with pytest.raises(ConfigError, match=r"adapter\.delta_at applies to lor2c methods, not lora"):
        AdapterConfig(method="lora", delta_at="output.LayerNorm").validate()
    model = make_model("bert")
    for block in model.bert.encoder.layer:
        block.unused = nn.Identity()  # a module of the block that its forward never calls
    apply_adapters(model, AdapterConfig(delta_at="unused"))
    with pytest.raises(RuntimeError, match=r"block 0's unused never ran: the LoR2C delta was not added"):
        model(input_ids=make_input_ids())


@pytest.mark.parametrize("spans", SPANS, ids=SPAN_IDS)
def test_lor2c_llama_matches_manual_loop(spans):
    r, alpha = 4, 16.0
    model = make_model("llama")
    base = copy.deepcopy(model)
    ids = make_input_ids()
    with torch.no_grad():
        base_out = base.model(input_ids=ids).last_hidden_state
        # sanity: layers called with attention_mask=None are causal under SDPA, like the model
        torch.testing.assert_close(llama_reference(base, ids, []), base_out, rtol=1e-5, atol=1e-6)
        # ... and really causal: changing the last token leaves earlier positions unchanged
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] % 98) + 1
        torch.testing.assert_close(llama_reference(base, ids2, [])[:, :-1], base_out[:, :-1])

    apply_adapters(model, AdapterConfig(method="lor2c", r=r, alpha=alpha, spans=spans))
    randomize_B(model)
    with torch.no_grad():
        got = model.model(input_ids=ids).last_hidden_state
        want = llama_reference(base, ids, adapters_of(model, alpha, r))
    assert not torch.allclose(got, base_out, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lor2c_delta_of_one_block_feeds_the_next():
    """Adapters compose along the stack: B of block 0 changes the input of block 1."""
    model = make_model("bert")
    apply_adapters(model, AdapterConfig(method="lor2c", r=4))
    seen = {}
    model.bert.encoder.layer[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].clone()))
    ids = make_input_ids()
    with torch.no_grad():
        model(input_ids=ids)
        before = seen["in"]
        model.lor2c.adapters["0"].lora_B.weight.normal_()
        model(input_ids=ids)
    assert not torch.allclose(before, seen["in"], atol=1e-3)


# ----------------------------------------------------------------------------------------------------
# ShareLoR2C
# ----------------------------------------------------------------------------------------------------

def test_share_lor2c_stores_A_once():
    r = 4
    model = make_model("bert")
    apply_adapters(model, AdapterConfig(method="share_lor2c", r=r))
    names = [n for n, _ in model.named_parameters() if "lor2c" in n]
    a_names = [n for n in names if n.endswith("A.weight") or "shared_A" in n]
    assert a_names == ["lor2c.shared_A.0.weight"]
    # once even without de-duplication: it is registered in one place only
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert [n for n in all_names if "shared_A" in n or "lora_A" in n] == ["lor2c.shared_A.0.weight"]
    assert sorted(n for n in names if n.endswith("lora_B.weight")) == sorted(
        f"lor2c.adapters.{i}.lora_B.weight" for i in range(L))
    keys = [k for k in model.state_dict() if k.startswith("lor2c.")]
    assert [k for k in keys if "lora_A" in k or "shared_A" in k] == ["lor2c.shared_A.0.weight"]
    shared = model.lor2c.shared_A["0"]
    assert all(a.down is shared for a in model.lor2c.adapters.values())
    assert trainable_count(model) == r * D + L * r * D + HEAD_PARAMS["bert"]


def test_share_lor2c_groups_one_A_per_group():
    r = 4
    model = make_model("llama")
    apply_adapters(model, AdapterConfig(method="share_lor2c", r=r, share_groups=[[0, 1]]))
    shared = [n for n, _ in model.named_parameters() if "shared_A" in n]
    assert shared == ["lor2c.shared_A.0.weight", "lor2c.shared_A.1.weight"]  # [0, 1] and the rest, [2]
    ad = model.lor2c.adapters
    assert ad["0"].down is ad["1"].down is model.lor2c.shared_A["0"]
    assert ad["2"].down is model.lor2c.shared_A["1"]
    assert trainable_count(model) == 2 * r * D + L * r * D


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_share_lor2c_gradient_is_sum_over_blocks(family):
    r = 4
    base = make_model(family)
    shared_m = apply_adapters(copy.deepcopy(base), AdapterConfig(method="share_lor2c", r=r, dropout=0.0))
    plain_m = apply_adapters(copy.deepcopy(base), AdapterConfig(method="lor2c", r=r, dropout=0.0))
    randomize_B(shared_m)
    shared_A = shared_m.lor2c.shared_A["0"].weight
    with torch.no_grad():
        for key, a in plain_m.lor2c.adapters.items():
            a.lora_A.weight.copy_(shared_A)
            a.lora_B.weight.copy_(shared_m.lor2c.adapters[key].lora_B.weight)

    ids = make_input_ids()
    g = torch.Generator().manual_seed(3)
    out_s, out_p = shared_m(input_ids=ids).logits, plain_m(input_ids=ids).logits
    torch.testing.assert_close(out_s, out_p)  # the two models compute the same function
    w = torch.randn(out_s.shape, generator=g)
    (out_s * w).sum().backward()
    (out_p * w).sum().backward()

    per_block = [a.lora_A.weight.grad for a in plain_m.lor2c.adapters.values()]
    assert all(gr is not None and gr.abs().max() > 0 for gr in per_block)
    torch.testing.assert_close(shared_A.grad, torch.stack(per_block).sum(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(shared_A.grad, per_block[0])  # a sum over blocks, not one block's grad
    for key, a in plain_m.lor2c.adapters.items():
        torch.testing.assert_close(shared_m.lor2c.adapters[key].lora_B.weight.grad, a.lora_B.weight.grad,
                                   rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Zero init: every family x method is an exact no-op at step 0
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "lor2c", "share_lor2c"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_is_exact_noop(family, method):
    ids = make_input_ids()
    want = logits(make_model(family), ids)
    model = apply_adapters(make_model(family), AdapterConfig(method=method, r=4))
    assert trainable_count(model) > HEAD_PARAMS[family]
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("lora_B.weight"))
    assert torch.equal(logits(model, ids), want)
    randomize_B(model)  # and the adapters are on the path: non-zero B changes the logits
    assert not torch.allclose(logits(model, ids), want, atol=1e-4)


def _down_projections(model: nn.Module) -> list[torch.Tensor]:
    """Every A of the adapters (a shared A once), by name: lora_A of LoRA, LoR2C and ResLoRA, shared_A."""
    return [p for n, p in model.named_parameters() if n.endswith("lora_A.weight") or ".shared_A." in n]


@pytest.mark.parametrize("method,extra", [("lora", {}), ("lor2c", {}), ("share_lor2c", {}),
                                          ("reslora", {}), ("lor2c", {"injections": 1})])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gaussian_init_draws_every_A_with_sd_one_over_rank_and_keeps_the_no_op(family, method, extra):
    ids = make_input_ids()
    want = logits(make_model(family), ids)
    stats = {}
    for init in ("kaiming", "gaussian"):
        torch.manual_seed(0)
        model = apply_adapters(make_model(family), AdapterConfig(method=method, r=4, init=init, **extra))
        weights = _down_projections(model)
        assert weights and all(w.requires_grad or extra for w in weights)
        assert torch.equal(logits(model, ids), want)  # B = 0 either way
        entries = torch.cat([w.detach().flatten() for w in weights])
        stats[init] = (entries.std().item(), {w.shape[0] for w in weights}, weights)
    sd, ranks, weights = stats["gaussian"]
    expected = torch.cat([torch.full((w.numel(),), 1.0 / w.shape[0]) for w in weights])
    assert sd == pytest.approx(expected.pow(2).mean().sqrt().item(), rel=0.1)
    kaiming_sd, _, kaiming = stats["kaiming"]  # Kaiming-uniform: |entries| <= 1 / sqrt(d_in)
    assert all(w.abs().max() <= 1 / w.shape[1] ** 0.5 for w in kaiming)
    assert kaiming_sd < 0.6 * sd


# ----------------------------------------------------------------------------------------------------
# Parameter counts (METHOD.md): LoRA on a d_in -> d_out projection: r (d_in + d_out);
# LoR2C: 2 r d per span; ShareLoR2C: r d per group + r d per span; + the task head (BERT classifier).
# ----------------------------------------------------------------------------------------------------

HEAD_DIM = D // TINY_HEADS
D_KV = TINY_KV_HEADS * HEAD_DIM


def _expected_count(family, method, r, targets=None, spans=None):
    head = HEAD_PARAMS[family]
    if method == "lora":
        dims = {  # (d_in, d_out) of each target
            "q": (D, D), "v": (D, D_KV if family == "llama" else D), "down": (TINY_INTERMEDIATE, D),
        }
        return L * sum(r * (dims[t][0] + dims[t][1]) for t in targets) + head
    n_spans = L if spans is None else len(spans)
    if method == "lor2c":
        return 2 * r * D * n_spans + head
    return r * D + n_spans * r * D + head


COUNT_CASES = [
    ("bert", "lora", 4, ["q", "v"], None),  # L * 2 * (r d + r d)
    ("bert", "lora", 8, ["q", "v"], None),
    ("llama", "lora", 4, ["q", "v"], None),  # L * (r (d + d) + r (d + d_kv))
    ("llama", "lora", 4, ["q", "v", "down"], None),  # ... + L * r (intermediate + d)
    ("gpt2", "lora", 4, ["q", "v"], None),  # L * 2 * (r d + r d): one third of c_attn each
    ("bert", "lor2c", 8, None, None),  # 2 r d L
    ("llama", "lor2c", 4, None, None),
    ("gpt2", "lor2c", 4, None, [[0, 1], [2, 2]]),  # 2 r d per span
    ("bert", "share_lor2c", 8, None, None),  # r d + L r d
    ("llama", "share_lor2c", 4, None, None),
]


@pytest.mark.parametrize("family,method,r,targets,spans", COUNT_CASES)
def test_trainable_parameter_counts(family, method, r, targets, spans):
    base_total = sum(p.numel() for p in make_model(family).parameters())
    model = apply_adapters(make_model(family), AdapterConfig(method=method, r=r, targets=targets, spans=spans))
    want = _expected_count(family, method, r, targets, spans)
    assert trainable_count(model) == want
    added = want - HEAD_PARAMS[family]
    assert sum(p.numel() for p in model.parameters()) == base_total + added
    m = re.fullmatch(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})",
                     trainable_summary(model))
    assert m, trainable_summary(model)
    assert int(m[1].replace(",", "")) == want
    assert int(m[2].replace(",", "")) == base_total + added
    assert float(m[3]) == pytest.approx(100 * want / (base_total + added), abs=5e-5)


@pytest.mark.parametrize("method,want", [("lor2c", 147_456), ("lora", 294_912)])
def test_method_md_reference_count_roberta_base(method, want):
    """METHOD.md: RoBERTa-base (d 768, 12 blocks), r 8: LoR2C 147,456; LoRA on q, v 294,912.
    The backbone is built on the meta device (no memory, no init cost); adapters are real."""
    from transformers import RobertaConfig, RobertaForSequenceClassification
    with torch.device("meta"):
        model = RobertaForSequenceClassification(RobertaConfig(num_labels=2))
    apply_adapters(model, AdapterConfig(method=method, r=8))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifier."))
    assert head == 768 * 768 + 768 + 768 * 2 + 2
    assert trainable_count(model) - head == want


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_summary_format(family):
    model = apply_adapters(make_model(family), AdapterConfig(method="lor2c", r=2))
    line = trainable_summary(model)
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line), line
    total = sum(p.numel() for p in model.parameters())
    assert f"all params: {total:,d}" in line
    assert "," in line.split("||")[1]  # thousands separators, as PEFT prints them


# ----------------------------------------------------------------------------------------------------
# No state across forwards
# ----------------------------------------------------------------------------------------------------

def _fresh_copy(model, family, cfg):
    """A new adapted model with `model`'s weights (deep-copying an adapted model is not supported)."""
    fresh = apply_adapters(make_model(family), cfg)
    fresh.load_state_dict(model.state_dict())
    return fresh


def test_stream_is_empty_after_forward():
    model = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4, spans=[[0, 1], [2, 2]]))
    during = []
    model.bert.encoder.layer[1].register_forward_pre_hook(lambda m, a: during.append(sorted(model.lor2c._stream)))
    with torch.no_grad():
        model(input_ids=make_input_ids())
    assert during == [[0]]  # mid-forward, span [0, 1] holds the input of block 0
    assert model.lor2c._stream == {}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_batches_of_different_sizes_are_independent(family):
    cfg = AdapterConfig(method="lor2c", r=4, spans=[[0, 1], [2, 2]])
    model = apply_adapters(make_model(family), cfg)
    randomize_B(model)
    small, big = make_input_ids(2, 5, seed=1), make_input_ids(3, 9, seed=2)
    out_small, out_big = logits(model, small), logits(model, big)
    assert model.lor2c._stream == {}
    assert torch.equal(out_small, logits(_fresh_copy(model, family, cfg), small))
    assert torch.equal(out_big, logits(_fresh_copy(model, family, cfg), big))
    assert torch.equal(logits(model, small), out_small)  # and again after the bigger batch


def test_forward_that_raises_midway_does_not_poison_the_next():
    cfg = AdapterConfig(method="lor2c", r=4, spans=[[0, 1], [2, 2]])
    model = apply_adapters(make_model("bert"), cfg)
    randomize_B(model)
    ids = make_input_ids()
    want = logits(model, ids)
    state = {"armed": True}

    def explode(module, args):
        if state["armed"]:
            state["armed"] = False
            raise RuntimeError("boom")

    # block 1 is inside span [0, 1]: its input is already recorded when the error strikes
    handle = model.bert.encoder.layer[1].register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        logits(model, ids)
    assert model.lor2c._stream  # stale state was left behind by the failed forward ...
    assert torch.equal(logits(model, ids), want)  # ... and the next forward ignores it
    assert model.lor2c._stream == {}
    other = make_input_ids(4, 6, seed=9)
    assert torch.equal(logits(model, other), logits(_fresh_copy(model, "bert", cfg), other))
    handle.remove()


def test_span_that_never_ends_is_reported():
    """A forward in which a span's end block never fires (its recorded input would leak) raises."""
    model = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4, spans=[[0, 2]]))
    layers = model.bert.encoder.layer
    block2 = layers[2]
    layers[2] = _Bypass(block2)  # block 2 still runs, but without its hooks: the adder never fires
    try:
        with pytest.raises(RuntimeError, match=r"blocks \[0\] never reached their end block"):
            logits(model, make_input_ids())
        assert model.lor2c._stream == {}
    finally:
        layers[2] = block2
    logits(model, make_input_ids())  # restored: runs cleanly


class _Bypass(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = (inner,)  # not registered: the model's parameters stay the same

    def forward(self, *args, **kwargs):
        return self.inner[0].forward(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("method,spans", [("lor2c", None), ("share_lor2c", None), ("lor2c", [[0, 1], [2, 2]])])
def test_checkpointing_gives_the_same_gradients(family, method, spans):
    """Spans crossing blocks included: the hooks sit outside the checkpointed block forward."""
    cfg = AdapterConfig(method=method, r=4, dropout=0.0, spans=spans)
    ids = make_input_ids()
    grads, calls = [], []
    for ckpt in (False, True):
        model = make_model(family)
        if ckpt:
            model.gradient_checkpointing_enable()
        apply_adapters(model, cfg)
        randomize_B(model)
        model.train()
        # an inner module of block 0 runs twice under checkpointing (forward, then recompute in backward)
        n = [0]
        inner = blocks_of(model)[0].get_submodule(spec_for(model).projections["q"].path)
        inner.register_forward_hook(lambda m, a, o: n.__setitem__(0, n[0] + 1))
        out = model(input_ids=ids).logits
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * w).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        calls.append(n[0])
    assert calls == [1, 2]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert grads[0][k].abs().max() > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=k)
