"""Everything that knows DeepSpeed: config, process group, ZeRO-3 loading, the engine, checkpoints.

The design point: ZeRO-3 partitions the frozen backbone across every rank, while the trainable
tensors (adapters, shared low-rank matrices, task head) are pinned whole on every rank as ZeRO
*persistent* parameters, chosen by role, not by size. Forward and backward never gather them; their
gradients are reduce-scattered and their optimizer state is partitioned like any ZeRO parameter,
and DeepSpeed re-gathers the updated values once per optimizer step.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as dist  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

from .config import ConfigError, TrainConfig  # noqa: E402

DS_CONFIG_DIR = Path(os.environ.get("LOR2C_DS_CONFIGS", Path(__file__).resolve().parents[1] / "ds_configs"))
# Keys the training recipe owns; a DeepSpeed JSON that sets them differently is refused.
_RECIPE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16")


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by the launcher (gloo on CPU, nccl on CUDA).

    A collective that waits longer than LOR2C_DIST_TIMEOUT_S (default 600 s) fails, so a dead rank
    ends the job instead of leaving the others blocked until the scheduler's time limit."""
    import datetime

    timeout = datetime.timedelta(seconds=float(os.environ.get("LOR2C_DIST_TIMEOUT_S", 600)))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        torch.distributed.destroy_process_group()


def first_to_fail(code: int) -> tuple[bool, int]:
    """(whether this rank is the job's first to fail, the exit code the first one chose), counted in the
    process group's store within seconds; without a reachable store, a rank outside any group is first."""
    import datetime

    if not torch.distributed.is_initialized():
        return True, code
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=10))
        if store.add("lor2c_failed_ranks", 1) == 1:
            store.set("lor2c_failure_code", str(code))
            return True, code
        return False, int(store.get("lor2c_failure_code"))
    except Exception:  # the store went with a dead rank: another rank failed first
        return False, code


def resolve_ds_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix != ".json":
        path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"deepspeed config {name!r} not found (looked at {path}); named configs: {known}")
    return path


def build_ds_config(cfg: TrainConfig, world_size: int, total_steps: int) -> dict:
    """The DeepSpeed JSON named by the recipe, completed with the recipe's batch, optimizer,
    schedule and precision."""
    path = resolve_ds_config_path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed config {path} must hold a JSON object, not {type(ds).__name__}")
    stage = ds.get("zero_optimization", {}).get("stage", 0) if isinstance(ds.get("zero_optimization", {}), dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed config {path}: zero_optimization must be an object whose stage is 0, 1, 2 "
                          f"or 3, got {ds.get('zero_optimization')!r}")
    clash = [k for k in _RECIPE_KEYS if k in ds]
    if clash:
        raise ConfigError(f"deepspeed config {path} sets {clash}; these come from the training recipe "
                          "(global_batch_size, micro_batch_size, lr, precision, ...)")
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.check_world(world_size),
        "train_batch_size": cfg.global_batch_size,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr,
            "warmup_num_steps": max(1, int(cfg.warmup_ratio * total_steps)), "warmup_type": "linear"}},
    })
    ds.setdefault("steps_per_print", 10**9)  # the recipe logs; keep DeepSpeed's own step log quiet
    return resolve_auto_knobs(ds)


def gpus_per_node() -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun, and the SLURM launch sets it), else SLURM's tasks per node."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def resolve_auto_knobs(ds: dict) -> dict:
    """The ZeRO knobs that ds_configs/ set to "auto" (ds_configs/README.md): overlap_comm and the offload
    pin_memory on with CUDA (side streams, page-locked copies) and off on CPU; zero_hpz_partition_size
    the node's rank count, so the secondary partition stays inside a node. Returns `ds`, edited."""
    zero = ds.get("zero_optimization", {})
    cuda = torch.cuda.is_available()
    if zero.get("overlap_comm") == "auto":
        zero["overlap_comm"] = cuda
    for key in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(key), dict) and zero[key].get("pin_memory") == "auto":
            zero[key]["pin_memory"] = cuda
    if zero.get("zero_hpz_partition_size") == "auto":
        zero["zero_hpz_partition_size"] = gpus_per_node()
    return ds


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def zero3_loading(ds_config: dict):
    """Inside, transformers' `from_pretrained` builds the model under `deepspeed.zero.Init`: each rank
    materialises only its partition of every weight."""
    if zero_stage(ds_config) != 3:
        yield
        return
    keep_alive = HfDeepSpeedConfig(copy.deepcopy(ds_config))  # transformers holds a weak reference
    try:
        yield
    finally:
        del keep_alive


# A parameter attribute naming the optimizer group `initialize` puts it in (see `separate_optimizer_group`).
_GROUP_ATTR = "lor2c_optimizer_group"


def separate_optimizer_group(params, name: str) -> None:
    """Have `initialize` put `params` in an optimizer parameter group of their own, `name`, so that
    they get their own flat partition and Adam step count (see `reset_optimizer_state`). Call before
    `initialize`, identically on every run that must load the same checkpoints. Only the grouping
    differs: every group has the recipe's lr schedule, weight decay and betas, and clipping uses one
    global norm."""
    for p in params:
        setattr(p, _GROUP_ATTR, name)


def _param_groups(trainable: list) -> list[dict]:
    """The untagged trainable parameters first (in module order), then one group per name."""
    groups: dict[str | None, list] = {None: []}
    for p in trainable:
        groups.setdefault(getattr(p, _GROUP_ATTR, None), []).append(p)
    return [{"params": params} for params in groups.values() if params]


def initialize(model: torch.nn.Module, ds_config: dict):
    """Build the DeepSpeed engine over the trainable parameters only, then pin them whole."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: apply adapters first")
    if ds_config.get("bf16", {}).get("enabled"):
        # Under ZeRO-3 the backbone was built in bf16 by zero.Init; adapters created afterwards must
        # match it. DeepSpeed keeps their fp32 master copies in the optimizer.
        for p in trainable:
            p.data = p.data.to(torch.bfloat16)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=_param_groups(trainable), config=ds_config)
    _pin_trainable_whole(engine)
    return engine


def _pin_trainable_whole(engine) -> None:
    if engine.zero_optimization_stage() != 3:
        return  # below stage 3 no parameter is partitioned
    persistent = engine.optimizer.parameter_offload.persistent_parameters  # also the optimizer's list
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    for p in trainable:
        if not p.ds_persist:
            p.ds_persist = True
            persistent.append(p)
    if persistent:
        # After each step (and each checkpoint) ZeRO-3 re-gathers the persistent list through
        # `persistent[0].all_gather(list)`, which launches one collective per parameter: 2 per adapted
        # module, a latency each. Route it through DeepSpeed's own coalesced gather: one flat
        # collective per dtype for the whole list, as forward fetches modules.
        persistent[0].all_gather = _gather_in_one_collective(persistent[0].all_gather)
    missing = [p for p in trainable if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if missing:
        missing[0].all_gather(param_list=missing)


def _gather_in_one_collective(per_parameter_gather):
    def all_gather(param_list=None, async_op=False, hierarchy=0):
        params = [p for p in (param_list or []) if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        # hpZ: the coalesced gather reads the secondary (node-local) copy, which the step has not
        # rewritten yet; DeepSpeed's own path reads the updated primary partition
        if async_op or not params or any(getattr(p, "ds_secondary_tensor", None) is not None for p in params):
            return per_parameter_gather(param_list, async_op=async_op, hierarchy=hierarchy)
        by_dtype: dict[torch.dtype, list] = {}
        for p in params:  # a coalesced buffer holds one communication dtype
            by_dtype.setdefault(p.ds_tensor.dtype, []).append(p)
        for group in by_dtype.values():
            group[0].all_gather_coalesced(group).wait()
        return None
    return all_gather


def partition_report(engine) -> list[dict]:
    """One row per parameter: full and local sizes, whether this rank holds it whole right now."""
    rows = []
    for name, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            local = p.ds_tensor.numel()
            whole = p.ds_status == ZeroParamStatus.AVAILABLE and p.numel() == p.ds_numel
            full = p.ds_numel
        else:
            local = full = p.numel()
            whole = True
        rows.append({"name": name, "numel": full, "local_numel": local, "whole": whole,
                     "trainable": p.requires_grad})
    return rows


@contextlib.contextmanager
def gathered_trainable(engine):
    """The trainable parameters, whole, for reading (a no-op when they are pinned already)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def gathered(params):
    """`params` whole for reading on every rank (a no-op for parameters ZeRO-3 does not partition)."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if params:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def local_partition(param) -> tuple[torch.Tensor, int] | None:
    """(this rank's elements of the flattened `param`, the flat index of its first) for a ZeRO-3
    partitioned parameter, padding left out; None when `param` is not partitioned here or its partition
    is not readable in place (NVMe, quantized): the caller then reads it whole."""
    part = getattr(param, "ds_tensor", None)
    if not hasattr(param, "ds_id") or part is None or getattr(part, "final_location", None) is not None \
            or hasattr(part, "ds_quant_scale"):
        return None
    start = part.ds_numel * dist.get_rank(group=param.ds_process_group)
    count = max(0, min(part.ds_numel, param.ds_numel - start))
    return part.narrow(0, 0, count), start


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (a single-process run returns `[obj]`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def save_checkpoint(engine, directory: str | os.PathLike, tag: str, client_state: dict | None = None,
                    save_latest: bool = True) -> None:
    """DeepSpeed's own checkpoint (trainable weights, optimizer, scheduler), frozen backbone left out."""
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state or {},
                           exclude_frozen_parameters=True, save_latest=save_latest)


def load_checkpoint(engine, directory: str | os.PathLike, tag: str | None = None) -> dict:
    _, client_state = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
    return client_state or {}


def barrier() -> None:
    dist.barrier()


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master value of a trainable parameter (a collective under ZeRO-3: call on every rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    value = safe_get_full_fp32_param(param)
    return (param.data if value is None else value).detach().float().cpu().reshape(full_shape(param))


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """A parameter's whole shape, also when ZeRO-3 partitions it."""
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def overwrite_trainable(engine, updates: dict) -> None:
    """Set trainable parameters to new values in every copy DeepSpeed keeps of them, and zero their
    Adam moments (the step count stays: see `reset_optimizer_state`). Call on every rank with the same
    values.

    The copies: the module's tensor (whole on every rank) and DeepSpeed's fp32 master (its partition);
    under ZeRO-3 also each rank's partition of the module's tensor (`ds_tensor`, in the parameter's
    dtype), from which DeepSpeed re-gathers the tensor whenever it releases it (while it records its
    module trace, persistent parameters included). ZeRO-3 rewrites the partitions through
    `GatheredParameters(modifier_rank=0)` on exit, which releases the tensors; they are pinned whole
    again at once."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    values = {p: v.detach().float().to(p.device).reshape(full_shape(p)) for p, v in updates.items()}
    zero3 = [p for p in values if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):  # a no-op below ZeRO-3
        with torch.no_grad():
            for p, v in values.items():
                p.data.copy_(v.to(p.dtype).view_as(p.data))
    released = [p for p in zero3 if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if released:
        released[0].all_gather(param_list=released)
    stateless = _link_optimizer_state(engine)
    for p, v in values.items():
        safe_set_full_fp32_param(p, v)
        if id(p) not in stateless:  # a tensor without optimizer state yet has zero moments already
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, torch.zeros_like(v), key)


def _flat_groups(engine) -> list[tuple[list, torch.Tensor]]:
    """(module parameters, this rank's flat fp32 partition keying their optimizer state) per ZeRO
    optimizer group (ZeRO-3 sub-group); empty without ZeRO."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat))
    if engine.zero_optimization_stage() in (1, 2):
        return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups))
    return []


def _link_optimizer_state(engine) -> set[int]:
    """Under ZeRO-1/2, link every parameter to its slice of its group's optimizer state; returns the ids
    of those whose group has no state yet (it has not stepped).

    ZeRO-1/2 link the parameters once, right after the first group's first step, which leaves the other
    groups' parameters unlinked (`safe_*_optimizer_state` then fail): link each group that has state
    again (idempotent; DeepSpeed's own `lazy_init_hp_params_optimizer_state`). Other stages: nothing."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if engine.zero_optimization_stage() not in (1, 2):
        return set()
    state = engine.optimizer.optimizer.state
    stateless = set()
    for params, flat in _flat_groups(engine):
        if state.get(flat):
            lazy_init_hp_params_optimizer_state(params, flat, state)
        else:
            stateless.update(id(p) for p in params)
    return stateless


def reset_optimizer_state(engine, params) -> None:
    """Give `params` a fresh optimizer state: Adam moments zero and step count 0, so that their next
    update is a first step's (bias correction from 1), as from a new `torch.optim.AdamW`.

    DeepSpeed keeps one state, step count included, per flat group, so `params` must make up whole
    groups (see `separate_optimizer_group`): raises ValueError when a group holding one of them holds
    other tensors, or when one is in no group. Needs ZeRO 1-3 with the state in memory. Call on every
    rank."""
    if not engine.zero_optimization_stage() or getattr(engine.optimizer, "swap_optimizer", False):
        raise NotImplementedError("resetting optimizer state needs ZeRO stage 1-3 with the state in memory")
    wanted = {id(p) for p in params}
    groups = [(group, flat) for group, flat in _flat_groups(engine) if any(id(p) in wanted for p in group)]
    held = {id(p) for group, _ in groups for p in group}
    if held != wanted:
        raise ValueError(f"{len(held - wanted)} other tensor(s) share these parameters' optimizer group(s) and "
                         f"{len(wanted - held)} of them are in none; give them their own group with "
                         "separate_optimizer_group before initialize")
    state = engine.optimizer.optimizer.state
    for _, flat in groups:
        group_state = state.get(flat, {})  # none yet: fresh already
        for key, value in group_state.items():
            if torch.is_tensor(value):
                value.zero_()
            elif isinstance(value, (int, float)):
                group_state[key] = 0



# --- The world-size-independent trainable state (lor2c_ds/checkpoint.py writes and reads it) ----

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's tensors besides the master


def _needs_zero_state(engine) -> None:
    if not engine.zero_optimization_stage() or getattr(engine.optimizer, "swap_optimizer", False):
        raise NotImplementedError("the consolidated checkpoint needs ZeRO stage 1-3 with the optimizer state in memory")


def trainable_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, int], dict]:
    """(tensors, steps, scheduler): every trainable tensor's fp32 master and Adam moments, whole and on
    the CPU, keyed `master/<name>`, `exp_avg/<name>`, `exp_avg_sq/<name>`; its Adam step count (its
    optimizer group's, 0 before the group's first step, whose moments are zero); the LR scheduler's
    state. The same on every rank, whatever the world size and ZeRO stage. A collective."""
    from deepspeed.utils import safe_get_full_optimizer_state

    _needs_zero_state(engine)
    stateless = _link_optimizer_state(engine)
    state = engine.optimizer.optimizer.state
    step_of = {id(p): int(state[flat]["step"]) if state.get(flat) else 0 for params, flat in _flat_groups(engine)
               for p in params}
    tensors, steps = {}, {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        master = full_fp32(p)
        tensors[f"master/{name}"] = master
        for key in MOMENTS:
            value = torch.zeros_like(master) if id(p) in stateless or not step_of[id(p)] else \
                safe_get_full_optimizer_state(p, key)
            tensors[f"{key}/{name}"] = value.detach().float().cpu().reshape(master.shape).contiguous()
        steps[name] = step_of[id(p)]
    return tensors, steps, engine.lr_scheduler.state_dict()


def _ensure_optimizer_state(engine) -> None:
    """Give every optimizer group without state the one torch's AdamW creates on its first step (step 0,
    zero moments), so that `safe_set_full_optimizer_state` has somewhere to write."""
    state = engine.optimizer.optimizer.state
    for _, flat in _flat_groups(engine):
        if not state.get(flat):
            state[flat] = {"step": torch.tensor(0.0), **{k: torch.zeros_like(flat) for k in MOMENTS}}


def load_trainable_state(engine, tensors: dict[str, torch.Tensor], steps: dict[str, int], scheduler: dict,
                         global_step: int, global_batch: int) -> None:
    """Set what `trainable_state` returned into this engine, on any world size and ZeRO stage: masters
    and module tensors, Adam moments, each group's step count, the LR schedule and the engine's step
    counters. Call on every rank with the same values; raises ValueError when a group's tensors carry
    different step counts (the optimizer grouping differs from the run that saved them)."""
    from deepspeed.utils import safe_set_full_optimizer_state

    _needs_zero_state(engine)
    _ensure_optimizer_state(engine)
    named = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    overwrite_trainable(engine, {p: tensors[f"master/{name}"] for name, p in named.items()})
    for name, p in named.items():
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{key}/{name}"].to(p.device).reshape(full_shape(p)), key)
    name_of = {id(p): name for name, p in named.items()}
    state = engine.optimizer.optimizer.state
    for params, flat in _flat_groups(engine):
        counts = {steps[name_of[id(p)]] for p in params if id(p) in name_of}
        if len(counts) > 1:
            raise ValueError(f"tensors of one optimizer group carry different Adam step counts {sorted(counts)}")
        if counts:
            step = state[flat]["step"]
            state[flat]["step"] = torch.full_like(step, counts.pop()) if torch.is_tensor(step) else counts.pop()
    engine.lr_scheduler.load_state_dict(scheduler)
    engine.lr_scheduler.step(scheduler["last_batch_iteration"])  # the LR of the next step into the optimizer
    engine.global_steps, engine.global_samples = global_step, global_step * global_batch


# --- Measurements for the benchmark (launcher/bench.py, launcher/bench_peft.py) ------------------

# DeepSpeed's communication logger keys each call by the collective's function name and records one
# message size: the bytes of its input tensor (for an all-gather, this rank's shard; for a
# reduce-scatter, the whole buffer before it is scattered).
_COLLECTIVE_NAMES = {"all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
                     "all_reduce_coalesced": "all_reduce"}


def comms_logging(enabled: bool) -> None:
    """Switch DeepSpeed's communication logger on (every collective, its records cleared) or off.

    It is switched on through `deepspeed.comm.configure` for a measurement window only, never in the
    DeepSpeed config: while on, it synchronises the device after every collective, which would
    change the step times it sits beside."""
    dist.configure(enabled=enabled, prof_all=enabled, verbose=False, debug=False)
    if enabled:
        dist.comms_logger.reset_data()


def logged_comms() -> dict[str, dict[str, int]]:
    """What the logger recorded on this rank since `comms_logging(True)`, read from its records.

    `calls` and `message_bytes` per collective as DeepSpeed names and measures them; `bytes` per
    collective type (all_gather, reduce_scatter, all_reduce, broadcast, ...) as the whole buffer the
    collective produces or consumes: an all-gather's message (one shard) times the world size, any
    other collective's message as logged. Collectives that move no tensor (barrier) are left out."""
    world = dist.get_world_size()
    out: dict[str, dict[str, int]] = {"calls": {}, "message_bytes": {}, "bytes": {}}
    for name, sizes in dist.comms_logger.get_raw_data().items():
        calls = sum(record[0] for record in sizes.values())
        message = sum(int(size) * record[0] for size, record in sizes.items())
        if not message:
            continue
        kind = _COLLECTIVE_NAMES.get(name, name)
        out["calls"][name] = calls
        out["message_bytes"][name] = message
        whole = message * world if kind == "all_gather" else message
        out["bytes"][kind] = out["bytes"].get(kind, 0) + whole
    return out


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def parameter_bytes(engine) -> dict[str, int]:
    """This rank's parameter bytes: `backbone` (frozen tensors: the local ZeRO-3 partition `ds_tensor`,
    else the whole tensor) and `backbone_whole` (their full size), `trainable` (trainable tensors whole,
    as forward uses them), `trainable_partition` (their local partition; the whole tensor below
    ZeRO-3) and `trainable_numel` (full element count)."""
    out = dict.fromkeys(("backbone", "backbone_whole", "trainable", "trainable_partition", "trainable_numel"), 0)
    for p in engine.module.parameters():
        local = _bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p)
        numel = int(getattr(p, "ds_numel", p.numel()))
        if p.requires_grad:
            out["trainable"] += numel * p.element_size()
            out["trainable_partition"] += local
            out["trainable_numel"] += numel
        else:
            out["backbone"] += local
            out["backbone_whole"] += numel * p.element_size()
    return out


def optimizer_state_bytes(engine) -> int:
    """This rank's optimizer bytes: the fp32 master copies the optimizer steps (ZeRO's partition of
    them) and every tensor of its state (Adam's moments), scalars excluded. ZeRO-3 puts its masters
    in the optimizer's parameter groups only while it steps; they stay the keys of its state."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    module_params = {id(p) for p in engine.module.parameters()}
    candidates = [p for group in inner.param_groups for p in group["params"]] + list(inner.state)
    masters = {id(p): p for p in candidates if torch.is_tensor(p) and id(p) not in module_params}
    state = sum(_bytes(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return sum(_bytes(p) for p in masters.values()) + state
