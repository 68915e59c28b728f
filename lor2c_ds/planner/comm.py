"""Communication: the replay of ZeRO-3's parameter fetches and releases (`simulate_gathers`), and the
collectives of a step with their bytes and bandwidth-bound time."""
from __future__ import annotations

from .inputs import Cluster
from .shapes import ModelFacts


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


def _collective(what: str, kind: str, message: float, nodes: int, local: int, cluster: Cluster,
                logged_alone: bool = False) -> dict | None:
    """One collective over `nodes` x `local` ranks. `message`: what DeepSpeed's comms logger records (an
    all-gather's per-rank shard, a reduce-scatter's or all-reduce's whole input). `bytes`: the whole
    buffer (an all-gather's message times the group size), as launcher/bench.py reports it.
    A group of one rank sends nothing: DeepSpeed skips its all-gathers (its reduce-scatter still runs
    and is logged, and costs no time); `logged_alone`: an explicit `GatheredParameters` all-gather, which
    DeepSpeed runs and logs even in a group of one."""
    group = nodes * local
    whole = message * group if kind == "all_gather" else message
    if group == 1 and kind == "all_gather" and not logged_alone:
        return None
    factor = 2 if kind == "all_reduce" else 1
    return {"what": what, "collective": kind, "group": f"{nodes}x{local}", "bytes": whole,
            "message_bytes": message, "wire_bytes_per_rank": factor * (group - 1) / group * whole,
            "inter_node_bytes_per_node": factor * (nodes - 1) / nodes * whole,
            "time_s": collective_time(whole, nodes, local, cluster, kind)}

