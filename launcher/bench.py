"""Step time of adapter methods against the floor, on N local ranks under DeepSpeed.

    python -m launcher.bench --model DIR --task classification --methods floor,lor2c,lora --ranks 2

The floor is the same model with no adapter but with backward through every activation: a single
trainable d-vector added to the embedding output makes autograd traverse the whole block stack,
which any adapter method must do too. A timed step is forward + backward + optimizer step on a fixed
synthetic batch, closed by a barrier; the median over `--steps` after `--warmup` is reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lor2c-bench-step", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="classification", choices=["classification", "causal_lm"])
    p.add_argument("--methods", default="floor,lor2c")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--deepspeed", default="zero3")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="repeat the method list, interleaved, to average drift")
    p.add_argument("--out", default=None, help="write all results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> None:
    import torch

    from lor2c_ds import engine as ds
    from lor2c_ds.adapters import AdapterConfig, apply_adapters
    from lor2c_ds.config import DataConfig, TrainConfig
    from lor2c_ds.train import load_backbone, scored_labels, summed_loss

    method, out = args.worker.split(":", 1)
    rank, world = ds.init_distributed()
    cfg = TrainConfig(model=args.model, task=args.task, data=DataConfig(path="-"), deepspeed=args.deepspeed,
                      precision=args.precision, micro_batch_size=args.micro_batch,
                      global_batch_size=args.micro_batch * world, warmup_ratio=0.0)
    ds_config = ds.build_ds_config(cfg, world, total_steps=args.warmup + args.steps)
    model = load_backbone(cfg, ds_config)
    model.requires_grad_(False)
    torch.manual_seed(0)
    if method == "floor":
        embeddings = model.get_input_embeddings()
        model.floor_bias = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
        embeddings.register_forward_hook(lambda mod, inp, out: out + model.floor_bias.to(out.dtype))
    else:
        apply_adapters(model, AdapterConfig(method=method, r=args.r, alpha=2 * args.r))
    engine = ds.initialize(model, ds_config)
    g = torch.Generator().manual_seed(rank)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.micro_batch, args.seq), generator=g).to(engine.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "valid": torch.ones(args.micro_batch),
             "labels": ids if args.task == "causal_lm" else torch.randint(0, 2, (args.micro_batch,), generator=g)}
    labels = scored_labels(batch, args.task).to(engine.device)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        logits = engine(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        engine.backward(summed_loss(logits, labels, args.task) / labels.numel())
        engine.step()
        ds.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps({
            "method": method, "ranks": world, "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times),
            "tokens_per_s": world * args.micro_batch * args.seq / statistics.median(times)}))
    ds.shutdown()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from launcher.train import free_port

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for method in args.methods.split(","):
                out = Path(tmp) / f"{method}-{round_}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "launcher.bench",
                       *argv, "--worker", f"{method}:{out}"]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return proc.returncode
                results.append(json.loads(out.read_text()))
                print(json.dumps(results[-1]), flush=True)
    floor = [r["median_s"] for r in results if r["method"] == "floor"]
    print("\n| method | ranks | median step (s) | vs floor |\n|---|---|---|---|")
    for method in args.methods.split(","):
        med = statistics.mean(r["median_s"] for r in results if r["method"] == method)
        ratio = f"{med / statistics.mean(floor):.3f}x" if floor else "-"
        print(f"| {method} | {args.ranks} | {med:.4f} | {ratio} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
