"""MergeLoR2C / InjectLoR2C / IMLoR2C: scores, choices, schedule and layouts (single process)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_input_ids, make_model

from lor2c_ds import AdapterConfig, apply_adapters, load_adapters, save_adapters, trainable_summary
from lor2c_ds.adapters import get_layout, set_layout
from lor2c_ds.adapters.config import ConfigError
from lor2c_ds.topology import EventSchedule, choose_injection, choose_merge, spectral_score, spectral_values


def low_rank_with_spectrum(d: int, sigma: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x d), B (d x r) whose product B A has exactly the singular values `sigma` (and zeros)."""
    g = torch.Generator().manual_seed(seed)
    r = len(sigma)
    u, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    mix = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]  # B, A not orthogonal themselves
    B = (u * torch.tensor(sigma, dtype=torch.float64)) @ mix
    A = mix.T @ v.T
    return A.float(), B.float()


def test_spectral_values_match_known_spectrum():
    A, B = low_rank_with_spectrum(64, [3.0, 2.0, 0.5, 0.0])
    got = sorted(spectral_values(A, B).tolist(), reverse=True)
    assert got == pytest.approx([3.0, 2.0, 0.5, 0.0], abs=1e-5)
    full = torch.linalg.svdvals((B @ A).double())[:4]  # the d x d product, for comparison
    assert got == pytest.approx(full.tolist(), abs=1e-5)


def test_scores_by_hand():
    A, B = low_rank_with_spectrum(64, [3.0, 2.0, 0.5, 0.5])
    assert spectral_score(A, B) == pytest.approx(6.0 / 64, rel=1e-5)  # mean over the d singular values
    assert spectral_score(A, B, k=1) == pytest.approx(3.0 / 6.0, rel=1e-5)
    assert spectral_score(A, B, k=2) == pytest.approx(5.0 / 6.0, rel=1e-5)
    assert spectral_score(torch.zeros(4, 64), torch.zeros(64, 4), k=2) == 0.0


def test_merge_choice_smallest_sum_lowest_blocks_win_ties_and_length_limit():
    spans = {"0": [0, 0, True], "1": [1, 1, True], "2": [2, 2, True], "3": [3, 3, True], "4": [4, 5, True]}
    scores = {"0": 0.3, "1": 0.1, "2": 0.2, "3": 0.1, "4": 0.0}
    # sums: (0,1)=.4 (1,2)=.3 (2,3)=.3 (3,4)=.1 but (3,4) spans 3 blocks
    assert choose_merge(spans, scores, max_length=3) == ("3", "4")
    assert choose_merge(spans, scores, max_length=2) == ("1", "2")  # tie with (2,3): lowest blocks win
    spans["2"][2] = False  # retired: 1 and 3 are no longer adjacent
    assert choose_merge(spans, scores, max_length=2) == ("0", "1")
    assert choose_merge({"0": [0, 1, True], "2": [2, 3, True]}, {"0": 0, "2": 0}, max_length=3) is None


def test_injection_choice_largest_single_block():
    spans = {"0": [0, 1, True], "2": [2, 2, True], "3": [3, 3, True], "4": [4, 4, False]}
    scores = {"0": 9.0, "2": 0.5, "3": 0.5, "4": 7.0}
    assert choose_injection(spans, scores) == "2"  # 0 spans two blocks, 4 is retired; tie -> lowest
    assert choose_injection({"0": [0, 1, True]}, {"0": 1.0}) is None


def test_reference_epoch_schedule():
    cfg = AdapterConfig(merges=2, injections=1, event_schedule="epochs")
    sched = EventSchedule(cfg, epochs=20, steps_per_epoch=10, total_steps=200)
    # merge_interval = floor(20/4/2)+1 = 3, inject_interval = floor(20/4/1)+1 = 6
    assert sched.merge_every == 3 and sched.inject_every == 6
    due = {step: sched.due(step) for step in range(1, 201) if sched.due(step)}
    assert due[30] == ["merge"] and due[60] == ["merge", "inject"] and 35 not in due
    sched.check()
    with pytest.raises(ConfigError, match="would fire at step 60, but training ends at step 50"):
        EventSchedule(cfg, epochs=20, steps_per_epoch=10, total_steps=50).check()


@pytest.mark.parametrize("epochs,steps_per_epoch,merges,injections", [
    (1, 12, 1, 1), (3, 113, 2, 2), (2, 10, 3, 1), (40, 50, 2, 3), (1, 8, 2, 2)])
def test_quarter_schedule_keeps_every_event_in_the_first_quarter(epochs, steps_per_epoch, merges, injections):
    """The default: each budget spread evenly over the first floor(T / 4) steps, at any budget; the
    reference formula puts the topic task's events (E = 3, M = D = 2) after epochs 1 and 2."""
    cfg = AdapterConfig(merges=merges, injections=injections, max_merge_length=8)
    total = epochs * steps_per_epoch
    sched = EventSchedule(cfg, epochs=epochs, steps_per_epoch=steps_per_epoch, total_steps=total)
    sched.check()
    fired = [(step, kind) for step in range(1, total + 1) for kind in sched.due(step)]
    assert [k for _, k in fired].count("merge") == merges
    assert [k for _, k in fired].count("inject") == injections
    assert all(1 <= step <= total // 4 for step, _ in fired), fired
    assert max(step for step, _ in fired) == total // 4  # the last of the larger budget ends the quarter
    for kind, budget in (("merge", merges), ("inject", injections)):
        steps = [s for s, k in fired if k == kind]
        assert steps == [math.ceil(i * (total // 4) / budget) for i in range(1, budget + 1)]
    if epochs == 3 and merges == 2:
        ref = EventSchedule(AdapterConfig(merges=2, injections=2, event_schedule="epochs"), epochs=3,
                            steps_per_epoch=113, total_steps=339)
        assert [s for s in range(1, 340) if ref.due(s)][:2] == [113, 226]  # budgets end after two


def test_quarter_schedule_too_short_is_refused():
    cfg = AdapterConfig(merges=2, injections=3, max_merge_length=8)
    EventSchedule(cfg, epochs=1, steps_per_epoch=12, total_steps=12).check()
    with pytest.raises(ConfigError, match="needs at least 12 optimizer steps, but training has 11"):
        EventSchedule(cfg, epochs=1, steps_per_epoch=11, total_steps=11).check()
    with pytest.raises(ConfigError, match="adapter.event_schedule must be one of"):
        AdapterConfig(event_schedule="halfway").validate()


def test_step_schedule():
    cfg = AdapterConfig(merges=1, injections=2, event_every_steps=5)
    sched = EventSchedule(cfg, epochs=1, steps_per_epoch=100, total_steps=12)
    assert sched.due(5) == ["merge", "inject"] and sched.due(6) == []
    with pytest.raises(ConfigError, match="would fire at step 10, but training ends at step 10"):
        EventSchedule(cfg, epochs=1, steps_per_epoch=100, total_steps=10).check()


@pytest.mark.parametrize("kwargs,message", [
    ({"merges": 3, "max_merge_length": 2}, "adapter.merges=3 is more than possible"),
    ({"injections": 4}, "adapter.injections=4 exceeds the 3 single-block spans"),
    ({"merges": 1, "sfs_k": 5, "r": 4}, "adapter.sfs_k must be an integer in 1..r=4"),
    ({"merges": 1, "method": "lora"}, "need a lor2c method"),
    ({"injections": 1, "r": 1}, "r must be >= 2"),
    ({"merges": 2, "injections": 2}, "would remove more than the 3 spans"),
])
def test_event_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        apply_adapters(make_model("bert"), AdapterConfig(**kwargs))


def test_merged_forward_and_retired_adapter_leave_the_graph():
    """After a merge, the model computes the merged span's shortcut and ignores the retired adapter."""
    torch.manual_seed(0)
    model = apply_adapters(make_model("bert"), AdapterConfig(method="lor2c", r=4, merges=1, injections=1))
    stack = model.lor2c
    with torch.no_grad():
        for a in stack.adapters.values():
            a.lora_B.weight.normal_(std=0.3)
    set_layout(model, {"spans": {"0": [0, 1, True], "1": [1, 1, False], "2": [2, 2, True]}, "injected": []})
    ids = make_input_ids()
    out = model.bert(input_ids=ids).last_hidden_state
    with torch.no_grad():
        stack.adapters["1"].lora_B.weight.normal_()  # retired: must not matter
    torch.testing.assert_close(model.bert(input_ids=ids).last_hidden_state, out, rtol=0, atol=0)
    # an independent loop over the plain blocks with the merged span 0..1
    base = make_model("bert")
    with torch.no_grad():
        h = base.bert.embeddings(input_ids=ids)
        layers = base.bert.encoder.layer
        h0 = h
        h = layers[1](layers[0](h)) + stack.adapters["0"].scaling * h0 @ stack.adapters["0"].lora_A.weight.T @ \
            stack.adapters["0"].lora_B.weight.T
        a2 = stack.adapters["2"]
        h = layers[2](h) + a2.scaling * h @ a2.lora_A.weight.T @ a2.lora_B.weight.T
    torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-5)


def test_injection_keeps_the_parameter_count_and_layout_round_trips(tmp_path):
    cfg = AdapterConfig(method="share_lor2c", r=4, merges=1, injections=1)
    model = apply_adapters(make_model("bert"), cfg)
    count = lambda m: int(trainable_summary(m).split("trainable params: ")[1].split(" ")[0].replace(",", ""))  # noqa: E731
    before = count(model)
    layer = "bert.encoder.layer.2.attention.self"
    layout = {"spans": {"0": [0, 0, True], "1": [1, 1, True], "2": [2, 2, False]},
              "injected": [f"{layer}.query.lora_q", f"{layer}.value.lora_v"]}
    set_layout(model, layout)
    d, r = 32, 4
    # share_lor2c: the retired adapter gives back its own B (r d); q/v LoRA of rank r/2 adds 2 (r/2) (d + d)
    assert count(model) == before - r * d + 2 * (r // 2) * (d + d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = make_input_ids()
    want = model(input_ids=ids).logits
    save_adapters(model, tmp_path)
    fresh = load_adapters(make_model("bert"), tmp_path)
    assert get_layout(fresh) == get_layout(model)
    torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)
    assert fresh.lor2c.shared_A["0"] is fresh.lor2c.adapters["0"].down  # sharing survives
    assert not math.isnan(want.sum().item())
