"""Time from a preemption signal to a complete checkpoint, for any recipe.

    python -m launcher.preemption_timing --config launcher/configs/minilm_reslora.yaml --after-step 3 \
        --out runs/preempt_minilm [--set key=value ...]

Starts `lor2c-train` on the recipe in a fresh output directory, sends SIGUSR1 to it once the run has
logged step `--after-step` (log_every is set to 1), waits for it to exit, and prints the run's own
measurement (the `preempted` row of metrics.jsonl: signal received -> checkpoint complete, which
includes finishing the step under way) with the wall time from the signal to the exit.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="preemption_timing", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--after-step", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="a new output directory for the run")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"preemption_timing: error: --out {args.out} exists; give a new directory", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "launcher.train", "--config", args.config, "--set", f"output_dir={args.out}",
           "--set", "log_every=1"]
    for o in args.overrides:
        cmd += ["--set", o]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_name(args.out.name + ".log")
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        while not any(r["kind"] == "train" and r["step"] >= args.after_step for r in rows(args.out)):
            if proc.poll() is not None:
                print(f"preemption_timing: error: the run ended before step {args.after_step} (see {log})",
                      file=sys.stderr)
                return 1
            time.sleep(0.05)
        sent = time.time()
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait()
    exited = time.time() - sent
    event = next((r for r in rows(args.out) if r["kind"] == "preempted"), None)
    if code or event is None:
        print(f"preemption_timing: error: exit code {code}, preempted row {event} (see {log})", file=sys.stderr)
        return 1
    result = {"config": args.config, "overrides": args.overrides, "signal_after_step": args.after_step,
              "stopped_at_step": event["step"], "signal_to_checkpoint_s": round(event["signal_to_checkpoint_s"], 2),
              "signal_to_exit_s": round(exited, 2)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
