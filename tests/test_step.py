"""The training step: the chunked token loss equals the whole-vocabulary loss (values and gradients)
without holding a full fp32 copy of the logits, and `train_step` syncs with the host once per step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lor2c_ds import train
from lor2c_ds.evaluation import summed_loss


def reference_loss(logits, labels):  # the loss before chunking: one fp32 copy of every logit
    return F.cross_entropy(logits[:, :-1].float().flatten(0, -2), labels.flatten(), ignore_index=-100,
                           reduction="sum")


def make(dtype, batch=3, seq=11, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, seq, vocab, generator=g)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq - 1), generator=g)
    labels[0, :4] = -100  # prompt / padding positions
    labels[2, -3:] = -100
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 97 * 3 * 2, 97 * 3 * 4 + 5, 1 << 24])  # one position, several, all
def test_chunked_loss_equals_the_whole_vocabulary_loss(dtype, chunk):
    logits, labels = make(dtype)
    want = reference_loss(logits, labels)
    (want_grad,) = torch.autograd.grad(want, logits)
    got = summed_loss(logits, labels, "causal_lm", chunk_elements=chunk)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    if dtype == torch.float32:
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-7)
    else:  # bf16 gradients: rounded once either way
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=0)
    with torch.no_grad():
        assert summed_loss(logits, labels, "causal_lm", chunk_elements=chunk).item() == pytest.approx(
            want.item(), rel=1e-6)


def test_chunked_loss_saves_no_full_fp32_copy_of_the_logits():
    """What autograd keeps for backward: the bf16 logits (views), never an fp32 tensor of their size."""
    logits, labels = make(torch.bfloat16, batch=4, seq=33, vocab=501)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference_loss(logits, labels)
    assert any(d == torch.float32 and n >= logits[:, :-1].numel() for d, n in saved)  # the hook sees it
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = summed_loss(logits, labels, "causal_lm", chunk_elements=4 * 501 * 4)
    big_fp32 = [n for d, n in saved if d == torch.float32 and n > 4 * 501 * 4]
    assert not big_fp32, big_fp32
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


NOTHING_SCORED = {  # (logits, labels) of a micro-batch without a single scored target
    "causal_lm": ((2, 1, 97), (2, 0)),  # one-token rows: no next token to predict
    "chat": ((2, 5, 97), (2, 4)),  # every position masked (prompt only, or filler rows)
    "classification": ((2, 3), (2,)),
    "regression": ((2, 1), (2,)),
}


@pytest.mark.parametrize("task", list(NOTHING_SCORED))
def test_a_micro_batch_with_nothing_to_score_still_backpropagates(task):
    """DeepSpeed's engine.backward refuses a loss without grad_fn; the rank would fail mid-run."""
    from deepspeed.runtime.utils import maybe_loss_for_backward

    logit_shape, label_shape = NOTHING_SCORED[task]
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(logit_shape).to(dtype).requires_grad_(True)
        labels = torch.full(label_shape, -100, dtype=torch.float32 if task == "regression" else torch.long)
        loss = summed_loss(logits, labels, task)
        assert maybe_loss_for_backward(loss), (task, dtype, loss)
        assert loss.item() == 0.0
        loss.backward()
        assert logits.grad is not None and not logits.grad.any()


class FakeEngine:
    """DeepSpeed's engine surface that train_step uses, on a tiny model, single process."""

    def __init__(self, vocab=50):
        torch.manual_seed(0)
        self.device = torch.device("cpu")
        self.emb = torch.nn.Embedding(vocab, 16)
        self.head = torch.nn.Linear(16, vocab)
        self.params = [*self.emb.parameters(), *self.head.parameters()]
        self.opt = torch.optim.SGD(self.params, lr=0.1)

    def __call__(self, input_ids, attention_mask=None, **_):
        return type("Out", (), {"logits": self.head(self.emb(input_ids))})()

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()

    def get_lr(self):
        return [0.1]

    def get_global_grad_norm(self):
        return torch.linalg.vector_norm(torch.stack([p.detach().norm() for p in self.params]))


def _micro(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    micro = []
    for _ in range(n):
        ids = torch.randint(0, 50, (2, 9), generator=g)
        micro.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                      "valid": torch.ones(2)})
    return micro


class _Summed(train.Callback):
    """A callback with values of its own to sum over the ranks."""

    name = "summed"

    def __init__(self):
        self.sums = None

    def step_partials(self, run):
        return torch.tensor([2.0, 3.0], dtype=torch.float64)

    def on_step_sums(self, run, sums):
        self.sums = sums


def test_a_step_and_its_callbacks_sync_with_the_host_once(monkeypatch):
    """Every tensor -> Python conversion and every collective that lor2c_ds/train.py, the preemption
    vote and ResLoRA's statistics make during one step is counted: one host sync, and the callbacks'
    values ride on the step's last all-reduce (no collective of their own)."""
    from lor2c_ds import preemption, reslora_training

    reductions = []
    monkeypatch.setattr(train.ds, "all_reduce_sum", lambda t: reductions.append(tuple(t.shape)) or t)  # one process
    engine = FakeEngine()
    syncs = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__",
                                                                "__int__", "cpu", "numpy")}
    watched = {train.__file__, preemption.__file__, reslora_training.__file__}

    def counting(name):
        def call(self, *args, **kwargs):
            import sys
            if sys._getframe(1).f_code.co_filename in watched:
                syncs.append(name)
            return originals[name](self, *args, **kwargs)
        return call

    summed = _Summed()
    run = train.RunState(cfg=type("Cfg", (), {"task": "causal_lm"})(), engine=engine, rank=0, world=1, metrics=None,
                         total_steps=10, steps_per_epoch=10, callbacks=[preemption.PreemptionCallback(), summed])
    for name in originals:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    values = train.step_with_callbacks(run, _micro(4, seed=1))
    run.step = 1
    for c in run.callbacks:
        c.on_step_end(run)
    for name, fn in originals.items():
        monkeypatch.setattr(torch.Tensor, name, fn)
    assert syncs == ["tolist"], syncs
    assert reductions == [(2,), (4,)], reductions  # the target counts before forward; loss + 3 values at the end
    assert summed.sums == [2.0, 3.0] and not run.stop and preemption.stopped_at() is None
    assert set(values) == {"loss", "lr", "grad_norm", "tokens"}
    assert all(isinstance(v, float) for v in values.values())
    assert values["tokens"] == 4 * 2 * 9 and values["loss"] > 0 and values["grad_norm"] > 0


def test_one_rank_s_stop_vote_stops_every_rank_after_that_step(monkeypatch):
    from lor2c_ds import preemption

    monkeypatch.setattr(train.ds, "all_reduce_sum", lambda t: t * 2)  # two ranks with the same values
    engine = FakeEngine()
    cfg = type("Cfg", (), {"task": "causal_lm"})()
    vote = preemption.PreemptionCallback()
    run = train.RunState(cfg=cfg, engine=engine, rank=1, world=2, metrics=None, total_steps=10, steps_per_epoch=10,
                         callbacks=[vote])
    try:
        train.step_with_callbacks(run, _micro(1, seed=2))
        run.step = 3
        vote.on_step_end(run)
        assert not run.stop and vote.votes == 0.0  # no signal yet
        preemption._on_signal(preemption.signal.SIGUSR1, None)
        train.step_with_callbacks(run, _micro(1, seed=2))
        assert vote.votes == 2.0
        vote.on_step_end(run)
        assert run.stop and preemption.stopped_at() == 3
        last = train.RunState(cfg=cfg, engine=engine, rank=1, world=2, metrics=None, total_steps=10,
                              steps_per_epoch=10, step=10)
        preemption.reset()
        vote.votes = 1.0
        vote.on_step_end(last)  # the last step: the run ends anyway
        assert not last.stop and preemption.stopped_at() is None
    finally:
        preemption.reset()


class ModelEngine(FakeEngine):
    """FakeEngine over a real (tiny, conftest) causal LM."""

    def __init__(self, model):
        self.device, self.module = torch.device("cpu"), model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=0.01)

    def __call__(self, **inputs):
        return self.module(**inputs)


def test_reslora_statistics_ride_on_the_step_s_all_reduce(monkeypatch):
    """ResLoRA's statistics (the weights rule: ||W + s B A|| too) come out of the step's closing
    all-reduce with one host sync for the whole step, equal to what its standalone `step()` records."""
    from conftest import make_model

    from lor2c_ds import AdapterConfig, apply_adapters, reslora_training

    def reslora_model():
        model = make_model("llama")
        apply_adapters(model, AdapterConfig(method="reslora", r=4, alpha=8.0, reslora_variant="is", pre_num=1,
                                            merge_rule="weights"))
        return model

    monkeypatch.setattr(train.ds, "all_reduce_sum", lambda t: t)
    micro = [{**b, "input_ids": b["input_ids"] % 32, "labels": b["labels"] % 32} for b in _micro(2, seed=4)]
    callback = reslora_training.ResLoRACallback()
    engine = ModelEngine(reslora_model())
    callback.configure_model(engine.module)
    run = train.RunState(cfg=type("Cfg", (), {"task": "causal_lm"})(), engine=engine, rank=0, world=1, metrics=None,
                         total_steps=10, steps_per_epoch=10, callbacks=[callback])
    syncs = []
    tolist = torch.Tensor.tolist
    watched = {train.__file__, reslora_training.__file__}

    def counting(self, *a, **k):
        import sys
        if sys._getframe(1).f_code.co_filename in watched:
            syncs.append("tolist")
        return tolist(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    train.step_with_callbacks(run, micro)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    assert syncs == ["tolist"], syncs
    # the same step, statistics by the standalone path (its own reduction and host sync)
    alone = ModelEngine(reslora_model())
    stats = reslora_training.ResLoRAStats()
    train.train_step(alone, micro, "causal_lm", world=1)
    stats.step(alone.module)
    got, want = callback.stats.window[-1], stats.window[-1]
    assert len(got) == 4 * len(stats.names) and all(math.isfinite(v) for v in got)
    assert got == pytest.approx(want, rel=1e-12)
