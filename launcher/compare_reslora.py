"""LoRA against the ResLoRA variants, several seeds, through `lor2c-train`; prints the README table.

    python -m launcher.compare_reslora --suite minilm --steps 120 --seeds 1,2,3 --out runs/compare_reslora

Per method and seed it trains one run (same data order for a given seed) and reads its metrics.jsonl:
- steps to LoRA's final training loss: the first step (with a full window) where the method's trailing
  mean of the training loss (window `--smooth`) is at or below LoRA's at its last step (same seed);
- the final held-out accuracy (classification) or perplexity (causal LM) of the training-time graph;
- step time relative to LoRA: per step, LoRA's tokens/s over the method's (the steps hold the same
  tokens), median over the steps after `--skip` warm-up steps;
- for each merge rule: the relative logit difference between the merged model and the training graph
  on the held-out set, and the merged model's metric.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HOME = Path(os.environ.get("LOR2C_DS_HOME", Path.home() / ".cache" / "lor2c_ds"))

SUITES = {
    "minilm": dict(
        model=str(HOME / "models" / "all-MiniLM-L6-v2"), task="classification", num_labels=2,
        data={"path": str(HOME / "data" / "polarity-en-pang-lee2.csv"), "format": "polarity_csv",
              "max_length": 48, "max_eval_examples": 400},
        lr=1e-3, global_batch_size=16, micro_batch_size=16,
        adapter={"r": 4, "alpha": 16, "dropout": 0.1},
        methods={"lora": {"method": "lora"},
                 "is": {"method": "reslora", "reslora_variant": "is"},
                 "bs": {"method": "reslora", "reslora_variant": "bs", "pre_num": 1},
                 "ms": {"method": "reslora", "reslora_variant": "ms", "pre_num": 2}}),
    "smollm2": dict(
        model=str(HOME / "models" / "SmolLM2-135M-Instruct"), task="causal_lm",
        data={"path": str(HOME / "data" / "chitchat.jsonl"), "max_length": 48, "max_eval_examples": 64},
        lr=1e-3, global_batch_size=8, micro_batch_size=8,
        adapter={"r": 4, "alpha": 8, "dropout": 0.1},
        methods={"lora": {"method": "lora"},
                 "is": {"method": "reslora", "reslora_variant": "is"},
                 "bs": {"method": "reslora", "reslora_variant": "bs", "pre_num": 1},
                 "ms": {"method": "reslora", "reslora_variant": "ms", "pre_num": 2}}),
}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="compare-reslora", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default="lora,is,bs,ms")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--skip", type=int, default=3)
    p.add_argument("--out", default="runs/compare_reslora")
    p.add_argument("--table-only", action="store_true", help="summarise the runs already in --out")
    return p.parse_args(argv)


def train(suite: str, method: str, seed: int, args, out: Path) -> float:
    spec = SUITES[suite]
    recipe = {k: v for k, v in spec.items() if k not in ("methods", "adapter")}
    recipe.update(adapter={**spec["adapter"], **spec["methods"][method]}, seed=seed, max_steps=args.steps,
                  nproc=args.nproc, deepspeed="zero3", log_every=1, eval_before=False, output_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(recipe))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(out.parent / f"{out.name}.yaml"),
                           "--set", "overwrite_output_dir=true"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{suite}/{method}/seed {seed} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def rows(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def trailing(losses: list[float], k: int) -> list[float]:
    return [statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]


def summarise(root: Path, methods: list[str], seeds: list[int], args) -> dict:
    metric = "accuracy" if SUITES[args.suite]["task"] == "classification" else "perplexity"
    res: dict = {m: {"reach": [], "final": [], "time": [], "merge": {}} for m in methods}
    for seed in seeds:
        base = rows(root / f"lora_s{seed}", "train")
        target = trailing([r["loss"] for r in base], args.smooth)[-1]
        base_tps = [r["tokens_per_s"] for r in base]
        for m in methods:
            out = root / f"{m}_s{seed}"
            train_rows = rows(out, "train")
            smooth = trailing([r["loss"] for r in train_rows], args.smooth)
            reach = next((i + 1 for i, v in enumerate(smooth) if i >= args.smooth - 1 and v <= target), None)
            res[m]["reach"].append(reach)
            res[m]["final"].append(rows(out, "eval")[-1][metric])
            ratios = [b / r["tokens_per_s"] for b, r in zip(base_tps, train_rows)][args.skip:]
            res[m]["time"].append(statistics.median(ratios))
            for rep in rows(out, "reslora_merge"):
                entry = res[m]["merge"].setdefault(rep["merge_rule"], {"rel": [], "merged": []})
                entry["rel"].append(rep["rel_logit_diff"])
                entry["merged"].append(rep[f"{metric}_merged"])
    return {"metric": metric, "methods": res}


def fmt(values, spec=".3f") -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    missed = len(values) - len(vals)
    text = f"{statistics.fmean(vals):{spec}}" + (f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else "")
    return text + (f" ({missed} of {len(values)} not reached)" if missed else "")


def table(summary: dict) -> str:
    metric = summary["metric"]
    lines = [f"| method | steps to LoRA's final loss | final {metric} | step time vs LoRA | "
             "merge rule: relative logit diff, merged " + metric + " |",
             "| --- | --- | --- | --- | --- |"]
    for m, r in summary["methods"].items():
        merges = "; ".join(f"{rule}: {fmt(e['rel'], '.2e')}, {fmt(e['merged'])}" for rule, e in r["merge"].items())
        lines.append(f"| {m} | {fmt(r['reach'], '.1f')} | {fmt(r['final'])} | {fmt(r['time'], '.2f')} | "
                     f"{merges or '-'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    if "lora" not in methods:
        methods.insert(0, "lora")
    root = Path(args.out) / args.suite
    if not args.table_only:
        for seed in seeds:
            for m in methods:
                wall = train(args.suite, m, seed, args, root / f"{m}_s{seed}")
                print(f"{args.suite} {m} seed {seed}: {wall:.0f} s", flush=True)
    summary = summarise(root, methods, seeds, args)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary))


if __name__ == "__main__":
    main()
