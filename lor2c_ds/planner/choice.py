"""The plan: every layout's numbers for one run, and the recommended layout, checkpointing setting
and micro-batch, with the reasons."""
from __future__ import annotations

import dataclasses

from .activations import activation_bytes
from .comm import simulate_gathers
from .inputs import DEFAULT_ZERO, LAYOUTS, Cluster, PlanError, Workload
from .layout import compute_flops, layout_plan
from .shapes import ModelFacts, load_facts


def binary(x: float) -> str:
    """Bytes in GiB, MiB or KiB, whichever keeps the number readable."""
    if not x:
        return "0"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if abs(x) >= size / 10:
            return f"{x / size:.2f} {unit}"
    return f"{x / 1024:.2f} KiB"


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
        reasons.append(f"ds_configs/zero3_hpz.json: zero_hpz_partition_size \"auto\" resolves to the ranks per node "
                       f"({cluster.gpus_per_node} here) when the engine starts")
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

