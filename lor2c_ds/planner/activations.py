"""Activation memory: the bytes autograd saves per gradient-carrying block, per adapter and outside
the blocks, and the transient peak at the loss and during a recompute."""
from __future__ import annotations

from .inputs import Workload
from .shapes import ModelFacts


def block_activation_bytes(f: ModelFacts, work: Workload, zero3: bool, tokens: int) -> float:
    """Bytes one gradient-carrying block saves for backward (adapters excluded)."""
    a, h, i, s = work.elt, f.hidden, f.intermediate, work.seq
    if f.family == "decoder":
        per_token = 4 * (2 * h + 2) + a * (2 * h + 2 * f.kv_dim) + 4 * f.heads + a * 3 * i
        return (per_token + (a * (2 * h + i) if zero3 else 0)) * tokens
    if work.attention == "math":
        attn = a * 3 * h + a * f.heads * s * (3 if f.attention_dropout > 0 else 1)
    else:
        attn = a * 4 * h + 4 * f.heads
    per_token = attn + a * 2 * h + 8 + a * i + (a * 2 * h if f.hidden_dropout > 0 else 0)
    if zero3:
        per_token += a * (2 * h + i) + (a * h if work.attention == "math" else 0)
        per_token += 0 if any(ad["kind"] == "lor2c" for ad in f.adapters) else a * h
    return per_token * tokens


def adapter_activation_bytes(f: ModelFacts, work: Workload, zero3: bool, tokens: int) -> tuple[float, dict]:
    """Bytes the adapters save: (LoR2C in all, {block: LoRA / ResLoRA bytes of that block})."""
    a, lor2c, per_block = work.elt, 0.0, {}
    first_span = min((ad["block"] for ad in f.adapters if ad["kind"] == "lor2c"), default=None)
    for ad in f.adapters:
        r, d, p = ad["r"], ad["d_in"], ad["dropout"]
        if ad["kind"] == "lor2c":
            # its input is the block input, already saved by the block unless nothing upstream needs grad
            shared = ad["block"] != first_span and ((f.family == "decoder" and a == 4) or
                                                    (f.family == "encoder" and zero3))
            lor2c += tokens * (a * r + ((a + 1) * d if p > 0 else (0 if shared else a * d)))
            continue
        block = ad["block"]
        if block is None or block < f.first_grad_block:
            continue
        per_token = a * r + ((a + 1) * d if p > 0 else (0 if zero3 else a * d))
        if ad["kind"] == "reslora":
            per_token += a * r * ad["pre_num"] + (a * d if ad["variant"] == "is" else 0)
        per_block[block] = per_block.get(block, 0.0) + tokens * per_token
    return lor2c, per_block


def activation_bytes(f: ModelFacts, work: Workload, zero3: bool, checkpointing: bool,
                     micro_batch: int | None = None) -> dict:
    """Saved-for-backward bytes and the transient peak (loss, recomputed block), for one micro-batch."""
    b = micro_batch or work.micro_batch
    tokens = b * work.seq
    a, grad_blocks = work.elt, max(f.layers - f.first_grad_block, 0)
    one_block = block_activation_bytes(f, work, zero3, tokens)
    lor2c, lora = adapter_activation_bytes(f, work, zero3, tokens)
    # the final RMSNorm input, and RoPE's cos and sin (computed once per forward, shared by the blocks)
    tail = tokens * (4 * f.hidden + 4) + 2 * a * work.seq * f.head_dim if f.family == "decoder" else 0.0
    logits_saved = 4 * f.vocab * (tokens - b) if f.task == "causal_lm" else 0.0
    transient = tokens * f.vocab * (a + 4) if f.task == "causal_lm" else 0.0
    if checkpointing:  # blocks keep their input; LoR2C hooks run outside the checkpointed forward
        saved = grad_blocks * tokens * a * f.hidden + lor2c + tail + logits_saved
        transient += one_block + max(lora.values(), default=0.0) if grad_blocks else 0.0
    else:
        saved = grad_blocks * one_block + lor2c + sum(lora.values()) + tail + logits_saved
    return {"saved": saved, "transient": transient, "total": saved + transient}

