"""lor2c-plan: will this LoR2C / LoRA / ResLoRA run fit, how much does it send, which layout to use.

    lor2c-plan --model-config llama-2-7b --nodes 2 --gpus-per-node 8 --gpu-mem 80 --net-gbps 400 --method lor2c
    lor2c-plan --model-config ~/.cache/lor2c_ds/models/SmolLM2-135M-Instruct --nodes 1 --gpus-per-node 2 ...
    lor2c-plan --validate bench.json        # predicted vs measured, one table per record

The model is a shipped shape name (launcher/model_shapes/), a config.json, or a model directory holding
one. The modelling and its formulas are in the lor2c_ds.planner docstring. Exit codes: 0 planned, 2 bad input,
3 the model fits no layout on these GPUs, 1 a --validate error above --tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SHAPES_DIR = Path(__file__).resolve().parent / "model_shapes"
EXIT_BAD_INPUT, EXIT_NO_FIT, EXIT_VALIDATION = 2, 3, 1


def shipped_shapes() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def resolve_model_config(spec: str) -> tuple[dict, str]:
    """(config dict, label) from a shipped name, a config.json, or a model directory."""
    from lor2c_ds.planner import PlanError

    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"model directory {path.parent} has no config.json")
    elif not path.is_file():
        if spec in shipped_shapes():
            path = SHAPES_DIR / f"{spec}.json"
        elif path.suffix == ".json" or "/" in spec:
            raise PlanError(f"model config {spec} not found")
        else:
            raise PlanError(f"unknown model {spec!r}: not a shipped shape ({', '.join(shipped_shapes())}), "
                            "a config.json or a model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"model config {path} is not readable JSON: {e}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise PlanError(f"model config {path} has no model_type: not a transformers config.json")
    label = spec if path.parent == SHAPES_DIR else (path.parent.name if path.name == "config.json" else path.stem)
    return config, label


def parse_set(items: list[str]) -> dict:
    """`--set key=value` adapter fields; values are JSON when they parse (numbers, lists), else strings."""
    from lor2c_ds.planner import PlanError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlanError(f"--set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lor2c-plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-config", help="shipped name (" + ", ".join(shipped_shapes()) +
                   "), a config.json, or a model directory")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--net-gbps", type=float, default=400.0,
                   help="inter-node bandwidth per node (all its NICs together), Gbit/s")
    p.add_argument("--intra-gbps", type=float, default=2400.0, help="intra-node bandwidth per GPU (NVLink), Gbit/s")
    p.add_argument("--gpu-tflops", type=float, default=200.0, help="sustained TFLOP/s per GPU, for the step estimate")
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="GiB per GPU kept free (CUDA context, NCCL, fragmentation); default 1 + 5%% of --gpu-mem")
    p.add_argument("--method", default="lor2c", help="lora, lor2c, share_lor2c, reslora")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another adapter field, e.g. dropout=0.05, targets=[\"q\",\"v\"], merges=2")
    p.add_argument("--task", choices=["causal_lm", "classification"], default=None,
                   help="default: classification for BERT/RoBERTa, causal_lm otherwise")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ckpt = p.add_mutually_exclusive_group()
    ckpt.add_argument("--activation-checkpointing", dest="ckpt", action="store_true", default=None,
                      help="force activation checkpointing on (default: the planner decides)")
    ckpt.add_argument("--no-activation-checkpointing", dest="ckpt", action="store_false")
    p.add_argument("--attention", choices=["flash", "math"], default="flash",
                   help="attention kernel: flash (GPU fused kernels) or math (CPU SDPA path)")
    p.add_argument("--zero-config", default=None,
                   help="a DeepSpeed JSON whose zero_optimization knobs to use (default: ds_configs/zero3.json's)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every number to this file")
    p.add_argument("--validate", default=None, metavar="BENCH.json",
                   help="compare predictions with measured records (launcher/bench.py or tests/plan_probe.py)")
    p.add_argument("--tolerance", type=float, default=0.15, help="--validate: largest relative error accepted")
    return p.parse_args(argv)


DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
AUTO_KNOBS = ("overlap_comm", "pin_memory", "zero_hpz_partition_size")  # resolved by lor2c_ds.engine


def documented_knobs() -> set[str]:
    """The knobs with a row in ds_configs/README.md's table."""
    import re

    text = (DS_CONFIGS / "README.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, flags=re.M))


def check_zero_config(path: str | None, gpus_per_node: int) -> list[str]:
    """Errors (PlanError) for knobs the DeepSpeed JSON sets without a row in ds_configs/README.md or with an
    "auto" nothing resolves, or an hpZ partition that does not divide a node; warnings returned."""
    from lor2c_ds.planner import PlanError

    source = Path(path) if path else DS_CONFIGS / "zero3.json"
    try:
        zero = json.loads(source.read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise PlanError(f"--zero-config {source}: not a readable DeepSpeed JSON ({e})") from None
    known, warnings = documented_knobs(), []
    knobs = dict(zero)
    for section in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(section), dict):
            knobs.update({k: v for k, v in zero[section].items()})
            if zero[section].get("pin_memory") is False:
                warnings.append(f"{source.name}: {section}.pin_memory is false: host<->GPU copies are unpinned "
                                "(slower); \"auto\" pins them with CUDA")
    undocumented = sorted(k for k in knobs if k not in known)
    if undocumented:
        raise PlanError(f"--zero-config {source}: knob(s) {undocumented} have no row in ds_configs/README.md; "
                        "document what each is for")
    bad_auto = sorted(k for k, v in knobs.items() if v == "auto" and k not in AUTO_KNOBS)
    if bad_auto:
        raise PlanError(f"--zero-config {source}: {bad_auto} set to \"auto\", which only {list(AUTO_KNOBS)} accept")
    hpz = zero.get("zero_hpz_partition_size", "auto")
    if hpz != "auto" and (not isinstance(hpz, int) or hpz < 1 or gpus_per_node % hpz):
        raise PlanError(f"--zero-config {source}: zero_hpz_partition_size {hpz} does not divide the "
                        f"{gpus_per_node} GPUs of a node; use \"auto\" (the node's GPU count)")
    if zero.get("overlap_comm") is False:
        warnings.append(f"{source.name}: overlap_comm is false: gradient reduction and gathers wait for compute "
                        "on GPUs; \"auto\" overlaps them with CUDA")
    return warnings


def zero_knobs(path: str | None) -> dict:
    from lor2c_ds.planner import DEFAULT_ZERO, PlanError

    if path is None:
        return dict(DEFAULT_ZERO)
    try:
        zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise PlanError(f"--zero-config {path}: not a readable DeepSpeed JSON ({e})") from None
    return {k: float(zero.get(k, v)) for k, v in DEFAULT_ZERO.items()}


# ------------------------------------------------------------------------------------------- output

def human_bytes(x: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render(plan: dict, label: str) -> str:
    from lor2c_ds.planner import binary

    m, c, w, rec = plan["model"], plan["cluster"], plan["workload"], plan["recommendation"]
    layouts = plan["layouts"]
    names = list(layouts)
    star = {n: ("*" if not layouts[n]["runnable"] else "") for n in names}
    lines = [
        (f"model      {label}: {m['model_type']}, {params(m['backbone_params'])} backbone parameters, "
         f"{m['num_hidden_layers']} blocks, hidden {m['hidden_size']}, vocab {m['vocab_size']}, task {m['task']}"),
        (f"adapters   {w['method']} r={w['r']}: {m['trainable_params']:,} trainable parameters "
         f"({100 * m['trainable_params'] / (m['backbone_params'] + m['trainable_params']):.4f}%)"),
        (f"cluster    {c['nodes']} node(s) x {c['gpus_per_node']} GPUs = {c['world']} ranks, {c['gpu_mem_gib']:g} GiB "
         f"each ({c['usable_bytes'] / (1 << 30):.1f} usable), {c['net_gbps']:g} Gbit/s per node between nodes, "
         f"{c['intra_gbps']:g} Gbit/s per GPU inside"),
        f"workload   micro-batch {w['micro_batch']} x seq {w['seq']}, {w['precision']}",
        "",
    ]
    width = 38
    head = f"{'memory per GPU':<{width}}" + "".join(f"{n + star[n]:>12}" for n in names)
    lines += [head, "-" * len(head)]
    rows = [("backbone shard", "backbone"), ("hpZ secondary shard", "hpz_secondary"),
            ("trainable, whole", "trainable"), ("trainable, ZeRO partition", "trainable_partition"),
            ("optimizer state (fp32, m, v)", "optimizer_state"), ("gradients", "gradients"),
            ("gradient bucket", "buffers"), ("gathered backbone (peak)", "gathered")]
    for title, key in rows:
        if key == "hpz_secondary" and "hpz" not in layouts:
            continue
        lines.append(f"{title:<{width}}" + "".join(f"{binary(layouts[n]['memory'][key]):>12}" for n in names))
    for title, opt in (("no checkpointing", "no_checkpointing"), ("activation checkpointing", "checkpointing")):
        lines.append(f"{'activations, ' + title:<{width}}" +
                     "".join(f"{binary(layouts[n]['options'][opt]['activations']):>12}" for n in names))
        lines.append(f"{'TOTAL, ' + title:<{width}}" + "".join(
            f"{binary(layouts[n]['options'][opt]['total']) + ('' if layouts[n]['options'][opt]['fits'] else '!'):>12}"
            for n in names))
        lines.append(f"{'  largest micro-batch that fits':<{width}}" +
                     "".join(f"{layouts[n]['options'][opt]['max_micro_batch']:>12}" for n in names))
    lines += ["", f"{'communication per step and GPU':<{width}}" + "".join(f"{n + star[n]:>12}" for n in names),
              "-" * len(head)]
    order = ["backbone all-gather, forward", "backbone all-gather, backward", "gradient reduce-scatter",
             "gradient all-reduce", "MiCS gradient all-reduce", "adapter all-gather after the step"]
    present = {col["what"] for n in names for col in layouts[n]["comm"]}
    whats = [w for w in order if w in present] + sorted(present - set(order))
    for what in whats:
        cells = []
        for n in names:
            col = next((x for x in layouts[n]["comm"] if x["what"] == what), None)
            cells.append("-" if col is None else human_bytes(col["bytes"]))
        lines.append(f"{what:<{width}}" + "".join(f"{x:>12}" for x in cells))
    lines.append(f"{'inter-node bytes per GPU':<{width}}" +
                 "".join(f"{human_bytes(layouts[n]['inter_node_bytes_per_step']):>12}" for n in names))
    lines.append(f"{'communication time (s)':<{width}}" +
                 "".join(f"{layouts[n]['comm_time_s']:>12.3f}" for n in names))
    for title, opt in (("compute (s), no checkpointing", "no_checkpointing"),
                       ("compute (s), checkpointing", "checkpointing")):
        lines.append(f"{title:<{width}}" + "".join(f"{layouts[n]['options'][opt]['compute_s']:>12.3f}" for n in names))
    if any(star.values()):
        lines.append("* MiCS was removed from DeepSpeed 0.19 (the version this project pins): modelled for "
                     "comparison, never recommended.")
    if not all(o["fits"] for lp in layouts.values() for o in lp["options"].values()):
        lines.append(f"! does not fit in the {binary(c['usable_bytes'])} usable.")
    lines.append("Communication: the whole buffer of each collective; times bandwidth-bound, without overlap.")
    named = rec["deepspeed"] + (f" ({rec['layout']})" if rec["layout"] != rec["deepspeed"] else "")
    lines += ["", f"recommendation: deepspeed: {named}, micro-batch {rec['micro_batch']}"
              + (f" x {rec['gradient_accumulation']} accumulation" if rec["gradient_accumulation"] > 1 else "")
              + f", activation checkpointing {'on' if rec['activation_checkpointing'] else 'off'}: "
              f"{binary(rec['total_bytes'])} of {binary(rec['usable_bytes'])} usable, "
              f"about {rec['step_s_no_overlap']:.2f} s per step"]
    lines += [f"  - {r}" for r in rec["reasons"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- validate

def load_records(path: str) -> list[dict]:
    from lor2c_ds.planner import PlanError

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlanError(f"--validate {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise PlanError(f"--validate {path}: neither JSON nor JSON lines ({e})") from None
    if isinstance(data, dict):
        data = data.get("records", data.get("results", [data]))
    records = [r for r in data if isinstance(r, dict) and "backbone_bytes_per_rank" in r]
    if not records:
        raise PlanError(f"--validate {path}: no record with backbone_bytes_per_rank (the bench record fields)")
    return records


def record_workload(record: dict):
    """The Workload of a measured record, or None for what the planner does not model (the floor,
    PEFT's LoRA). Method names are launcher/bench.py's (lor2c, lora, reslora-bs, merge_lor2c, ...)."""
    from launcher.bench import METHODS, PEFT
    from lor2c_ds.planner import Workload, worst_rank

    name = record.get("method", "lor2c")
    if name == PEFT or (name in METHODS and METHODS[name] is None):
        return None
    fields = dict(METHODS.get(name) or {"method": name})
    method = fields.pop("method")
    return Workload(method=method, r=int(record.get("r", 8)), seq=int(record.get("seq", 128)),
                    micro_batch=int(record.get("micro_batch", 1)), precision=record.get("precision", "fp32"),
                    task=record.get("task"), adapter=fields,
                    attention="flash" if worst_rank(record.get("cuda_max_allocated_bytes")) else "math")


def validate(args) -> int:
    from lor2c_ds.planner import Cluster, compare, make_plan

    worst = 0.0
    for record in load_records(args.validate):
        config, label = resolve_model_config(str(record["model"]))
        ranks = int(record.get("ranks", 1))
        work = record_workload(record)
        head = f"\n{label}  {record.get('method')}  ranks {ranks}  ZeRO-{record.get('zero_stage', 3)}"
        if work is None:
            print(f"{head}: not modelled (no adapter config), skipped")
            continue
        cluster = Cluster(nodes=1, gpus_per_node=ranks, gpu_mem_gib=1e6, net_gbps=args.net_gbps,
                          intra_gbps=args.intra_gbps)
        knobs = {**zero_knobs(args.zero_config), **record.get("zero_knobs", {})}
        plan = make_plan(config, cluster, work, knobs, layouts=("zero2", "zero3"))
        print(f"{head}  r={work.r}  {work.micro_batch} x {work.seq} tokens  {work.precision}")
        print(f"  {'field':<48}{'predicted':>15}{'measured':>15}{'error':>9}")
        for row in compare(plan, record):
            err = row["rel_error"]
            print(f"  {row['field']:<48}{row['predicted']:>15,.0f}{row['measured']:>15,.0f}"
                  f"{'     inf' if math.isinf(err) else f'{100 * err:>+8.1f}%'}"
                  f"{'' if row['checked'] else '  (not checked)'}")
            if row["checked"]:
                worst = max(worst, abs(err))
    print(f"\nlargest relative error of the checked fields: {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else EXIT_VALIDATION


def main(argv=None) -> int:
    from lor2c_ds.planner import Cluster, PlanError, Workload, make_plan

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.validate:
            return validate(args)
        if not args.model_config:
            raise PlanError("--model-config is required (a shipped name, a config.json or a model directory)")
        config, label = resolve_model_config(args.model_config)
        cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem,
                          net_gbps=args.net_gbps, intra_gbps=args.intra_gbps, gpu_tflops=args.gpu_tflops,
                          reserve_gib=args.reserve_gb)
        work = Workload(method=args.method, r=args.r, seq=args.seq, micro_batch=args.micro_batch,
                        precision=args.precision, task=args.task, activation_checkpointing=args.ckpt,
                        adapter=parse_set(args.set), attention=args.attention)
        knob_warnings = check_zero_config(args.zero_config, args.gpus_per_node)
        plan = make_plan(config, cluster, work, zero_knobs(args.zero_config))
    except PlanError as e:
        print(f"lor2c-plan: error: {e}", file=sys.stderr)
        return EXIT_NO_FIT if str(e).startswith("does not fit") else EXIT_BAD_INPUT
    print(render(plan, label))
    for line in knob_warnings:
        print(f"lor2c-plan: warning: {line}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({"label": label, **plan}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
