"""Trainable parameters and held-out accuracy of the LoR2C family against LoRA, several seeds.

    python -m launcher.compare_methods --seeds 1,2,3 --out runs/compare_methods

Each (method, seed) is one `lor2c-train` run of the MiniLM polarity recipe with `--set` overrides;
the table reports the final trainable-parameter count (after any merge or injection) and the mean and
spread of the final held-out accuracy. Writes results.json and table.md under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parent / "configs" / "minilm_lor2c.yaml"
METHODS = {
    "LoRA": ["adapter.method=lora", "adapter.targets=[q,v]"],
    "LoR2C": ["adapter.method=lor2c"],
    "ShareLoR2C": ["adapter.method=share_lor2c"],
    "MergeLoR2C": ["adapter.method=lor2c", "adapter.merges=2"],
    "InjectLoR2C": ["adapter.method=lor2c", "adapter.injections=2"],
    "IMLoR2C": ["adapter.method=lor2c", "adapter.merges=2", "adapter.injections=2"],
}


def run_one(overrides: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "launcher.train", "--config", str(RECIPE), "--set", f"output_dir={out}",
           "--set", "overwrite_output_dir=true"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    trainable = next(line for line in proc.stdout.splitlines() if line.startswith("trainable params"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    return {"trainable": int(trainable.split()[2].replace(",", "")), "accuracy": evals[-1]["accuracy"],
            "untuned_accuracy": evals[0]["accuracy"], "events": [r for r in rows if r["kind"] == "topology"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compare_methods", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="runs/compare_methods")
    p.add_argument("--set", dest="common", action="append", default=[], help="extra overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    for method in args.methods.split(","):
        for seed in args.seeds.split(","):
            key = f"{method}|{seed}"
            if key in results:  # resumable: finished runs are kept
                continue
            results[key] = run_one([*METHODS[method], f"seed={seed}", *args.common],
                                   out / method.split()[0].lower() / f"seed{seed}")
            (out / "results.json").write_text(json.dumps(results, indent=2))
            print(key, results[key]["trainable"], f"{results[key]['accuracy']:.4f}", flush=True)
    lines = ["| method | trainable params | held-out accuracy (mean ± sd) | seeds |", "|---|---|---|---|"]
    for method in args.methods.split(","):
        runs = [v for k, v in results.items() if k.split("|")[0] == method]
        if not runs:
            continue
        accs = [r["accuracy"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {method} | {runs[0]['trainable']:,d} | {statistics.mean(accs):.4f} ± {sd:.4f} | {len(runs)} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
