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

from .activations import (
    activation_bytes,
    adapter_activation_bytes,
    block_activation_bytes,
)
from .choice import binary, make_plan, min_gpus_zero3, recommend
from .comm import DS_NAMES, collective_time, simulate_gathers
from .inputs import (
    DECODER_FAMILIES,
    DEFAULT_ZERO,
    ENCODER_FAMILIES,
    LAYOUTS,
    RUNNABLE,
    Cluster,
    GiB,
    PlanError,
    Workload,
)
from .layout import compute_flops, compute_seconds, layout_plan
from .shapes import ModelFacts, Module, load_facts
from .validate import collective_kind, compare, worst_rank

__all__ = [
    "DECODER_FAMILIES", "DEFAULT_ZERO", "DS_NAMES", "ENCODER_FAMILIES", "LAYOUTS", "RUNNABLE", "Cluster",
    "GiB", "ModelFacts", "Module", "PlanError", "Workload", "activation_bytes", "adapter_activation_bytes",
    "binary", "block_activation_bytes", "collective_kind", "collective_time", "compare", "compute_flops",
    "compute_seconds", "layout_plan", "load_facts", "make_plan", "min_gpus_zero3", "recommend",
    "simulate_gathers", "worst_rank",
]
