"""Reading the rows users bring: local files of every common format, or a `datasets` directory.

Everything goes through the `datasets` library: files are converted once into its Arrow cache and
then memory-mapped (not loaded into RAM), and `streaming` reads a file lazily, row by row, so a
corpus larger than memory works.

A streamed training split is a `Stream`: one `datasets` stream a file (a glob's files sorted), each
with the range of its rows that are trained on. The held-out rows (without data.eval_path) are the
first `max_eval_examples` rows of the files in order, so they are cut off by file and row, never by a
`datasets` skip that sharding could move; `max_train_examples` likewise ends a file's range.
`loaders.StreamShard` orders these rows per epoch and gives each rank its share.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
from pathlib import Path

import datasets

from ..config import DataConfig

datasets.disable_progress_bars()
log = logging.getLogger(__name__)

# suffix -> (`datasets` builder, its extra arguments)
_BUILDERS = {
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
    "arrow": ("arrow", {}),
}
EVAL_SPLIT_NAMES = ("validation", "eval", "dev")  # how a saved DatasetDict may name its held-out split


class DataError(ValueError):
    """A data file is missing, empty or malformed; the message names the file (and line or row)."""


def format_of(cfg: DataConfig, path: Path) -> str:
    if cfg.format != "auto":
        return cfg.format
    if path.is_dir():
        return "saved"
    suffix = path.suffix.lower().lstrip(".")
    if suffix in _BUILDERS:
        return suffix
    raise DataError(f"cannot tell the format of {path} from its suffix; set data.format to one of "
                    f"polarity_csv, {', '.join(_BUILDERS)}, saved")


def _first_bad_json_line(path: Path) -> str | None:
    """`datasets` reports a JSON Lines error without the line: find it."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {number} is not valid JSON ({e.msg} at column {e.colno})"
    return None


def _expand(path_str: str) -> list[str]:
    """A glob pattern (`shard-*.jsonl`) names every matching file, sorted; a plain path itself."""
    if not any(c in path_str for c in "*?["):
        return [path_str]
    files = sorted(glob.glob(path_str))
    if not files:
        raise DataError(f"no data file matches {path_str}")
    return files


def read(path_str: str, cfg: DataConfig, streaming: bool = False):
    """One split's rows: a memory-mapped `datasets.Dataset`, or an `IterableDataset` when streaming.
    A saved `DatasetDict` directory returns the dict itself (its splits are used by name). A glob
    reads several files as one split (a stream then has one shard a file)."""
    files = _expand(path_str)
    path = Path(files[0])
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    fmt = format_of(cfg, path)
    if fmt == "saved":
        if not path.is_dir():
            raise DataError(f"data path {path} is not a directory written by datasets' save_to_disk")
        try:
            return datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"data directory {path} was not written by datasets' save_to_disk: {e}") from None
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; a {fmt} file was expected")
    for f in map(Path, files):
        if f.stat().st_size == 0:
            raise DataError(f"data file {f} is empty")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse failure is reported once, below
    try:
        if fmt == "polarity_csv":
            ds = datasets.load_dataset("csv", data_files=files, split="train", encoding="utf-8-sig",
                                       column_names=[cfg.label_field, cfg.text_field], streaming=streaming)
        else:
            builder, kwargs = _BUILDERS[fmt]
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kwargs)
    except Exception as e:  # the parsers raise many types; all mean the same to the user
        for f in map(Path, files if fmt in ("json", "jsonl") else []):
            where = _first_bad_json_line(f)
            if where:
                raise DataError(f"data file {f}: {where}") from None
        cause = e.__cause__ or e
        raise DataError(f"data file {path} could not be parsed as {fmt}: {type(cause).__name__}: {cause}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if not streaming and len(ds) == 0:
        raise DataError(f"data file {path} holds no examples")
    return ds


def require_columns(ds, columns: list[str], where: str) -> None:
    have = ds.column_names
    if have is None:  # a stream whose first row has not been read yet
        have = list(next(iter(ds)).keys())
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataError(f"{where} has no column {missing[0]!r} (columns: {have}); "
                        "map yours with data.text_field / label_field / prompt_field / response_field / messages_field")


def load_splits(cfg: DataConfig, seed: int) -> dict:
    """{"train", "eval", "test"} rows (test may be None). The held-out split is data.eval_path, a
    saved DatasetDict's validation split, or a seeded `eval_fraction` of the training rows; when
    streaming, train is a `Stream` and the held-out split, without eval_path, its first `max_eval_examples` rows."""
    source = read(cfg.path, cfg, streaming=cfg.streaming)
    test = read(cfg.test_path, cfg) if cfg.test_path else None
    held_out = read(cfg.eval_path, cfg) if cfg.eval_path else None
    if isinstance(source, datasets.DatasetDict):
        if "train" not in source:
            raise DataError(f"data directory {cfg.path} has splits {list(source)} but no 'train' split")
        named_eval = next((source[n] for n in EVAL_SPLIT_NAMES if n in source), None)
        held_out = held_out if held_out is not None else named_eval
        test = test if test is not None else source.get("test")
        source = source["train"]
    for name, split in (("eval_path", held_out), ("test_path", test)):
        if isinstance(split, datasets.DatasetDict):
            raise DataError(f"data.{name} is a saved DatasetDict; give a single split (a file or a saved Dataset)")
    train = source
    if cfg.streaming:
        train, held_out = _stream_splits(cfg, source, held_out)
    elif held_out is None:
        if len(source) < 2:
            raise DataError(f"data file {cfg.path} has too few examples to hold some out")
        split = source.train_test_split(test_size=cfg.eval_fraction, seed=seed)
        train, held_out = split["train"], split["test"]
    if cfg.max_train_examples and not cfg.streaming:
        train = train.select(range(min(cfg.max_train_examples, len(train))))
    if cfg.max_eval_examples:
        held_out = held_out.select(range(min(cfg.max_eval_examples, len(held_out))))
    return {"train": train, "eval": held_out, "test": test}


class Stream:
    """A streamed split's training rows, read lazily through `datasets`. `parts`: (one file's stream, its
    first trained row, its end row or None); `encode` (a batched `Encoder`) makes model inputs of a row."""

    column_names = None  # as for a `datasets` stream of unknown features: the first row tells

    def __init__(self, parts: list[tuple], encode=None):
        self.parts, self.encode = parts, encode

    def encoded(self, encode) -> "Stream":
        return Stream(self.parts, encode)

    def rows(self, order=None):
        """The raw rows, file after file in `order` (part indices; default: file order)."""
        for i in range(len(self.parts)) if order is None else order:
            ds, start, stop = self.parts[i]
            yield from itertools.islice(ds, start, stop)

    def encode_row(self, row: dict) -> dict:
        if self.encode is None:
            return dict(row)
        out = self.encode({k: [v] for k, v in row.items()})
        return {k: v[0] for k, v in out.items()}

    def __iter__(self):
        """Every training row in file order (encoded once an encoder is set)."""
        return map(self.encode_row, self.rows())


def _stream_splits(cfg: DataConfig, source, held_out) -> tuple[Stream, object]:
    """(the training `Stream`, the held-out rows): without eval_path, the files' first `max_eval_examples`
    rows in file order are held out and cut from the front of the training files."""
    if isinstance(source, datasets.Dataset):  # a saved Dataset
        files = [source.to_iterable_dataset()]
    else:
        files = [read(f, cfg, streaming=True) for f in _expand(cfg.path)]
    want = 0
    if held_out is None:
        if not cfg.max_eval_examples:
            raise DataError("a streamed data.path needs data.eval_path or data.max_eval_examples "
                            "(the first rows of the stream are held out)")
        want = cfg.max_eval_examples
    rows, parts = [], []
    for ds in files:
        need = want - len(rows)
        head = list(itertools.islice(ds, need))
        rows += head
        if not need or len(head) == need:  # else the whole file is held out
            parts.append((ds, len(head), None))
    if held_out is None:
        held_out = datasets.Dataset.from_list(rows)
    if cfg.max_train_examples:  # each file's range ends where the cap falls (rows counted once, here)
        left, capped = cfg.max_train_examples, []
        for ds, start, _ in parts:
            n = sum(1 for _ in itertools.islice(ds, start, start + left)) if left else 0
            capped.append((ds, start, start + n))
            left -= n
        parts = capped
    parts = [p for p in parts if p[2] is None or p[2] > p[1]]
    if not parts:
        raise DataError(f"data.path {cfg.path} has no rows past the {len(rows)} held-out ones")
    return Stream(parts), held_out
