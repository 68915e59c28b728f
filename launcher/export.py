"""lor2c-export: fold a run's adapters into its backbone and write one consolidated checkpoint.

    lor2c-export --checkpoint DIR --base MODEL_DIR --out DIR [--dtype bf16|fp16|fp32]
    lor2c-export --config RECIPE.yaml [--set key=value ...] [--out DIR]

DIR is a checkpoint tag (OUTPUT_DIR/checkpoints/step_N), an adapter directory, or a run's output
directory (its newest complete checkpoint). With --config, the recipe names the run (output_dir),
the base (model), the dtype (export_dtype) and the held-out data; --out defaults to OUTPUT_DIR/export.
Runs in one process, without DeepSpeed. Bad input: one line on stderr, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lor2c-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="checkpoint tag, adapter directory or run output directory")
    parser.add_argument("--base", help="the base model directory the run fine-tuned")
    parser.add_argument("--out", help="output directory (must be empty or absent unless --overwrite)")
    parser.add_argument("--config", help="the training recipe (YAML); supplies what is not given")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value (with --config); repeatable")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                        help="dtype of the exported weights (default: the base checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output shard (default 2GB)")
    parser.add_argument("--parity-batches", type=int, default=4,
                        help="held-out batches compared between the trained and the exported model (0: skip)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.data import DataError
    from lor2c_ds.export import ExportError, export

    try:
        cfg = None
        if args.config:
            from lor2c_ds.config import load_config

            cfg = load_config(args.config, args.overrides)
        elif args.overrides:
            raise ExportError("--set needs --config")
        checkpoint = args.checkpoint or (cfg.output_dir if cfg else None)
        base = args.base or (cfg.model if cfg else None)
        out = args.out or (str(Path(cfg.output_dir) / "export") if cfg else None)
        dtype = args.dtype or (getattr(cfg, "export_dtype", None) if cfg else None)
        missing = [flag for flag, value in (("--checkpoint", checkpoint), ("--base", base), ("--out", out))
                   if not value]
        if missing:
            raise ExportError(f"{', '.join(missing)} required (or --config with a recipe that names them)")
        if Path(base).is_dir() and (Path(base) / "config.json").is_file():
            from .preflight_checks import check_model_dir

            check_model_dir(Path(base), "--base")  # complete weights, before anything is written
        report = export(checkpoint, base, out, dtype=dtype, overwrite=args.overwrite,
                        max_shard_size=args.max_shard_size, parity_batches=args.parity_batches, train_config=cfg)
    except (ExportError, ConfigError, DataError, FileNotFoundError) as e:
        print(f"lor2c-export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": out, "parity": report["parity"], "plain_transformers": report["plain_transformers"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
