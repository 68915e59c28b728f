"""Datasets: local files through `datasets`, tokenized, sharded so the global batch is rank-independent."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .config import DataConfig

datasets.disable_progress_bars()


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file."""


def _format_of(cfg: DataConfig, path: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "json", "jsonl"):
        return suffix
    raise DataError(f"cannot tell the format of {path}; set data.format to one of polarity_csv, csv, json, jsonl")


def _read(path_str: str, cfg: DataConfig) -> datasets.Dataset:
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    fmt = _format_of(cfg, path)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse failure is reported once, below
    try:
        if fmt == "polarity_csv":
            ds = datasets.load_dataset("csv", data_files=str(path), split="train", encoding="utf-8-sig",
                                       column_names=[cfg.label_field, cfg.text_field], keep_in_memory=True)
        elif fmt == "csv":
            ds = datasets.load_dataset("csv", data_files=str(path), split="train", keep_in_memory=True)
        else:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", keep_in_memory=True)
    except Exception as e:  # the parsers raise many types; all mean the same to the user
        cause = e.__cause__ or e
        raise DataError(f"data file {path} could not be parsed as {fmt}: {type(cause).__name__}: {cause}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if len(ds) == 0:
        raise DataError(f"data file {path} holds no examples")
    return ds


def _labels_to_ids(ds: datasets.Dataset, field: str, num_labels: int, path: str) -> datasets.Dataset:
    if field not in ds.column_names:
        raise DataError(f"data file {path} has no label column {field!r} (columns: {ds.column_names})")
    values = ds.unique(field)
    if any(v is None for v in values):
        raise DataError(f"data file {path} has rows with no {field!r} value")
    if len(values) > num_labels:
        raise DataError(f"data file {path} has {len(values)} distinct labels {sorted(map(str, values))[:10]}, "
                        f"but num_labels is {num_labels}")
    ids = {v: i for i, v in enumerate(sorted(values))}  # e.g. polarity -1 -> 0, 1 -> 1
    return ds.map(lambda row: {"labels": ids[row[field]]}, keep_in_memory=True)


def load_splits(cfg: DataConfig, task: str, num_labels: int, seed: int) -> datasets.DatasetDict:
    """Train and held-out splits with a `text` column (and `labels` for classification)."""
    train = _read(cfg.path, cfg)
    if cfg.text_field not in train.column_names:
        raise DataError(f"data file {cfg.path} has no text column {cfg.text_field!r} (columns: {train.column_names})")
    if cfg.eval_path:
        held_out = _read(cfg.eval_path, cfg)
    else:
        if len(train) < 2:
            raise DataError(f"data file {cfg.path} has too few examples to hold some out")
        split = train.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, held_out = split["train"], split["test"]
    splits = datasets.DatasetDict(train=train, eval=held_out)
    if task == "classification":
        splits = datasets.DatasetDict({k: _labels_to_ids(v, cfg.label_field, num_labels, cfg.path)
                                       for k, v in splits.items()})
    bad = splits["train"].filter(lambda row: not isinstance(row[cfg.text_field], str), keep_in_memory=True)
    if len(bad):
        raise DataError(f"data file {cfg.path} has {len(bad)} rows whose {cfg.text_field!r} is not text")
    if cfg.max_train_examples:
        splits["train"] = splits["train"].select(range(min(cfg.max_train_examples, len(splits["train"]))))
    if cfg.max_eval_examples:
        splits["eval"] = splits["eval"].select(range(min(cfg.max_eval_examples, len(splits["eval"]))))
    return splits


def tokenize(splits: datasets.DatasetDict, tokenizer, cfg: DataConfig, task: str) -> datasets.DatasetDict:
    keep = {"input_ids", "attention_mask", "labels"}

    def encode(batch):
        return tokenizer(batch[cfg.text_field], truncation=True, max_length=cfg.max_length)

    out = {}
    for name, ds in splits.items():
        ds = ds.map(encode, batched=True, keep_in_memory=True)
        out[name] = ds.remove_columns([c for c in ds.column_names if c not in keep])
    return datasets.DatasetDict(out)


class Collator:
    """Pads a list of examples; for causal LM the labels are the inputs with padding ignored (-100)."""

    def __init__(self, tokenizer, task: str):
        self.tokenizer, self.task = tokenizer, task

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        valid = torch.tensor([row.pop("_valid", 1) for row in rows], dtype=torch.float32)
        batch = self.tokenizer.pad(rows, return_tensors="pt")
        if self.task == "causal_lm":
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        batch["valid"] = valid
        return dict(batch)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start `skip` samples into its epoch (a resumed run's position)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return super().__len__() - self.skip


def train_loader(ds, collate, micro_batch: int, rank: int, world: int, seed: int) -> DataLoader:
    """Rank `rank`'s micro-batches. Step k of any world size covers the same `global_batch` examples:
    the sampler deals one shuffled order (fixed by seed and epoch) round-robin across ranks; the tail
    of an epoch that does not fill a global batch is left out of that epoch."""
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Its own generator: iterating a DataLoader draws a seed, which must not move the global RNG
    # (dropout), or a resumed run would diverge from the one that did not stop.
    return DataLoader(ds, batch_size=micro_batch, sampler=sampler, collate_fn=collate, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


class _EvalShard(torch.utils.data.Dataset):
    """Every rank gets the same number of rows (collectives under ZeRO-3 must line up); rows past the
    end of a rank's share repeat row 0 with `_valid` = 0 and count for nothing."""

    def __init__(self, ds, rank: int, world: int):
        self.ds, self.rows = ds, list(range(rank, len(ds), world))
        self.length = math.ceil(len(ds) / world)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if i < len(self.rows):
            return dict(self.ds[self.rows[i]], _valid=1)
        return dict(self.ds[0], _valid=0)


def eval_loader(ds, collate, batch: int, rank: int, world: int) -> DataLoader:
    return DataLoader(_EvalShard(ds, rank, world), batch_size=batch, shuffle=False, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone


def model_inputs(batch: dict) -> dict:
    """The forward arguments of a collated batch. Packed causal-LM rows carry `position_ids` that restart
    at each document and no attention mask: transformers then masks attention per document."""
    keys = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
    return {k: batch[k] for k in keys if k in batch}
