"""lor2c-eval: evaluate an export or a training run's adapters, in one process (CPU or one GPU).

    lor2c-eval --model EXPORT_DIR [--config RECIPE.yaml] [--split eval|test] [--out FILE]
    lor2c-eval --run RUN_DIR [--set key=value ...] [--multiple-choice FILE] [--generation FILE]

EXPORT_DIR is a directory written by lor2c-export (or any transformers model directory); RUN_DIR is a
training run's output directory (train_config.json + adapter/ or checkpoints/), a checkpoint tag or
an adapter directory: the base model named by the run's recipe with the adapters loaded. The recipe
(--config, else the run's train_config.json, else the one beside the export's checkpoint) supplies
the task, the data of --split and the eval section's multiple-choice and generation files.
Without --split, --multiple-choice or --generation it evaluates what the recipe names: the held-out
split and its eval files. Metrics are printed as JSON and written to --out (replaced only on success).
Bad input: one line on stderr, exit code 2, nothing written.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path


class EvalInputError(ValueError):
    """Bad command-line input: reported in one line."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lor2c-eval", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an export directory (lor2c-export) or a transformers model directory")
    which.add_argument("--run", help="a training run's output directory, checkpoint tag or adapter directory")
    parser.add_argument("--config", help="the recipe (YAML); default: the run's train_config.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, dotted for sections (data.test_path=...); repeatable")
    parser.add_argument("--split", choices=("eval", "test"), help="evaluate the recipe's held-out or test split")
    parser.add_argument("--multiple-choice", metavar="FILE", help='jsonl rows {"context" or "messages", "choices", "label"}')
    parser.add_argument("--generation", metavar="FILE", help='jsonl rows {"prompt", "answer"}: greedy, exact match')
    parser.add_argument("--max-new-tokens", type=int, help="generation length (default: eval.max_new_tokens, 64)")
    parser.add_argument("--max-examples", type=int, help="cap on the multiple-choice and generation rows")
    parser.add_argument("--batch-size", type=int, help="rows per forward pass (default: micro_batch_size, 8)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--out", help="write the metrics (JSON) to this file")
    args = parser.parse_args(argv)
    for flag in ("max_new_tokens", "max_examples", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise EvalInputError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    return args


def _train_config_path(adapter_dir: Path) -> Path | None:
    """The run's train_config.json beside a checkpoint tag or adapter directory (as lor2c-export finds it)."""
    return next((d / "train_config.json" for d in (adapter_dir, adapter_dir.parent, adapter_dir.parent.parent)
                 if (d / "train_config.json").is_file()), None)


def _recipe(args):
    """(the recipe or None, the adapter directory for --run or None)."""
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.config import load_config
    from lor2c_ds.export import resolve_checkpoint

    if args.run:
        adapter_dir = resolve_checkpoint(args.run)
        path = args.config or _train_config_path(adapter_dir)
        if path is None:
            raise EvalInputError(f"{args.run} has no train_config.json beside its adapters; pass --config")
        return load_config(path, args.overrides), adapter_dir
    if not (Path(args.model) / "config.json").is_file():
        raise EvalInputError(f"model directory {args.model} does not exist or has no config.json")
    from .preflight_checks import check_weights

    check_weights(Path(args.model), "--model")  # complete weights (an export may carry its own model code)
    if args.config:
        return load_config(args.config, args.overrides), None
    report = Path(args.model) / "export_report.json"
    checkpoint = Path(json.loads(report.read_text()).get("checkpoint") or "") if report.is_file() else None
    path = _train_config_path(checkpoint) if checkpoint is not None and checkpoint.is_dir() else None
    if path is None:  # the run the export came from is not at hand
        if args.overrides:
            raise EvalInputError("--set needs a recipe: pass --config (no train_config.json was found for the model)")
        return None, None
    try:
        return load_config(path, args.overrides), None
    except ConfigError as e:
        if args.overrides:
            raise
        logging.getLogger("lor2c-eval").warning("ignoring %s: %s", path, e)
        return None, None


def _task(args, cfg) -> str:
    if cfg is not None:
        return cfg.task
    raw = json.loads((Path(args.model) / "config.json").read_text())
    report = Path(args.model) / "export_report.json"
    task = json.loads(report.read_text()).get("task") if report.is_file() else None
    if not task:
        heads = raw.get("architectures") or []
        task = "classification" if any("SequenceClassification" in a for a in heads) else "causal_lm"
    return "regression" if task == "classification" and raw.get("problem_type") == "regression" else task


def _load_model(args, cfg, adapter_dir, task: str, device: str):
    import torch

    from lor2c_ds.config import model_kind

    if device == "cpu":
        dtype = torch.float32
    elif args.model:
        dtype = "auto"  # the export's own dtype
    else:
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32  # as training ran
    if args.model:
        from lor2c_ds import from_pretrained

        model = from_pretrained(args.model, dtype=dtype)
    else:
        from lor2c_ds import load_adapters
        from lor2c_ds.export.load import auto_class, model_config

        kind = model_kind(task)
        config = model_config(Path(cfg.model), kind, cfg.num_labels)
        if task == "regression":
            config.problem_type = "regression"
        model = auto_class(kind).from_pretrained(cfg.model, config=config, dtype=dtype)
        try:
            load_adapters(model, adapter_dir)
        except ValueError as e:
            raise EvalInputError(str(e)) from None
    if getattr(model.config, "pad_token_id", None) is None:
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device).eval()


def _load_tokenizer(args, cfg):
    from transformers import AutoTokenizer

    from .preflight_checks import has_vocabulary

    candidates = [args.model] if args.model else []
    candidates += [cfg.model] if cfg is not None else []
    for path in candidates:
        if not has_vocabulary(path):  # transformers would build an empty tokenizer from the config alone
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # an export maps AutoConfig to its own code
        except (OSError, ValueError):
            continue
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        template = cfg.data.chat_template if cfg is not None else None
        if template:  # the recipe's own chat template (data.chat_template) for chat prompts
            if not Path(template).is_file():
                raise EvalInputError(f"data.chat_template {template} does not exist")
            tokenizer.chat_template = Path(template).read_text()
        return tokenizer
    raise EvalInputError(f"no tokenizer found in {' or '.join(map(str, candidates))}")


def _split_loader(cfg, split: str, tokenizer, batch: int):
    from lor2c_ds.data import eval_loader, prepare_data

    if split == "test" and not cfg.data.test_path:
        raise EvalInputError("--split test: the recipe has no data.test_path (set it with --set data.test_path=FILE)")
    data = prepare_data(cfg, tokenizer)
    ds = getattr(data, split)
    if ds is None:
        raise EvalInputError(f"the recipe's data has no {split} split")
    return eval_loader(ds, data.collator, batch, 0, 1)


def _finite(value):
    """JSON has no NaN: undefined metrics (a constant prediction's correlation) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate_model(args) -> dict:
    """Every check first (recipe, files, task), then the model, then the metrics."""
    import torch

    from lor2c_ds.evaluation import evaluate, evaluate_sets, load_eval_sets

    if args.out and Path(args.out).is_dir():
        raise EvalInputError(f"--out {args.out} is a directory; give a file name")
    cfg, adapter_dir = _recipe(args)
    task = _task(args, cfg)
    explicit = args.split or args.multiple_choice or args.generation
    from_recipe = cfg is not None and not explicit  # nothing chosen: what the recipe names
    split = args.split or ("eval" if from_recipe else None)
    sets = load_eval_sets(args.multiple_choice or (cfg.eval.multiple_choice_path if from_recipe else None),
                          args.generation or (cfg.eval.generation_path if from_recipe else None),
                          args.max_examples or (cfg.eval.max_examples if cfg is not None else None))
    if split and cfg is None:
        raise EvalInputError(f"--split {split} needs the recipe's data: pass --config "
                             "(no train_config.json was found for the model)")
    if not split and not any(sets.values()):
        raise EvalInputError("nothing to evaluate: give --split, --multiple-choice or --generation "
                             "(or --config with a recipe that names its data)")
    if any(sets.values()) and task not in ("causal_lm", "chat"):
        raise EvalInputError(f"multiple-choice and generation sets need a causal language model; this is a "
                             f"{task} model")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalInputError(f"--device {device}: no CUDA device is available here")
    batch = args.batch_size or (cfg.micro_batch_size if cfg is not None else 8)
    max_new = args.max_new_tokens or (cfg.eval.max_new_tokens if cfg is not None else 64)

    tokenizer = _load_tokenizer(args, cfg)
    loader = _split_loader(cfg, split, tokenizer, batch) if split else None
    model = _load_model(args, cfg, adapter_dir, task, device)
    result = {"model": args.model or str(adapter_dir), "task": task, "device": device}
    if loader is not None:
        result[split] = evaluate(model, loader, task, gather=False)
    if any(sets.values()):
        result.update(evaluate_sets(model, tokenizer, sets, batch_size=batch, max_new_tokens=max_new, gather=False))
    return _finite(result)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from lor2c_ds.adapters.config import ConfigError
    from lor2c_ds.data import DataError
    from lor2c_ds.evaluation import EvalDataError
    from lor2c_ds.export import ExportError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate_model(args)
    except (EvalInputError, EvalDataError, ConfigError, DataError, ExportError, OSError) as e:
        print(f"lor2c-eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        _write_atomic(Path(args.out), text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
