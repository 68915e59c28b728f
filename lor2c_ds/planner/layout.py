"""One layout: memory per GPU, communication and compute time, with and without activation
checkpointing."""
from __future__ import annotations

from .activations import activation_bytes
from .comm import DS_NAMES, _collective
from .inputs import RUNNABLE, Cluster, Workload
from .shapes import ModelFacts


def _shard(numels, k: int) -> int:
    return sum(-(-n // k) for n in numels)


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
    # ResLoRA's statistics gather no weight: ||W + s B A|| (the is variant's weights rule) is summed from each
    # rank's partition into the statistics' one all-reduce of a few scalars per module (not modelled)
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

