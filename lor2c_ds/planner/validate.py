"""--validate: a plan against one measured lor2c-bench record."""
from __future__ import annotations

import math


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
