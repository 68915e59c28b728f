"""lor2c-random-model: a random-init checkpoint with a real model's shape, for rehearsals.

    lor2c-random-model --shape tinyllama-1.1b --dtype bf16 --out runs/tinyllama-random

The shape is a shipped one (launcher/model_shapes/, as lor2c-plan reads them), a config.json or a model
directory. transformers' own config and model classes build the model (initialised as the family
initialises it, seed 0) and save it with `save_pretrained` in the given dtype, in shards, as hub
checkpoints ship. No tokenizer is written: lor2c-bench feeds synthetic token batches.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bf16", "fp16", "fp32")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lor2c-random-model", description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True, help="shipped shape name, config.json or model directory")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def write_random_model(config_dict: dict, out: Path, dtype: str = "bf16", max_shard_size: str = "1GB",
                       seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model(config_dict["model_type"], **fields)
    config.architectures = config_dict.get("architectures")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from lor2c_ds.planner import PlanError

    from .plan import resolve_model_config

    out = Path(args.out)
    try:
        config, label = resolve_model_config(args.shape)
    except PlanError as e:
        print(f"lor2c-random-model: error: {e}", file=sys.stderr)
        return 2
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"lor2c-random-model: error: --out {out} exists and is not an empty directory", file=sys.stderr)
        return 2
    write_random_model(config, out, args.dtype, args.max_shard_size, args.seed)
    print(f"{label}: random-init {args.dtype} checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
