"""lor2c-bench: step time, memory, communication and checkpoint size of adapter methods under DeepSpeed.

    lor2c-bench --model DIR --task classification --methods floor,lora,lor2c,peft_lora \
        --ranks 1,2 --zero 3 --seq 128 --micro-batch 8 --steps 20 --warmup 5 --rounds 2 --out runs/bench

Every configuration (method x ranks x ZeRO stage) runs in its own process group, started through
torch.distributed.run on a free local port. Within a round the methods run one after the other (the
order reversed every other round), so that machine drift falls alike on the methods compared; a
method's ratio to the floor and to `peft_lora` is the median over rounds of the ratio of its median
step time to theirs in the same round.

Methods: `floor` is the frozen model with backward through every activation (one trainable d-vector
added to the embedding output, nothing else trained); `lora` (q, v), `lor2c`, `share_lor2c`,
`reslora-is|bs|ms` (with ResLoRA's per-step statistics, as in training; `reslora-is-weights` with the
`weights` merge rule, whose statistic adds ||W + s B A||), `merge_lor2c`,
`inject_lor2c`, `im_lor2c`: LoR2C in the layout after one merge and/or one injection, set before the
engine is built as a resumed run does (the events themselves are not timed); `peft_lora`: PEFT LoRA
on the same projections and rank under the HF Trainer with the same DeepSpeed ZeRO settings
(launcher/bench_peft.py).

A timed step is forward + backward + optimizer step (+ the method's per-step callbacks) on a fixed
synthetic batch, closed by a barrier, after `--warmup` steps. Then, outside the timed steps, DeepSpeed's
communication logger is switched on for `--comm-steps` steps (it synchronises after each collective),
and the trainable tensors, optimizer state and a DeepSpeed checkpoint (frozen backbone excluded; first
round only) are measured. Writes bench.json, bench.md and TensorBoard scalars under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# method name -> AdapterConfig fields (None: the floor; "layout": LoR2C events applied before the engine)
METHODS: dict[str, dict | None] = {
    "floor": None,
    "lora": {"method": "lora", "targets": ["q", "v"]},
    "lor2c": {"method": "lor2c"},
    "share_lor2c": {"method": "share_lor2c"},
    "reslora-is": {"method": "reslora", "reslora_variant": "is"},
    "reslora-is-weights": {"method": "reslora", "reslora_variant": "is", "merge_rule": "weights"},
    "reslora-bs": {"method": "reslora", "reslora_variant": "bs", "pre_num": 1},
    "reslora-ms": {"method": "reslora", "reslora_variant": "ms", "pre_num": 2},
    "merge_lor2c": {"method": "lor2c", "merges": 1},
    "inject_lor2c": {"method": "lor2c", "injections": 1},
    "im_lor2c": {"method": "lor2c", "merges": 1, "injections": 1},
}
PEFT = "peft_lora"
ZERO_CONFIGS = {1: "zero2", 2: "zero2", 3: "zero3"}  # ds_configs/ name, stage set from --zero
TARGETS = {"lor2c": 1.03, "lora": 1.08, "reslora": 1.15, "vs_peft_lora": 0.9, "backbone_2_ranks": 0.55,
           "comm_vs_backbone": 2.1, "checkpoint_ratio": 1.1, "reslora_gather_vs_lora": 1.01}


class BenchError(ValueError):
    pass


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lor2c-bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model directory")
    p.add_argument("--task", default="classification", choices=["classification", "causal_lm"])
    p.add_argument("--methods", default="floor,lora,lor2c,peft_lora",
                   help=f"comma-separated: {', '.join([*METHODS, PEFT])}")
    p.add_argument("--ranks", type=_int_list, default=[2], help="comma-separated rank counts, e.g. 1,2")
    p.add_argument("--zero", type=_int_list, default=[3], help="comma-separated ZeRO stages (1, 2, 3)")
    p.add_argument("--r", type=int, default=8, help="adapter rank (alpha = 2 r)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration and round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="repeat every configuration, methods interleaved")
    p.add_argument("--comm-steps", type=int, default=2, help="steps measured by the communication logger")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ds-config", default=None,
                   help="a ds_configs/ name or JSON file for ZeRO-3 (e.g. zero3_offload); default zero3")
    p.add_argument("--out", required=True, help="output directory (bench.json, bench.md, tensorboard/)")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_args(args) -> list[str]:
    """The methods to run; raises BenchError on bad input, before any process starts."""
    from importlib.util import find_spec

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m != PEFT]
    if unknown or not methods:
        raise BenchError(f"unknown method(s) {unknown}; choose from {[*METHODS, PEFT]}")
    if len(set(methods)) != len(methods):
        raise BenchError(f"--methods lists a method twice: {methods}")
    if PEFT in methods and not (find_spec("peft") and find_spec("accelerate")):
        raise BenchError(f"{PEFT} needs peft and accelerate: pip install -e '.[bench]'")
    if not (Path(args.model) / "config.json").is_file():
        raise BenchError(f"model directory {args.model} does not exist or has no config.json")
    if not args.ranks or min(args.ranks) < 1 or not args.zero or not set(args.zero) <= set(ZERO_CONFIGS):
        raise BenchError(f"--ranks must be positive and --zero among {sorted(ZERO_CONFIGS)}")
    for key in ("r", "seq", "micro_batch", "steps", "rounds", "comm_steps"):
        if getattr(args, key) < 1:
            raise BenchError(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise BenchError("--warmup must be >= 0")
    if args.ds_config is not None:
        if args.zero != [3]:
            raise BenchError(f"--ds-config {args.ds_config} is a ZeRO-3 configuration: use it with --zero 3")
        from lor2c_ds.adapters.config import ConfigError as DsConfigError
        from lor2c_ds.engine import resolve_ds_config_path
        try:
            resolve_ds_config_path(args.ds_config)
        except DsConfigError as e:
            raise BenchError(f"--ds-config: {e}") from None
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise BenchError(f"--out {out} exists and is not an empty directory (add --overwrite)")
    from lor2c_ds.adapters.config import ConfigError

    from .preflight_checks import check_model_dir

    try:
        check_model_dir(Path(args.model), "--model")  # a readable config, complete weights
    except ConfigError as e:
        raise BenchError(str(e)) from None
    return methods


# ------------------------------------------------------------------------------------------------
# One process group (every rank runs this; rank 0 writes the result). Shared with bench_peft.py.
# ------------------------------------------------------------------------------------------------

def train_config(spec: dict, world: int):
    from lor2c_ds.config import DataConfig, TrainConfig

    return TrainConfig(model=spec["model"], task=spec["task"], data=DataConfig(path="-"),
                       deepspeed=spec.get("ds_config") or ZERO_CONFIGS[spec["zero"]], precision=spec["precision"],
                       micro_batch_size=spec["micro_batch"], global_batch_size=spec["micro_batch"] * world,
                       warmup_ratio=0.0)


def ds_config_for(cfg, spec: dict, world: int) -> dict:
    from lor2c_ds import engine as ds

    config = ds.build_ds_config(cfg, world, total_steps=total_steps(spec))
    config["zero_optimization"]["stage"] = spec["zero"]
    return config


def total_steps(spec: dict) -> int:
    return spec["warmup"] + spec["steps"] + spec["comm_steps"]


def synthetic_batch(spec: dict, vocab: int, rank: int) -> dict:
    """A fixed batch of random tokens (and labels), different on every rank."""
    import torch

    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (spec["micro_batch"], spec["seq"]), generator=g)
    labels = ids if spec["task"] == "causal_lm" else torch.randint(0, 2, (spec["micro_batch"],), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def peak_memory() -> dict:
    """This process's peak host RSS; on CUDA, the device's peak allocated and reserved bytes."""
    import resource

    import torch

    cuda = torch.cuda.is_available()
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def report(spec: dict, engine, rank: int, times: list[float], comm: dict) -> None:
    """Gather every rank's sizes and memory, save a checkpoint (if asked), rank 0 writes the result."""
    from lor2c_ds import engine as ds

    mine = {**ds.parameter_bytes(engine), "optimizer_state": ds.optimizer_state_bytes(engine), **peak_memory()}
    everyone = ds.all_gather_object(mine)
    checkpoint_bytes = None
    if spec.get("checkpoint_dir"):
        ds.save_checkpoint(engine, spec["checkpoint_dir"], tag="bench", save_latest=False)
        ds.barrier()
        # the tag's files; DeepSpeed also copies its zero_to_fp32.py recovery scripts beside the tags
        checkpoint_bytes = dir_bytes(Path(spec["checkpoint_dir"]) / "bench")
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps({
            "method": spec["method"], "round": spec["round"], "ranks": len(everyone),
            "zero_stage": engine.zero_optimization_stage(), "times": times, "comm": comm,
            "per_rank": everyone, "checkpoint_bytes": checkpoint_bytes}))


def apply_method(model, method: str, r: int):
    """The benchmarked method on a loaded backbone (identical on every rank)."""
    import torch

    from lor2c_ds.adapters import AdapterConfig, apply_adapters

    torch.manual_seed(0)
    fields = METHODS[method]
    if fields is None:  # the floor: only a d-vector on the embedding output is trained
        model.requires_grad_(False)
        model.floor_bias = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
        model.get_input_embeddings().register_forward_hook(
            lambda mod, inp, out: out + model.floor_bias.to(out.dtype))
        return model
    config = AdapterConfig(**fields, r=r, alpha=2 * r)
    apply_adapters(model, config)
    if config.merges or config.injections:
        set_events_layout(model, config.merges, config.injections)
    return model


def set_events_layout(model, merges: int, injections: int) -> None:
    """The layout after `merges` merges (spans 0+1, 2+3, ...) and `injections` injections (the last
    single-block spans), as a resumed run restores it."""
    from lor2c_ds.adapters import set_layout
    from lor2c_ds.topology import TopologyCallback

    spans = model.lor2c.topology()
    keys = sorted(spans, key=int)
    for lower, upper in zip(keys[0:2 * merges:2], keys[1:2 * merges:2]):
        spans[lower][1], spans[upper][2] = spans[upper][1], False
    injected = []
    for key in keys[len(keys) - injections:]:
        spans[key][2] = False
        injected += [name for name, _ in TopologyCallback._injectable(model, spans[key][0])]
    set_layout(model, {"spans": spans, "injected": injected})


def worker(spec: dict) -> None:
    import warnings

    import torch

    from lor2c_ds import engine as ds
    from lor2c_ds.train import RunState, default_callbacks, load_backbone, step_with_callbacks

    warnings.filterwarnings("ignore", category=FutureWarning)
    rank, world = ds.init_distributed()
    cfg = train_config(spec, world)
    ds_config = ds_config_for(cfg, spec, world)
    model = apply_method(load_backbone(cfg, ds_config), spec["method"], spec["r"])
    engine = ds.initialize(model, ds_config)
    engine.train()  # the backbone's own dropout on, as in lor2c-train and under the HF Trainer
    # the per-step callbacks of lor2c-train (preemption check; ResLoRA's statistics), not the topology
    # events: the layout is fixed. The floor keeps the default adapter config: the preemption check only.
    cfg.adapter = getattr(model, "adapter_config", cfg.adapter)
    callbacks = [c for c in default_callbacks(cfg) if c.name != "topology"]
    for c in callbacks:
        c.configure_model(engine.module)
    run = RunState(cfg, engine, rank, world, None, total_steps(spec), total_steps(spec), callbacks=callbacks)
    batch = {k: v.to(engine.device) for k, v in synthetic_batch(spec, model.config.vocab_size, rank).items()}
    batch["valid"] = torch.ones(spec["micro_batch"], device=engine.device)

    def step():  # lor2c-train's own step (loss normalised by the global target count, the callbacks'
        # sums on its closing all-reduce), one micro-batch
        step_with_callbacks(run, [batch])
        run.step += 1
        for c in callbacks:
            c.on_step_end(run)
        ds.barrier()

    times = []
    for i in range(total_steps(spec)):
        if i == spec["warmup"] + spec["steps"]:
            ds.comms_logging(True)
        t0 = time.perf_counter()
        step()
        if spec["warmup"] <= i < spec["warmup"] + spec["steps"]:
            times.append(time.perf_counter() - t0)
    comm = ds.logged_comms()
    ds.comms_logging(False)
    report(spec, engine, rank, times, comm)
    ds.shutdown()


def exit_now() -> None:
    """End a worker that has written its result: skips the interpreter's teardown of torch, DeepSpeed
    and transformers, which takes seconds per process group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------

def run_group(spec: dict, tmp: Path) -> dict:
    """Start one process group of spec["ranks"] local ranks and return rank 0's result."""
    from launcher.train import free_port

    spec_path = tmp / f"{spec['method']}-r{spec['ranks']}-z{spec['zero']}-{spec['round']}.json"
    spec["result"] = str(spec_path.with_suffix(".result.json"))
    spec_path.write_text(json.dumps(spec))
    module = ["-m", "launcher.bench_peft", str(spec_path)] if spec["method"] == PEFT else \
        ["-m", "launcher.bench", "--model", spec["model"], "--out", "-", "--worker", str(spec_path)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if spec["ranks"] == 1:  # one rank needs no launcher process (as lor2c-train with nproc 1)
        cmd = [sys.executable, *module]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={spec['ranks']}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *module]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['method']} on {spec['ranks']} rank(s), ZeRO-{spec['zero']} failed "
                           f"({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def _ratio(results: list[dict], method: str, ranks: int, zero: int, reference: str) -> tuple:
    """Median over rounds of (method's median step / reference's median step in the same round)."""
    per_round = []
    for mine in (r for r in results if (r["method"], r["ranks"], r["zero"]) == (method, ranks, zero)):
        ref = [r for r in results if (r["method"], r["ranks"], r["zero"], r["round"]) ==
               (reference, ranks, zero, mine["round"])]
        if ref:
            per_round.append(statistics.median(mine["times"]) / statistics.median(ref[0]["times"]))
    return (statistics.median(per_round), per_round) if per_round else (None, [])


def _grad_reductions(zero: int) -> tuple[str, ...]:
    """The collectives that reduce gradients: reduce-scatter under ZeRO-3; ZeRO-1/2 all-reduce them (the
    gradient norm's all-reduce of a few bytes is counted with them there)."""
    return ("reduce_scatter",) if zero == 3 else ("reduce_scatter", "reduce", "all_reduce")


def _peak_per_rank(runs: list[dict], key: str) -> list | None:
    """Each rank's largest value of `key` over the rounds (None where it is not measured)."""
    if runs[0]["per_rank"][0][key] is None:
        return None
    return [max(r["per_rank"][i][key] for r in runs) for i in range(len(runs[0]["per_rank"]))]


def build_records(results: list[dict], args) -> list[dict]:
    """One record per configuration, every round pooled."""
    records = []
    keys = list(dict.fromkeys((r["method"], r["ranks"], r["zero"]) for r in results))
    for method, ranks, zero in keys:
        runs = sorted((r for r in results if (r["method"], r["ranks"], r["zero"]) == (method, ranks, zero)),
                      key=lambda r: r["round"])
        times = [t for r in runs for t in r["times"]]
        median = statistics.median(times)
        q1, q3 = _quartiles(times)
        first = runs[0]
        comm = {k: v / args.comm_steps for k, v in first["comm"]["bytes"].items()}
        sizes = first["per_rank"][0]
        optimizer = [m["optimizer_state"] for m in first["per_rank"]]
        ckpt = next((r["checkpoint_bytes"] for r in runs if r["checkpoint_bytes"] is not None), None)
        ckpt_reference = sizes["trainable"] + sum(optimizer)
        vs_floor, floor_rounds = _ratio(results, method, ranks, zero, "floor")
        vs_peft, peft_rounds = _ratio(results, method, ranks, zero, PEFT)

        records.append({
            "model": args.model, "task": args.task, "method": method, "r": args.r, "ranks": ranks,
            "zero_stage": first["zero_stage"], "ds_config": args.ds_config or ZERO_CONFIGS[zero],
            "precision": args.precision, "seq": args.seq,
            "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup, "rounds": len(runs),
            "step_time_median_s": median, "step_time_min_s": min(times), "step_time_max_s": max(times),
            "step_time_iqr_s": q3 - q1, "step_time_q1_s": q1, "step_time_q3_s": q3,
            "step_time_round_medians_s": [statistics.median(r["times"]) for r in runs],
            "tokens_per_s": ranks * args.micro_batch * args.seq / median,
            "peak_rss_bytes": _peak_per_rank(runs, "peak_rss_bytes"),
            "cuda_max_allocated_bytes": _peak_per_rank(runs, "cuda_max_allocated_bytes"),
            "cuda_max_reserved_bytes": _peak_per_rank(runs, "cuda_max_reserved_bytes"),
            "comm_bytes_per_step": comm,
            "comm_total_bytes_per_step": sum(comm.values()),
            "comm_message_bytes_per_step": {k: v / args.comm_steps for k, v in first["comm"]["message_bytes"].items()},
            "comm_calls_per_step": {k: v / args.comm_steps for k, v in first["comm"]["calls"].items()},
            "grad_reduce_bytes_per_step": sum(v for k, v in comm.items() if k in _grad_reductions(zero)),
            "trainable_grad_bytes": sizes["trainable"],
            "backbone_bytes": sizes["backbone_whole"],
            "backbone_bytes_per_rank": [m["backbone"] for m in first["per_rank"]],
            "trainable_bytes_per_rank": [m["trainable"] for m in first["per_rank"]],
            "trainable_partition_bytes_per_rank": [m["trainable_partition"] for m in first["per_rank"]],
            "optimizer_state_bytes_per_rank": optimizer,
            "trainable_params": sizes["trainable_numel"], "trainable_bytes": sizes["trainable"],
            "checkpoint_bytes": ckpt,
            "checkpoint_ratio": ckpt / ckpt_reference if ckpt else None,
            "comm_vs_backbone": sum(comm.values()) / sizes["backbone_whole"] if sizes["backbone_whole"] else None,
            "vs_floor": vs_floor, "vs_floor_rounds": floor_rounds,
            "vs_peft_lora": vs_peft, "vs_peft_lora_rounds": peft_rounds,
        })
    return records


def check_targets(records: list[dict]) -> list[dict]:
    """Each target against every configuration it applies to."""
    rows = []

    def add(target, rec, value, limit, note=""):
        if value is not None:
            rows.append({"target": target, "method": rec["method"], "ranks": rec["ranks"],
                         "zero_stage": rec["zero_stage"], "value": value, "limit": limit,
                         "met": value <= limit, "note": note})

    for rec in records:
        m = rec["method"]
        if m == "lor2c":
            add(f"LoR2C r=8 <= {TARGETS['lor2c']}x floor", rec, rec["vs_floor"], TARGETS["lor2c"],
                "" if rec["r"] == 8 else f"measured at r={rec['r']}")
        if m == "lora":
            add(f"LoRA (q,v) <= {TARGETS['lora']}x floor", rec, rec["vs_floor"], TARGETS["lora"])
            add(f"lor2c_ds LoRA <= {TARGETS['vs_peft_lora']}x peft_lora", rec, rec["vs_peft_lora"],
                TARGETS["vs_peft_lora"])
        if m.startswith("reslora"):
            add(f"ResLoRA <= {TARGETS['reslora']}x floor", rec, rec["vs_floor"], TARGETS["reslora"])
            lora = next((o for o in records if (o["method"], o["zero_stage"], o["ranks"]) ==
                         ("lora", rec["zero_stage"], rec["ranks"])), None)
            if lora and rec["ranks"] > 1 and lora["comm_bytes_per_step"].get("all_gather"):
                # its statistics gather no weight: the same backbone traffic as LoRA's (within 1%)
                add(f"ResLoRA all-gather bytes per step <= {TARGETS['reslora_gather_vs_lora']}x LoRA's", rec,
                    rec["comm_bytes_per_step"].get("all_gather", 0) / lora["comm_bytes_per_step"]["all_gather"],
                    TARGETS["reslora_gather_vs_lora"])
        if rec["ranks"] > 1:
            add(f"bytes communicated per step <= {TARGETS['comm_vs_backbone']}x backbone bytes", rec,
                rec["comm_vs_backbone"], TARGETS["comm_vs_backbone"])
        if rec["ranks"] == 2 and rec["zero_stage"] == 3:
            one = [o for o in records if (o["method"], o["zero_stage"], o["ranks"]) == (m, 3, 1)]
            if one:
                add(f"2 ranks: backbone bytes per rank <= {TARGETS['backbone_2_ranks']}x 1 rank", rec,
                    max(rec["backbone_bytes_per_rank"]) / max(one[0]["backbone_bytes_per_rank"]),
                    TARGETS["backbone_2_ranks"])
        if m != "floor":  # the floor trains one d-vector: its checkpoint is all metadata
            add(f"adapter checkpoint <= {TARGETS['checkpoint_ratio']}x (adapter params + optimizer state)", rec,
                rec["checkpoint_ratio"], TARGETS["checkpoint_ratio"])
    return rows


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    cuda = torch.cuda.is_available()
    return {"hostname": socket.gethostname(), "cpu_model": cpu, "cores": os.cpu_count(),
            "python": sys.version.split()[0], "torch": torch.__version__, "deepspeed": ver("deepspeed"),
            "transformers": ver("transformers"), "peft": ver("peft"), "accelerate": ver("accelerate"),
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "cuda_devices": torch.cuda.device_count() if cuda else 0,
            "backend": "nccl" if cuda else "gloo", "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _mb(value) -> str:
    return "-" if value is None else f"{value / 1e6:.2f}"


def _x(value) -> str:
    return "-" if value is None else f"{value:.3f}x"


def markdown(records: list[dict], targets: list[dict], machine: dict, args) -> str:
    lines = [(f"# lor2c-bench: {Path(args.model).name}, {args.task}, seq {args.seq}, micro-batch {args.micro_batch}, "
              f"{args.precision}"), "",
             (f"{machine['device']} ({machine['cpu_model']}, {machine['cores']} cores), torch {machine['torch']}, "
              f"DeepSpeed {machine['deepspeed']}, transformers {machine['transformers']}, peft {machine['peft']}; "
              f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s), methods interleaved."),
             "",
             ("| method | ranks | ZeRO | median step (s) | IQR (s) | min-max (s) | tokens/s | vs floor | vs peft_lora "
              "| peak RSS per rank (MB) | backbone per rank (MB) | trainable params | optimizer per rank (MB) "
              "| comm per step (MB) | grad reduce (MB) | checkpoint (MB, ratio) |"),
             "|" + "---|" * 16]
    for r in records:
        comm = ", ".join(f"{k} {v / 1e6:.2f}" for k, v in sorted(r["comm_bytes_per_step"].items())) or "0"
        ckpt = "-" if r["checkpoint_bytes"] is None else f"{_mb(r['checkpoint_bytes'])} ({r['checkpoint_ratio']:.3f}x)"
        lines.append(
            f"| {r['method']} | {r['ranks']} | {r['zero_stage']} | {r['step_time_median_s']:.4f} | "
            f"{r['step_time_iqr_s']:.4f} | {r['step_time_min_s']:.3f}-{r['step_time_max_s']:.3f} | "
            f"{r['tokens_per_s']:.0f} | {_x(r['vs_floor'])} | {_x(r['vs_peft_lora'])} | "
            f"{' / '.join(_mb(v) for v in r['peak_rss_bytes'])} | "
            f"{' / '.join(_mb(v) for v in r['backbone_bytes_per_rank'])} | {r['trainable_params']:,d} | "
            f"{' / '.join(_mb(v) for v in r['optimizer_state_bytes_per_rank'])} | {comm} | "
            f"{_mb(r['grad_reduce_bytes_per_step'])} | {ckpt} |")
    lines += ["", "Targets (the worst configuration of each; every check is in bench.json):", "",
              "| target | worst value | configuration | met |", "|---|---|---|---|"]
    for target in dict.fromkeys(t["target"] for t in targets):
        rows = [t for t in targets if t["target"] == target]
        worst = max(rows, key=lambda t: t["value"])
        met = sum(t["met"] for t in rows)
        where = f"{worst['method']}, {worst['ranks']} rank(s), ZeRO-{worst['zero_stage']}"
        lines.append(f"| {target} | {worst['value']:.3f} | {where} | "
                     f"{'met' if met == len(rows) else 'not met'} ({met}/{len(rows)}) |")
    return "\n".join(lines) + "\n"


def write_tensorboard(out: Path, records: list[dict], results: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tensorboard"))
    scalars = ("step_time_median_s", "step_time_iqr_s", "tokens_per_s", "vs_floor", "vs_peft_lora",
               "comm_total_bytes_per_step", "grad_reduce_bytes_per_step", "checkpoint_bytes", "trainable_params")
    for rec in records:
        tag = f"{rec['method']}/ranks{rec['ranks']}_zero{rec['zero_stage']}"
        for key in scalars:
            if rec[key] is not None:
                writer.add_scalar(f"{tag}/{key}", rec[key], 0)
        for key in ("peak_rss_bytes", "backbone_bytes_per_rank", "optimizer_state_bytes_per_rank"):
            for rank, value in enumerate(rec[key] or []):
                writer.add_scalar(f"{tag}/{key}/rank{rank}", value, 0)
        runs = sorted((r for r in results if (r["method"], r["ranks"], r["zero"]) ==
                       (rec["method"], rec["ranks"], rec["zero_stage"])), key=lambda r: r["round"])
        for i, t in enumerate(t for r in runs for t in r["times"]):
            writer.add_scalar(f"{tag}/step_time_s", t, i)
    writer.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        exit_now()
    try:
        methods = check_args(args)
    except BenchError as e:
        print(f"lor2c-bench: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.overwrite and (out / "tensorboard").is_dir():
        shutil.rmtree(out / "tensorboard")
    out.mkdir(parents=True, exist_ok=True)
    configs = [(n, z) for z in args.zero for n in args.ranks]
    results = []
    base = {"model": str(args.model), "task": args.task, "r": args.r, "precision": args.precision, "seq": args.seq,
            "micro_batch": args.micro_batch, "steps": args.steps, "warmup": args.warmup,
            "comm_steps": args.comm_steps, "ds_config": args.ds_config}
    with tempfile.TemporaryDirectory(prefix="lor2c_bench_") as tmp:
        tmp = Path(tmp)
        for round_ in range(args.rounds):
            for ranks, zero in configs:
                for method in (methods if round_ % 2 == 0 else methods[::-1]):
                    ckpt = tmp / f"ckpt-{method}-{ranks}-{zero}" if round_ == 0 else None
                    spec = {**base, "method": method, "ranks": ranks, "zero": zero, "round": round_,
                            "checkpoint_dir": str(ckpt) if ckpt else None}
                    started = time.perf_counter()
                    try:
                        result = run_group(spec, tmp)
                    except RuntimeError as e:
                        print(f"lor2c-bench: {e}", file=sys.stderr)
                        return 1
                    if ckpt:
                        shutil.rmtree(ckpt, ignore_errors=True)
                    result.update(ranks=ranks, zero=zero)
                    results.append(result)
                    print(f"round {round_} {method:>12} ranks={ranks} zero={zero}: median step "
                          f"{statistics.median(result['times']):.4f} s ({time.perf_counter() - started:.1f} s wall)",
                          flush=True)
    records = build_records(results, args)
    targets = check_targets(records)
    machine = machine_info()
    (out / "bench.json").write_text(json.dumps({"machine": machine, "args": vars(args), "records": records,
                                                "targets": targets}, indent=2) + "\n")
    table = markdown(records, targets, machine, args)
    (out / "bench.md").write_text(table)
    write_tensorboard(out, records, results)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
