"""Batches: padding, the per-rank order of training samples, and evaluation shards.

Training order: one permutation of the training rows per epoch, drawn from (seed, epoch), is cut into
global batches; rank r takes every world-th sample, so step k covers the same samples at any world
size and a resumed run continues the same order. The last global batch of an epoch is filled up with
filler rows (`valid` = 0: they pass through the model but carry no loss), so no sample is dropped
and none is repeated.

Streaming (`StreamShard`): every rank reads all the training files and orders their rows the same way,
so the split is exact by construction. Each epoch takes the files in an order drawn from (seed, epoch)
and passes their rows through a seeded buffer of `shuffle_buffer` rows; in that global order, rank r
takes rows r, r + world, r + 2 world, ... and tokenizes only those. Every rank yields ceil(rows / world)
rows an epoch: a rank the epoch ends on before its turn gets a filler row, so ranks stay in step and
each training row is trained on exactly once an epoch. Bad rows become filler rows and are counted.
"""
from __future__ import annotations

import itertools
import math
import random

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from .sources import DataError, Stream

FILLER = -1  # a sampler index that stands for a filler row


class Collator:
    """Pads a list of rows. Token-level labels are padded with -100; packed rows (with `position_ids`)
    have equal length and no attention mask."""

    def __init__(self, tokenizer, task: str):
        self.tokenizer, self.task = tokenizer, task

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        valid = torch.tensor([row.pop("_valid", 1) for row in rows], dtype=torch.float32)
        if "position_ids" in rows[0]:
            batch = {k: torch.tensor([row[k] for row in rows]) for k in ("input_ids", "position_ids", "labels")}
        else:
            labels = [row.pop("labels") for row in rows]
            batch = dict(self.tokenizer.pad([{k: v for k, v in row.items() if not k.startswith("_")} for row in rows],
                                            return_tensors="pt"))
            if self.task in ("chat", "causal_lm"):
                width = batch["input_ids"].shape[1]
                side = self.tokenizer.padding_side
                padded = [[-100] * (width - len(y)) + y if side == "left" else y + [-100] * (width - len(y))
                          for y in labels]
                batch["labels"] = torch.tensor(padded)
            else:
                dtype = torch.float32 if self.task == "regression" else torch.long
                batch["labels"] = torch.tensor(labels, dtype=dtype)
        batch["valid"] = valid
        return batch


class WithFiller(Dataset):
    """A dataset whose index FILLER returns row 0 marked `_valid` = 0."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return dict(self.ds[0], _valid=0) if i == FILLER else dict(self.ds[i], _valid=1)


class EpochSampler(Sampler):
    """Rank `rank`'s sample indices for one epoch, starting `skip` samples in (a resumed run)."""

    def __init__(self, length: int, global_batch: int, rank: int, world: int, seed: int):
        self.length, self.global_batch, self.rank, self.world, self.seed = length, global_batch, rank, world, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        return order + [FILLER] * (-len(order) % self.global_batch)

    def __iter__(self):
        return itertools.islice(iter(self.global_order()[self.rank::self.world]), self.skip, None)

    def __len__(self):
        return math.ceil(self.length / self.global_batch) * self.global_batch // self.world - self.skip


def train_loader(ds, collate, micro_batch: int, global_batch: int, rank: int, world: int, seed: int) -> DataLoader:
    sampler = EpochSampler(len(ds), global_batch, rank, world, seed)
    # Its own generator: iterating a DataLoader draws a seed, which must not move the global RNG
    # (dropout), or a resumed run would diverge from the one that did not stop.
    return DataLoader(WithFiller(ds), batch_size=micro_batch, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


class StreamShard(IterableDataset):
    """Rank `rank`'s rows of a streamed split, epoch after epoch, without end (see the module docstring).
    `skip`: this rank's rows to pass over untokenized (a resumed run); `skipped`: bad rows met."""

    def __init__(self, stream, rank: int, world: int, seed: int, buffer: int):
        # a `Stream`, or any iterable of rows already encoded (one part, read in order)
        self.stream = stream if isinstance(stream, Stream) else Stream([(stream, 0, None)])
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, max(buffer, 1)
        self.skip, self.skipped, self.filler = 0, 0, None

    def epoch_rows(self, epoch: int):
        """Epoch `epoch`'s raw rows in the order every rank sees: the files in a seeded order, then the buffer."""
        rng = random.Random(f"{self.seed}/{epoch}")
        files = list(range(len(self.stream.parts)))
        rng.shuffle(files)
        return _buffer_shuffle(self.stream.rows(files), self.buffer, rng)

    def own_rows(self):
        """This rank's raw rows, endless: one of each `world` consecutive rows; None where an epoch ends first."""
        for epoch in itertools.count():
            turns = 0
            for turn in _groups(self.epoch_rows(epoch), self.world):
                turns += 1
                yield turn[self.rank] if self.rank < len(turn) else None
            if not turns:
                raise DataError("the streamed training split has no rows")

    def filler_row(self) -> dict:
        """The first good row in file order, marked `_valid` = 0: a real input that carries no loss."""
        if self.filler is None:
            rows = (self.stream.encode_row(raw) for raw in self.stream.rows())
            self.filler = next((r for r in rows if not r.pop("_problem", "")), None)
            if self.filler is None:
                raise DataError("the streamed training split has no usable rows: every row is bad")
            self.filler.pop("_truncated", None)
        return dict(self.filler, _valid=0)

    def __iter__(self):
        for raw in itertools.islice(self.own_rows(), self.skip, None):
            row = None if raw is None else self.stream.encode_row(raw)
            if row is not None and row.pop("_problem", ""):
                self.skipped += 1
                row = None
            if row is None:
                yield self.filler_row()
                continue
            row.pop("_truncated", None)
            yield dict(row, _valid=1)


def _buffer_shuffle(rows, size: int, rng: random.Random):
    """`rows` reordered through a buffer of `size`: each new row replaces a random buffered row, which is yielded."""
    buffer = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = row
    rng.shuffle(buffer)
    yield from buffer


def _groups(rows, n: int):
    """Consecutive lists of `n` rows (the last may be shorter)."""
    rows = iter(rows)
    while group := list(itertools.islice(rows, n)):
        yield group


def stream_loader(shard: StreamShard, collate, micro_batch: int) -> DataLoader:
    return DataLoader(shard, batch_size=micro_batch, collate_fn=collate)


class _EvalShard(Dataset):
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
    inputs = {k: batch[k] for k in keys if k in batch}
    if "position_ids" in inputs:
        inputs["use_cache"] = False  # a cache turns off transformers' packed-sequence masking
    return inputs
