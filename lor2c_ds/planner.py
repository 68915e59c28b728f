"""How a LoR2C / LoRA / ResLoRA run on a ZeRO-3 sharded frozen backbone fits a cluster: per-GPU memory,
communication per step, and a recommended layout. Pure modelling: no DeepSpeed import, no GPU; the CLI
is `lor2c-plan` (launcher/plan.py).

Notation: W ranks in all (N nodes x G GPUs per node), a = bytes of a working-precision element (bf16 2,
fp32 4), b micro-batch, s sequence length, t = b s tokens per micro-step and rank, h hidden size,
i intermediate size, kv = key/value width (num_key_value_heads x head_dim), n_h attention heads,
V vocabulary, L blocks. Everything is per rank and per optimizer step with one micro-step.

Parameters
    Counted exactly, not from formulas: the model is built from its config on the meta device
    (`AutoModelFor...from_config` under `torch.device("meta")`), the method's adapters are attached with
    the project's own `apply_adapters`, and every parameter is listed with its size, trainable or not,
    and the module it belongs to. P = frozen backbone parameters, T = trainable parameters (adapters,
    injected LoRA allocated switched off for InjectLoR2C, and a classification head). For LLaMA-2-7B this
    gives P = 6,738,415,616 and, for LoR2C r = 8, T = 2 r h L = 2,097,152.

Memory per GPU (bytes). ZeRO-3 splits every tensor p into W pieces of ceil(|p| / W) elements (padded),
so sums below are over tensors: S_k(X) = sum_{p in X} ceil(|p| / k).
    backbone      zero3: a S_W(P); hpZ: a S_W(P) + a S_G(P) (its node-local secondary shard);
                  MiCS: a S_G(P) (sharded within a node, replicated across nodes); zero2: a P (whole).
    trainable     a T whole on every rank (pinned ZeRO persistent parameters: lor2c_ds/engine.py), plus
                  under ZeRO-3 their own partition a S_W(T).
    optimizer     12 S_k(T): fp32 master, Adam m and v, partitioned over k = W ranks (MiCS: k = G).
                  The frozen backbone has none.
    gradients     a T (whole gradients before the reduce-scatter) + 4 S_k(T) (fp32 partition).
    buffers       DeepSpeed's gradient bucket: a min(T, reduce_bucket_size).
    gathered      ZeRO-3 family only: a times the most backbone elements gathered whole at once, from
                  replaying DeepSpeed's fetch / prefetch / release rules (below).
    activations   bytes autograd saves in forward for backward, plus the transient logits (below).
    total         the sum; it must fit in the GPU's memory less a reserve (CUDA context, NCCL, allocator
                  fragmentation: 1 GiB + 5% by default).

Which blocks store activations: the backbone is frozen and its embeddings need no gradient, so a block
saves nothing unless gradient flows through it. With LoR2C the first delta is added at the output of
the first span's last block, so blocks 0..end_0 save nothing (default spans: block 0); with LoRA every
block from the first adapted one. L_g = blocks that carry gradient.

Activations saved per token in one gradient-carrying block (measured tensor by tensor with autograd's
saved-tensor hooks on torch 2.13; frozen nn.Linear saves no input, but ZeRO-3 replaces
torch.nn.functional.linear with its memory-efficient linear, which saves every linear input):
    LLaMA family (pre-LN, RMSNorm upcast to fp32, SwiGLU, SDPA flash or memory-efficient kernel):
        4 (2h + 2)              the two RMSNorm inputs in fp32 and their 1/rms
      + a (h + 2 kv) + a h + 4 n_h     q, k, v after RoPE, the attention output, its log-sum-exp
      + a 3i                    gate, up and silu(gate)
      + a (2h + i)              ZeRO-3 only: inputs of q/k/v (shared), gate/up (shared), down. o_proj's
                                 input is the attention output itself: the fused kernels return it in
                                 (b, s, heads, d_head) layout, so the reshape is a view (a kernel that
                                 returns (b, heads, s, d_head), seen on CPU for tiny head sizes, adds a h)
    BERT / RoBERTa (post-LN, GELU, dropout p in training):
        a (3h) + a n_h s (3 if attention dropout else 1)   the math SDPA path (CPU; q, k, v and the
                                 s x s probabilities, dropout mask and dropped probabilities)
        or a 4h + 4 n_h          a flash / memory-efficient kernel (GPU)
      + a 2h + 8 + a i          the two LayerNorm inputs and statistics, the GELU input
      + a 2h                    the two hidden-dropout masks, when p > 0
      + a (2h + i) (+ a h) (+ a h)   ZeRO-3 only: the linear inputs: LayerNorm output, GELU output, the
                                 attention output reshaped (a copy on the math path only) and the block
                                 input (already saved when a LoR2C adapter reads it)
    Adapters: LoR2C per adapter a r + a h for its input (not counted again where the block already
    saved that tensor: fp32 LLaMA, ZeRO-3 BERT; always counted for the span that starts at block 0),
    with dropout p > 0 the mask and dropped input (a + 1) h instead; LoRA per module a r (+ a d_in
    without ZeRO-3, + (a + 1) d_in with dropout); ResLoRA like LoRA plus a r pre_num for the shortcut
    products and, for `is`, a d_in for the summed input.
    Outside the blocks: the final norm input (4h + 4), RoPE's cos and sin (2 a s d_head, computed once
    per forward and shared by the blocks) and, for causal LM, the fp32 log-softmax of the logits,
    4 V per scored token (t - b tokens: the last position is not scored).
    Transient at the loss (counted in the total, not in the saved bytes): the logits in the working
    precision and their fp32 copy, t V (a + 4).
    With activation checkpointing (each block recomputed in backward): a block stores only its input
    a h per token (the LoR2C hooks run outside the checkpointed forward, so their tensors stay), and
    one block's full set is live again during its recompute.

These are the textbook per-layer counts (Korthikanti et al. 2022, "Reducing Activation Recomputation
in Large Transformer Models": 34 s b h + 5 n_h s^2 b bytes per layer for a GPT block in 16 bits)
specialised to what is actually saved here: no weight gradients for frozen layers, RMSNorm upcasts,
SwiGLU, GQA, fused attention kernels, DeepSpeed's linear.

ZeRO-3 parameter gathers: `simulate_gathers` replays DeepSpeed 0.19's PartitionedParameterCoordinator
(fetch, prefetch, release rules, parameter by parameter) on the step's trace: every module call of a
forward in call order (recorded by a meta-device forward with hooks; containers and adapters count,
since each call prefetches), then the modules that run in backward in reverse order of return. The
prefetcher looks ahead up to stage3_max_live_parameters gathered elements, and a parameter it has seen
again ahead is not released; a parameter used again within stage3_max_reuse_distance elements is not
released either. With the repo's settings (prefetch 5e7, live 1e9, reuse 1e9) a model under ~1e9
elements stays gathered from forward to backward and is fetched once per step; a 7B model gathers its
backbone in forward and about 80% of it again in backward. A module that carries no gradient
(embeddings, blocks before the first adapter) is not fetched in backward. The replay's peak of
elements held gathered is the `gathered` memory above. Checked against DeepSpeed's comms logger on
SmolLM2 with re-gathers forced (reuse 0, prefetch 1e6, live 3e7): all-gather bytes within 0.001%.

Communication per step and rank. For each collective, B = its whole buffer (the gathered tensor, the
reduce-scatter input; for an all-gather, the padded shard times the group size). `comm_bytes_per_step`
holds B per collective type, as launcher/bench.py reports it; `comm_message_bytes_per_step` holds the
message sizes DeepSpeed's comms logger records (an all-gather's per-rank shard, a reduce-scatter's
whole input). A group of one rank runs no all-gather.
    forward all-gather   what is fetched while forward runs: the backbone, B >= a P, plus what the
                         prefetcher already fetches for backward; group: all W ranks (hpZ: all W;
                         MiCS: the G GPUs of a node)
    backward all-gather  what backward fetches again (the replay above); group W (hpZ and MiCS:
                         inside the node, from the secondary shard)
    reduce-scatter       trainable gradients only, B = a T (the frozen backbone has no gradient);
                         MiCS adds an all-reduce of the shard across nodes; ZeRO-2 all-reduces B
    all-gather           the updated trainable parameters after the step, B = a T
Time, bandwidth-bound (no latency, no overlap): a collective over n nodes x g GPUs takes
    (g - 1)/g B / bw_intra + (n - 1)/n B / bw_node
(an all-reduce twice that): each GPU exchanges (g-1)/g of the buffer over NVLink, and each node must
receive (n-1)/n of it over its network links (bw_node = --net-gbps, all NICs of a node together).

Compute (for the layout choice only): forward 2 P_mm + 4 s h L flops per token (P_mm = parameters of
linear layers), backward the same for the linear layers on the gradient path (input gradients only:
no weight gradients for frozen layers) and twice for attention, plus one more forward of the
gradient-carrying blocks with activation checkpointing; at --gpu-tflops sustained.

Layouts: zero2 (backbone whole on every GPU, no parameter traffic), zero3 (the default recipe),
hpZ (ZeRO++ hierarchical partitioning, `ds_configs/zero3_hpz.json`), MiCS (modelled for comparison
only: DeepSpeed 0.19, which this project pins, removed it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GiB = 1 << 30
LAYOUTS = ("zero2", "zero3", "hpz", "mics")
RUNNABLE = ("zero2", "zero3", "hpz")  # MiCS is gone from DeepSpeed 0.19
DECODER_FAMILIES = ("llama", "mistral", "qwen2")
ENCODER_FAMILIES = ("bert", "roberta")
# ds_configs/zero3.json: the knobs the gather model reads
DEFAULT_ZERO = {"stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9, "reduce_bucket_size": 5e7}


def binary(x: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever keeps the number readable."""
    if not x:
        return "0"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if abs(x) >= size / 10:
            return f"{x / size:.2f} {unit}"
    return f"{x / 1024:.2f} KiB"


class PlanError(ValueError):
    """The input cannot be planned (unknown model, bad numbers, does not fit anywhere)."""


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    net_gbps: float  # inter-node, per node (all its NICs), Gbit/s
    intra_gbps: float = 2400.0  # per GPU inside a node (NVLink 3: 300 GB/s per direction), Gbit/s
    gpu_tflops: float = 200.0  # sustained dense TFLOP/s per GPU in the working precision
    reserve_gib: float | None = None  # None: 1 GiB + 5% of the GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        reserve = self.reserve_gib if self.reserve_gib is not None else 1.0 + 0.05 * self.gpu_mem_gib
        return (self.gpu_mem_gib - reserve) * GiB

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("gpu_mem_gib", "net_gbps", "intra_gbps", "gpu_tflops"):
            if not getattr(self, key) > 0:
                raise PlanError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.usable_bytes <= 0:
            raise PlanError(f"--gpu-mem {self.gpu_mem_gib} GiB leaves nothing after the "
                            f"{self.gpu_mem_gib - self.usable_bytes / GiB:.1f} GiB reserve")


@dataclass
class Workload:
    method: str = "lor2c"
    r: int = 8
    seq: int = 2048
    micro_batch: int = 1
    precision: str = "bf16"
    task: str | None = None  # None: causal_lm for decoders, classification for encoders
    activation_checkpointing: bool | None = None  # None: the planner chooses
    adapter: dict = field(default_factory=dict)  # other AdapterConfig fields (dropout, targets, ...)
    attention: str = "flash"  # "flash" (GPU fused kernels) or "math" (CPU SDPA math path for encoders)
    num_labels: int = 2

    @property
    def elt(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def validate(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        for key in ("r", "seq", "micro_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.task not in (None, "causal_lm", "classification"):
            raise PlanError(f"--task must be causal_lm or classification, got {self.task!r}")

    def adapter_config(self):
        from .adapters import AdapterConfig, ConfigError

        raw = {"method": self.method, "r": self.r, "alpha": 2.0 * self.r, **self.adapter}
        try:
            return AdapterConfig.from_dict(raw)
        except (ConfigError, TypeError) as e:
            raise PlanError(f"adapter: {e}") from None


@dataclass
class Module:
    """One call of a module in a forward, in call order (containers and adapters too: under ZeRO-3 each
    call is a step of DeepSpeed's trace, and each step prefetches)."""

    name: str
    role: str  # "pre" (embeddings), "block" or "post" (final norm, LM head, pooler)
    block: int | None  # index in the block list; None outside it
    frozen: list[tuple[int, int]]  # (parameter id, numel) of its own frozen parameters (shared ones too)
    linear: int = 0  # weight elements when it is a Linear / Conv1D (forward flops 2 per element and token)
    trainable: bool = False  # has trainable parameters of its own (an adapter, the head)
    start: int = 0  # forward event index of the call
    end: int = 0  # forward event index of its return
    grad: bool = False  # its output needs a gradient: it runs (and fetches) in backward


@dataclass
class ModelFacts:
    """What the planner needs from the built model."""

    model_type: str
    family: str  # "decoder" or "encoder"
    task: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    head_dim: int
    vocab: int
    tied: bool
    attention_dropout: float
    hidden_dropout: float
    backbone_numels: list[int]
    trainable_numels: list[int]
    modules: list[Module]
    first_grad_block: int
    adapters: list[dict]  # per active adapter module: kind, block, d_in, r, dropout (+ ResLoRA variant, pre_num)

    @property
    def backbone_params(self) -> int:
        return sum(self.backbone_numels)

    @property
    def trainable_params(self) -> int:
        return sum(self.trainable_numels)


def load_facts(config: dict, work: Workload) -> ModelFacts:
    """Build `config` on the meta device, attach the adapters of `work`, and read everything off it."""
    import torch
    from torch import nn
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    from .adapters import LoR2CAdapter, LoRA, ResLoRA, apply_adapters
    from .registry import ARCHITECTURES, find_blocks, projection_dims, spec_for

    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type not in ARCHITECTURES:
        raise PlanError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "auto_map"):
        config.pop(key, None)
    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except Exception as e:  # noqa: BLE001 - transformers raises several types for bad values
        raise PlanError(f"model config is not a valid {model_type} config: {e}") from None
    encoder = model_type in ENCODER_FAMILIES
    task = work.task or ("classification" if encoder else "causal_lm")
    if task == "classification":
        cfg.num_labels = work.num_labels
        if getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = 0
    adapter = work.adapter_config()
    try:
        with torch.device("meta"):
            model = (AutoModelForSequenceClassification if task == "classification"
                     else AutoModelForCausalLM).from_config(cfg)
    except Exception as e:  # noqa: BLE001 - whatever the model class rejects in the config
        raise PlanError(f"cannot build a {model_type} model for task {task} from this config: {e}") from None
    try:
        apply_adapters(model, adapter)
    except ValueError as e:
        raise PlanError(f"adapter: {e}") from None

    blocks = find_blocks(model, spec_for(model))
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    backbone: dict[int, int] = {}
    modules = []
    for name, start, end in _calls(model):
        module = model.get_submodule(name)
        own = [p for p in module._parameters.values() if p is not None]
        frozen = [(id(p), p.numel()) for p in own if not p.requires_grad]
        backbone.update(frozen)
        linear = 0
        if frozen and (isinstance(module, nn.Linear) or (hasattr(module, "nx") and hasattr(module, "nf"))):
            linear = math.prod(projection_dims(module))
        modules.append(Module(name, "pre", block_of.get(id(module)), frozen, linear,
                              any(p.requires_grad for p in own), start, end))
    blocks_end = max((m.end for m in modules if m.block is not None), default=-1)
    for m in modules:
        m.role = "block" if m.block is not None else ("post" if m.start > blocks_end else "pre")
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]

    adapters, first_grad = [], len(blocks)
    for name, m in model.named_modules():
        if not getattr(m, "active", True):
            continue
        if isinstance(m, LoR2CAdapter):
            adapters.append({"kind": "lor2c", "block": m.start, "d_in": int(cfg.hidden_size),
                             "r": m.lora_B.in_features, "dropout": float(adapter.dropout)})
            first_grad = min(first_grad, m.end + 1)
        elif isinstance(m, (LoRA, ResLoRA)):
            block = block_of.get(id(m))
            adapters.append({"kind": "reslora" if isinstance(m, ResLoRA) else "lora", "block": block,
                             "d_in": m.lora_A.in_features, "r": m.r, "dropout": float(adapter.dropout),
                             "variant": adapter.reslora_variant, "pre_num": adapter.pre_num})
            first_grad = min(first_grad, block if block is not None else len(blocks))
    # what runs in backward: adapters, blocks from the first gradient-carrying one, and whatever returns
    # after that block starts (enclosing containers, final norm, LM head, pooler)
    first_start = min((m.start for m in modules if m.block is not None and m.block >= first_grad),
                      default=blocks_end)
    for m in modules:
        m.grad = m.trainable or (m.block >= first_grad if m.block is not None else m.end > first_start)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    intermediate = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
    return ModelFacts(
        model_type=model_type, family="encoder" if model_type not in DECODER_FAMILIES else "decoder", task=task,
        hidden=int(cfg.hidden_size), intermediate=int(intermediate), layers=len(blocks), heads=heads,
        kv_dim=kv_heads * head_dim, head_dim=head_dim, vocab=int(cfg.vocab_size),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_dropout=float(getattr(cfg, "attention_probs_dropout_prob", None)
                                or getattr(cfg, "attention_dropout", None) or getattr(cfg, "attn_pdrop", 0.0) or 0.0),
        hidden_dropout=float(getattr(cfg, "hidden_dropout_prob", None) or getattr(cfg, "resid_pdrop", 0.0) or 0.0),
        backbone_numels=list(backbone.values()), trainable_numels=trainable, modules=modules,
        first_grad_block=first_grad, adapters=adapters)


def _calls(model) -> list[tuple[str, int, int]]:
    """(name, start, end) of every module call of one forward, in call order: a meta-device forward
    with hooks (ZeRO-3's trace follows it). Registration order when the meta forward fails."""
    import torch

    starts: list[tuple[str, int]] = []
    ends: dict[str, list[int]] = {}
    clock = iter(range(1 << 30))
    hooks = []
    for name, m in model.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: starts.append((name, next(clock)))))
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: ends.setdefault(name, []).append(
            next(clock))))
    try:
        with torch.no_grad():
            ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
        calls = [(name, start, ends[name].pop(0)) for name, start in starts]
    except Exception:  # noqa: BLE001 - any failure: fall back to the registration order
        calls = [(name, i, i) for i, (name, _) in enumerate(model.named_modules())]
    finally:
        for h in hooks:
            h.remove()
    return calls


# ------------------------------------------------------------------------------------------- activations

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


# ------------------------------------------------------------------------------------------- gathers

def _shard(numels, k: int) -> int:
    return sum(-(-n // k) for n in numels)


def simulate_gathers(f: ModelFacts, zero: dict) -> dict:
    """Replay DeepSpeed 0.19's PartitionedParameterCoordinator over one step's trace (the forward call
    order, then the gradient path in reverse): fetches, prefetches and releases, parameter by parameter.

    - A module fetches its parameters that are not gathered, then pops its own entries off the
      parameter queue (each entry: a parameter and the trace step that uses it) and prefetches: it pops
      further entries until it has collected `stage3_prefetch_bucket_size` elements that are not
      gathered (capped by `stage3_max_live_parameters` less those gathered). Every popped entry marks
      its parameter as wanted until that entry's step, gathered or not.
    - After a module runs, its parameters are released unless marked wanted for a later step, or used
      by a module within the next `stage3_max_reuse_distance` elements of the trace.
    Returns the elements gathered in forward and in backward (lists of tensor sizes, so that callers can
    apply ZeRO's per-tensor padding) and the most elements held gathered at once."""
    from collections import deque

    reuse, bucket = zero["stage3_max_reuse_distance"], zero["stage3_prefetch_bucket_size"]
    max_live = zero["stage3_max_live_parameters"]
    fwd = [m.frozen for m in f.modules]
    bwd = [m.frozen for m in sorted((m for m in f.modules if m.grad), key=lambda m: m.end, reverse=True)]
    trace = [dict(e) for e in fwd + bwd]
    n_fwd = len(fwd)
    size = {pid: n for entry in trace for pid, n in entry.items()}
    queue = deque((pid, step) for step, entry in enumerate(trace) for pid in sorted(entry))
    wanted: dict[int, int] = {}
    available: dict[int, int] = {}
    gathered: tuple[list[int], list[int]] = ([], [])
    held = peak = 0
    for step, entry in enumerate(trace):
        phase = gathered[0 if step < n_fwd else 1]
        fetch = [pid for pid in entry if pid not in available]
        own = sum(1 for pid in entry if wanted.get(pid, -1) < step)
        for _ in range(min(own, len(queue))):
            pid, used = queue.popleft()
            wanted[pid] = used
        if bucket > 0:
            limit, numel = min(max_live - held - sum(size[p] for p in fetch), bucket), 0
            while queue and numel < limit:
                pid, used = queue.popleft()
                wanted[pid] = max(wanted.get(pid, -1), used)
                if pid not in available and pid not in fetch:
                    fetch.append(pid)
                    numel += size[pid]
        for pid in fetch:
            available[pid] = size[pid]
            held += size[pid]
            phase.append(size[pid])
        peak = max(peak, held)
        release = {pid for pid in entry if wanted.get(pid, -1) <= step + 1}
        traversed = 0
        for later in trace[step + 1:]:
            if traversed >= reuse or not release:
                break
            release -= later.keys()
            traversed += sum(later.values())
        for pid in release:
            if pid in available:
                held -= available.pop(pid)
    return {"forward": gathered[0], "backward": gathered[1], "peak_held": peak}


# ------------------------------------------------------------------------------------------- comm

def collective_time(buffer: float, nodes: int, local: int, cluster: Cluster, kind: str) -> float:
    t = 0.0
    if local > 1:
        t += (local - 1) / local * buffer / (cluster.intra_gbps * 1e9 / 8)
    if nodes > 1:
        t += (nodes - 1) / nodes * buffer / (cluster.net_gbps * 1e9 / 8)
    return 2 * t if kind == "all_reduce" else t


DS_NAMES = {"all_gather": "all_gather_into_tensor", "reduce_scatter": "reduce_scatter_tensor",
            "all_reduce": "all_reduce"}


def _collective(what: str, kind: str, message: float, nodes: int, local: int, cluster: Cluster) -> dict | None:
    """One collective over `nodes` x `local` ranks. `message`: what DeepSpeed's comms logger records (an
    all-gather's per-rank shard, a reduce-scatter's or all-reduce's whole input). `bytes`: the whole
    buffer (an all-gather's message times the group size), as launcher/bench.py reports it.
    A group of one rank sends nothing: DeepSpeed skips its all-gathers (its reduce-scatter still runs
    and is logged, and costs no time)."""
    group = nodes * local
    whole = message * group if kind == "all_gather" else message
    if group == 1 and kind == "all_gather":
        return None
    factor = 2 if kind == "all_reduce" else 1
    return {"what": what, "collective": kind, "group": f"{nodes}x{local}", "bytes": whole,
            "message_bytes": message, "wire_bytes_per_rank": factor * (group - 1) / group * whole,
            "inter_node_bytes_per_node": factor * (nodes - 1) / nodes * whole,
            "time_s": collective_time(whole, nodes, local, cluster, kind)}


# ------------------------------------------------------------------------------------------- one layout

def layout_plan(f: ModelFacts, work: Workload, cluster: Cluster, layout: str, zero: dict,
                gathers: dict) -> dict:
    """Memory per GPU, communication and time of one layout, with and without checkpointing."""
    a, W, G, N = work.elt, cluster.world, cluster.gpus_per_node, cluster.nodes
    P, T = f.backbone_numels, f.trainable_numels
    shard = {"zero2": 1, "zero3": W, "hpz": W, "mics": G}[layout]
    opt_shard = G if layout == "mics" else W
    zero3 = layout != "zero2"
    mem = {
        "backbone": a * (sum(P) if layout == "zero2" else _shard(P, shard)),
        "hpz_secondary": a * _shard(P, G) if layout == "hpz" else 0,
        "trainable": a * sum(T),
        "trainable_partition": a * _shard(T, shard) if zero3 else 0,
        "optimizer_state": 12 * _shard(T, opt_shard),
        "gradients": a * sum(T) + 4 * _shard(T, opt_shard),
        "buffers": a * min(sum(T), zero["reduce_bucket_size"]),
        "gathered": 0,
    }
    if zero3:
        mem["gathered"] = a * gathers["peak_held"]
    fixed = sum(mem.values())

    comm = []
    if zero3:
        group = (1, G) if layout == "mics" else (N, G)
        comm.append(_collective("backbone all-gather, forward", "all_gather", a * _shard(gathers["forward"], shard),
                                *group, cluster))
        bgroup, bshard = ((1, G), G) if layout in ("hpz", "mics") else ((N, G), W)
        comm.append(_collective("backbone all-gather, backward", "all_gather",
                                a * _shard(gathers["backward"], bshard), *bgroup, cluster))
    tgroup = (1, G) if layout == "mics" else (N, G)
    if zero3:
        comm.append(_collective("gradient reduce-scatter", "reduce_scatter", a * sum(T), *tgroup, cluster))
    else:  # DeepSpeed 0.19's ZeRO-1/2 all-reduce the gradients (measured with launcher/bench.py)
        comm.append(_collective("gradient all-reduce", "all_reduce", a * sum(T), *tgroup, cluster))
    if layout == "mics" and N > 1:
        comm.append(_collective("MiCS gradient all-reduce", "all_reduce", a * _shard(T, G), N, 1, cluster))
    comm.append(_collective("adapter all-gather after the step", "all_gather",
                            a * (_shard(T, shard) if zero3 else -(-sum(T) // W)), *tgroup, cluster))
    comm = [c for c in comm if c is not None]
    comm_time = sum(c["time_s"] for c in comm)
    whole: dict[str, float] = {}
    message: dict[str, float] = {}
    for c in comm:
        whole[c["collective"]] = whole.get(c["collective"], 0) + c["bytes"]
        name = DS_NAMES[c["collective"]]
        message[name] = message.get(name, 0) + c["message_bytes"]

    options = {}
    usable = cluster.usable_bytes
    for ckpt in (False, True):
        act = activation_bytes(f, work, zero3, ckpt)
        act1 = activation_bytes(f, work, zero3, ckpt, micro_batch=1)["total"]
        act2 = activation_bytes(f, work, zero3, ckpt, micro_batch=2)["total"]
        per_sample, const = act2 - act1, 2 * act1 - act2
        max_mb = int((usable - fixed - const) // per_sample) if per_sample > 0 and usable > fixed + const else 0
        compute = compute_seconds(f, work, cluster, ckpt)
        total = fixed + act["total"]
        options["checkpointing" if ckpt else "no_checkpointing"] = {
            "activations_saved": act["saved"], "activations_transient": act["transient"],
            "activations": act["total"], "total": total, "fits": total <= usable, "max_micro_batch": max_mb,
            "compute_s": compute, "step_s_no_overlap": compute + comm_time,
            "step_s_full_overlap": max(compute, comm_time),
        }
    return {"layout": layout, "runnable": layout in RUNNABLE, "memory": mem, "fixed_bytes": fixed,
            "comm": comm, "comm_bytes_per_step": whole, "comm_message_bytes_per_step": message,
            "comm_time_s": comm_time,
            "inter_node_bytes_per_step": sum(c["inter_node_bytes_per_node"] for c in comm) / G,
            "options": options}


def compute_flops(f: ModelFacts, work: Workload, checkpointing: bool) -> float:
    tokens, s, h = work.micro_batch * work.seq, work.seq, f.hidden
    grad_blocks = max(f.layers - f.first_grad_block, 0)
    mm_all = sum(m.linear for m in f.modules)
    mm_grad = sum(m.linear for m in f.modules if m.grad)
    mm_grad_blocks = sum(m.linear for m in f.modules if m.grad and m.role == "block")
    fwd = 2 * mm_all + 4 * s * h * f.layers
    bwd = 2 * mm_grad + 8 * s * h * grad_blocks
    recompute = (2 * mm_grad_blocks + 4 * s * h * grad_blocks) if checkpointing else 0
    return tokens * (fwd + bwd + recompute)


def compute_seconds(f: ModelFacts, work: Workload, cluster: Cluster, checkpointing: bool) -> float:
    return compute_flops(f, work, checkpointing) / (cluster.gpu_tflops * 1e12)


# ------------------------------------------------------------------------------------------- the plan

def make_plan(config: dict, cluster: Cluster, work: Workload, zero: dict | None = None,
              layouts: tuple[str, ...] | None = None) -> dict:
    """Every number, per layout, and the recommendation. Raises PlanError when nothing fits."""
    cluster.validate()
    work.validate()
    zero = {**DEFAULT_ZERO, **(zero or {})}
    facts = load_facts(config, work)
    gathers = simulate_gathers(facts, zero)
    if layouts is None:
        layouts = LAYOUTS if cluster.nodes > 1 else ("zero2", "zero3")
    plans = {name: layout_plan(facts, work, cluster, name, zero, gathers) for name in layouts}
    plan = {
        "model": {"model_type": facts.model_type, "task": facts.task, "hidden_size": facts.hidden,
                  "intermediate_size": facts.intermediate, "num_hidden_layers": facts.layers,
                  "num_attention_heads": facts.heads, "kv_dim": facts.kv_dim, "vocab_size": facts.vocab,
                  "tie_word_embeddings": facts.tied, "backbone_params": facts.backbone_params,
                  "trainable_params": facts.trainable_params,
                  "largest_module_params": max(sum(n for _, n in m.frozen) for m in facts.modules),
                  "trace_steps": len(facts.modules),
                  "first_gradient_block": facts.first_grad_block},
        "cluster": {**dataclasses.asdict(cluster), "world": cluster.world, "usable_bytes": cluster.usable_bytes},
        "workload": dataclasses.asdict(work),
        "zero": zero,
        "gathers": {"forward_params": sum(gathers["forward"]), "backward_params": sum(gathers["backward"]),
                    "peak_held_params": gathers["peak_held"]},
        "compute_flops_per_step": {"no_checkpointing": compute_flops(facts, work, False),
                                   "checkpointing": compute_flops(facts, work, True)},
        "layouts": plans,
    }
    plan["recommendation"] = recommend(plan, facts, work, cluster)
    return plan


def _ckpt_allowed(work: Workload) -> bool:
    variant = work.adapter.get("reslora_variant", "is")
    return not (work.method == "reslora" and variant != "bs")


def recommend(plan: dict, f: ModelFacts, work: Workload, cluster: Cluster) -> dict:
    """For every runnable layout and checkpointing setting, the largest micro-batch m that divides the
    requested one (B) and fits, run as m x B/m gradient accumulation. Its step estimate: the compute
    of the B samples (with recomputation under checkpointing) plus the communication of every
    micro-step (ZeRO-3 gathers the backbone again each micro-step), no overlap. The shortest wins;
    ties go to the larger micro-batch."""
    layouts = plan["layouts"]
    if work.activation_checkpointing is None:
        ckpts = [False, True] if _ckpt_allowed(work) else [False]
    else:
        ckpts = [work.activation_checkpointing]
    if True in ckpts and not _ckpt_allowed(work):
        raise PlanError("ResLoRA is/ms cannot train with activation checkpointing (use --set reslora_variant=bs)")
    key = {False: "no_checkpointing", True: "checkpointing"}
    usable, B = cluster.usable_bytes, work.micro_batch
    options = []
    for name, lp in layouts.items():
        for c in ckpts:
            o = lp["options"][key[c]]
            largest = B if o["fits"] else min(o["max_micro_batch"], B - 1)
            m = max((k for k in range(1, largest + 1) if B % k == 0), default=0)
            if m:
                options.append((o["compute_s"] + B // m * lp["comm_time_s"], -m, name, c))
    runnable = [o for o in options if layouts[o[2]]["runnable"]]
    if not runnable:
        need = min(lp["fixed_bytes"] + activation_bytes(f, work, name != "zero2", c, 1)["total"]
                   for name, lp in layouts.items() if lp["runnable"] for c in ckpts)
        more = min_gpus_zero3(plan, f, work, cluster)
        raise PlanError(
            f"does not fit: even at micro-batch 1{' with activation checkpointing' if True in ckpts else ''} "
            f"the smallest layout needs {binary(need)} per GPU and {binary(usable)} is usable of "
            f"{cluster.gpu_mem_gib:g} GiB"
            + (f"; ZeRO-3 needs at least {more} GPUs of this size" if more else
               "; no number of GPUs of this size holds it (the replicated part alone does not fit)"))
    step, neg_m, layout, ckpt = min(runnable)
    m = -neg_m
    reasons = []
    if m < B:
        reasons.append(f"micro-batch {B} does not fit {'with' if ckpt else 'without'} activation checkpointing; "
                       f"{m} x {B // m} gradient accumulation keeps the samples per step")
    others = [o for o in runnable if o[2] == layout and o[3] != ckpt]
    if others:
        reasons.append(f"activation checkpointing {'on' if ckpt else 'off'} is faster here than "
                       f"{'off' if ckpt else 'on'} at micro-batch {-others[0][1]} ({step:.2f} s vs "
                       f"{others[0][0]:.2f} s per step)")
    reasons += _layout_reasons(plan, f, work, cluster, layout, ckpt, options)
    if layout == "hpz":
        reasons.append(f"ds_configs/zero3_hpz.json: set zero_hpz_partition_size to {cluster.gpus_per_node} "
                       "(the GPUs per node)")
    total = layouts[layout]["fixed_bytes"] + activation_bytes(f, work, layout != "zero2", ckpt, m)["total"]
    return {"layout": layout, "activation_checkpointing": ckpt, "micro_batch": m, "gradient_accumulation": B // m,
            "total_bytes": total, "usable_bytes": usable, "step_s_no_overlap": step, "reasons": reasons,
            "deepspeed": {"zero2": "zero2", "zero3": "zero3", "hpz": "zero3_hpz"}[layout]}


def _layout_reasons(plan, f: ModelFacts, work: Workload, cluster: Cluster, layout: str, ckpt: bool,
                    options: list) -> list[str]:
    """One line per layout (its own best option), then the checkpointing trade-off of the chosen one."""
    layouts = plan["layouts"]
    what = {"zero2": "whole backbone on every GPU, no parameter all-gather",
            "zero3": f"backbone / {cluster.world} ranks" + (", both all-gathers cross nodes" if cluster.nodes > 1 else ""),
            "hpz": f"+{binary(layouts.get('hpz', {}).get('memory', {}).get('hpz_secondary', 0))} node-local "
                   "secondary shard, backward all-gather inside the node",
            "mics": "shard within a node, replicate across nodes; removed in DeepSpeed 0.19, not runnable here"}
    out = []
    for name, lp in layouts.items():
        mine = [o for o in options if o[2] == name]
        if not mine:
            out.append(f"{name} ({what[name]}): does not fit at any micro-batch")
            continue
        step, neg_m, _, c = min(mine)
        m = -neg_m
        total = lp["fixed_bytes"] + activation_bytes(f, work, name != "zero2", c, m)["total"]
        acc = work.micro_batch // m
        out.append(f"{name} ({what[name]}): {binary(total)} per GPU at micro-batch {m}"
                   + (f" x {acc}" if acc > 1 else "") + (", checkpointing" if c else "")
                   + f"; communication {acc * lp['comm_time_s']:.2f} s + compute "
                   f"{lp['options']['checkpointing' if c else 'no_checkpointing']['compute_s']:.2f} s = {step:.2f} s per step")
    chosen = layouts[layout]["options"]
    if ckpt:
        out.append(f"activation checkpointing on: activations {binary(chosen['checkpointing']['activations'])} instead "
                   f"of {binary(chosen['no_checkpointing']['activations'])} at micro-batch {work.micro_batch}, for one "
                   f"more forward of the blocks "
                   f"({chosen['checkpointing']['compute_s'] - chosen['no_checkpointing']['compute_s']:.2f} s)")
    elif _ckpt_allowed(work):
        out.append("activation checkpointing off: nothing is recomputed")
    if "mics" in layouts and layout != "mics":
        mics = [o for o in options if o[2] == "mics"]
        if mics and min(mics)[0] < min(o for o in options if o[2] == layout)[0]:
            out.append(f"MiCS would be faster ({min(mics)[0]:.2f} s per step) but DeepSpeed 0.19 removed it")
    return out


def min_gpus_zero3(plan, f: ModelFacts, work: Workload, cluster: Cluster) -> int | None:
    """The fewest GPUs (whole nodes) of this size on which ZeRO-3 fits at micro-batch 1."""
    zero = plan["zero"]
    gathers = simulate_gathers(f, zero)
    ckpt = _ckpt_allowed(work) if work.activation_checkpointing is None else work.activation_checkpointing
    for nodes in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        bigger = dataclasses.replace(cluster, nodes=nodes)
        one = dataclasses.replace(work, micro_batch=1)
        lp = layout_plan(f, one, bigger, "zero3", zero, gathers)
        if lp["options"]["checkpointing" if ckpt else "no_checkpointing"]["fits"]:
            return nodes * cluster.gpus_per_node
    return None


# ------------------------------------------------------------------------------------------- validation

def collective_kind(name: str) -> str:
    n = name.lower().replace("-", "_")
    if "reduce_scatter" in n or "reducescatter" in n:
        return "reduce_scatter"
    if "gather" in n:
        return "all_gather"
    if "all_reduce" in n or "allreduce" in n:
        return "all_reduce"
    return n


def worst_rank(value):
    """A per-rank field: one number, or one per rank (launcher/bench.py), of which the largest counts."""
    if isinstance(value, (list, tuple)):
        value = [v for v in value if v is not None]
        return max(value) if value else None
    return value


def compare(plan: dict, record: dict) -> list[dict]:
    """Relative errors (predicted - measured) / measured of a plan against one measured record."""
    layout = plan["layouts"]["zero3" if int(record.get("zero_stage", 3)) == 3 else "zero2"]
    ckpt = "checkpointing" if record.get("activation_checkpointing") else "no_checkpointing"
    mem = layout["memory"]
    rows = []

    def row(name, predicted, measured, checked=True):
        measured = worst_rank(measured)
        if measured is None:
            return
        err = (predicted - measured) / measured if measured else (0.0 if predicted == 0 else math.inf)
        rows.append({"field": name, "predicted": predicted, "measured": measured, "rel_error": err,
                     "checked": checked})

    row("backbone_bytes_per_rank", mem["backbone"], record.get("backbone_bytes_per_rank"))
    row("trainable_bytes_per_rank", mem["trainable"], record.get("trainable_bytes_per_rank"))
    row("optimizer_state_bytes_per_rank", mem["optimizer_state"], record.get("optimizer_state_bytes_per_rank"))
    measured_comm: dict[str, float] = {}
    for name, value in (record.get("comm_bytes_per_step") or {}).items():
        kind = collective_kind(name)
        measured_comm[kind] = measured_comm.get(kind, 0) + value
    predicted_comm = layout["comm_bytes_per_step"]
    for kind in ("all_gather", "reduce_scatter", "all_reduce"):
        # DeepSpeed's scalar all-reduces (gradient norm, overflow check) are not modelled
        if kind in predicted_comm or (kind != "all_reduce" and kind in measured_comm):
            row(f"comm_bytes_per_step {kind}", predicted_comm.get(kind, 0), measured_comm.get(kind, 0))
    row("activation_bytes", layout["options"][ckpt]["activations_saved"], record.get("activation_bytes"))
    # the predicted total against what a process holds: host RSS includes the Python / torch runtime
    # (hundreds of MB), the CUDA allocator's peak is the comparable number on a GPU
    row("cuda_max_allocated_bytes vs total", layout["options"][ckpt]["total"],
        record.get("cuda_max_allocated_bytes"), checked=False)
    row("peak_rss_bytes vs total", layout["options"][ckpt]["total"], record.get("peak_rss_bytes"), checked=False)
    return rows
