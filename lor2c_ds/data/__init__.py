"""Data: local files through `datasets`, encoded per task, sharded so the global batch is rank-independent.

`prepare_data(cfg, tokenizer)` is the one entry point: it reads the splits (`sources`), encodes them
for the task (`tasks`), fails on bad rows or skips and counts them, and reports truncation. Under a
process group rank 0 prepares first and the other ranks then read the same `datasets` cache.
"""
from __future__ import annotations

import contextlib
import json
from collections import Counter
import logging
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from . import cache
from .loaders import (Collator, EpochSampler, StreamShard, eval_loader, model_inputs, stream_loader,  # noqa: F401
                      train_loader)
from .sources import DataError, load_splits, require_columns  # noqa: F401
from .tasks import Encoder, label_map, pack

log = logging.getLogger(__name__)
_MARKS = ("_problem", "_truncated")


@dataclass
class PreparedData:
    train: object  # a `datasets.Dataset`, or a `sources.Stream` when streaming
    eval: object
    test: object | None
    collator: Collator
    label_names: list[str] | None = None  # classification: id -> label value
    report: dict = field(default_factory=dict)  # per split: rows, skipped by reason, truncated

    @property
    def streaming(self) -> bool:
        return not hasattr(self.train, "__len__")


@contextlib.contextmanager
def _rank_zero_first(all_ranks: bool):
    """Rank 0 builds the `datasets` cache files; the others wait, then reuse them."""
    dist = torch.distributed
    ranks = all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if ranks and dist.get_rank() != 0:
        dist.barrier()
    try:
        yield
    finally:
        if ranks and dist.get_rank() == 0:
            dist.barrier()


def _encode(ds, encoder: Encoder):
    columns = ds.column_names
    if columns is None:  # a stream: its columns are those of its first row
        columns = list(next(iter(ds)).keys())
    return ds.map(encoder, batched=True, remove_columns=columns)


def _screen(ds, raw, name: str, path: str, on_bad_rows: str) -> tuple[object, dict]:
    """Fail on rows the encoder marked bad (quoting the first), or drop and count them; count truncated rows."""
    marks = ds["_problem"]
    bad = [i for i, p in enumerate(marks) if p]
    report = {"rows": len(ds), "skipped": dict(Counter(marks[i] for i in bad)), "truncated": int(sum(ds["_truncated"]))}
    problems = [marks[i] for i in bad]
    if problems and on_bad_rows == "error":
        first = json.dumps(raw[bad[0]], default=str)
        first = first if len(first) < 200 else first[:200] + "..."
        raise DataError(f"{name} split ({path}): {len(problems)} bad row(s): {problems[0]} in {first}; "
                        "fix them or set data.on_bad_rows: skip to skip and count them")
    if problems:
        ds = ds.filter(lambda p: not p, input_columns="_problem")
    if len(ds) == 0:
        raise DataError(f"{name} split ({path}) has no usable rows: {report['skipped']}")
    return ds.remove_columns(list(_MARKS)), report


def prepare_data(cfg: TrainConfig, tokenizer, all_ranks: bool = True) -> PreparedData:
    """Every split read, encoded and screened: built once per data fingerprint (`cache`) and read back
    by every later call, rank and pass. A streamed training split is encoded lazily, row by row, and
    not cached; its held-out splits are prepared here (rank 0 first, `all_ranks`: every rank of a process
    group calls this; False when one rank calls it alone, an export on rank 0)."""
    if not cfg.data.streaming:
        splits, meta, _ = cache.prepared(cfg, tokenizer, lambda: _meta(*_build(cfg, tokenizer)))
        _log_report(meta["report"], cfg.data.max_length)
        return PreparedData(splits["train"], splits["eval"], splits["test"], Collator(tokenizer, cfg.task),
                            meta["label_names"], meta["report"])
    with _rank_zero_first(all_ranks):
        prepared, names, report = _build(cfg, tokenizer)
    _log_report(report, cfg.data.max_length)
    return PreparedData(prepared["train"], prepared["eval"], prepared["test"], Collator(tokenizer, cfg.task), names,
                        report)


def _meta(prepared: dict, names, report: dict) -> tuple[dict, dict]:
    return prepared, {"label_names": names, "report": report}


def _build(cfg: TrainConfig, tokenizer) -> tuple[dict, list | None, dict]:
    """(the prepared splits, the label names, the data report)."""
    data, task = cfg.data, cfg.task
    splits = load_splits(data, cfg.seed)
    required = {"classification": [data.text_field, data.label_field], "regression": [data.text_field,
                data.label_field], "causal_lm": [data.text_field], "chat": []}[task]
    if data.text_pair_field and task in ("classification", "regression"):
        required.append(data.text_pair_field)
    for name, ds in splits.items():
        if ds is not None and required:
            require_columns(ds, required, f"the {name} split ({_path_of(data, name)})")
    if task == "chat":
        _require_chat_columns(splits, data)
    labels = label_map(splits["train"], data, data.path) if task == "classification" else None
    encoder = Encoder(tokenizer, data, task, labels)
    prepared, report = {}, {}
    for name, ds in splits.items():
        if ds is None:
            prepared[name] = None
            continue
        if name == "train" and data.streaming:
            prepared[name] = ds.encoded(encoder)  # encoded lazily, a rank its own rows; bad ones become filler
            continue
        try:
            encoded = _encode(ds, encoder)
        except DataError as e:
            raise DataError(f"{name} split ({_path_of(data, name)}): {e}") from None
        prepared[name], report[name] = _screen(encoded, ds, name, _path_of(data, name), data.on_bad_rows)
        if data.packing:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            docs = len(prepared[name])
            prepared[name] = prepared[name].map(pack, batched=True, batch_size=1000, fn_kwargs={
                "max_length": data.max_length, "pad_id": pad}, remove_columns=prepared[name].column_names)
            report[name]["packed_rows"], report[name]["documents"] = len(prepared[name]), docs
    names = sorted(labels, key=labels.get) if labels else None
    return prepared, names, report


def _log_report(report: dict, max_length: int) -> None:
    for name, values in report.items():
        if values["skipped"] or values["truncated"]:
            log.warning("%s split: %d rows, skipped %s, %d truncated to max_length %d", name, values["rows"],
                        values["skipped"] or "none", values["truncated"], max_length)


def _path_of(data, split: str) -> str:
    return {"train": data.path, "eval": data.eval_path or data.path, "test": data.test_path}[split]


def _require_chat_columns(splits: dict, data) -> None:
    for name, ds in splits.items():
        if ds is None:
            continue
        columns = ds.column_names or list(next(iter(ds)).keys())
        if data.messages_field not in columns and not {data.prompt_field, data.response_field} <= set(columns):
            raise DataError(f"the {name} split ({_path_of(data, name)}) has neither a {data.messages_field!r} "
                            f"column nor {data.prompt_field!r} and {data.response_field!r} columns "
                            f"(columns: {columns}); map yours with data.messages_field or prompt_field/response_field")
