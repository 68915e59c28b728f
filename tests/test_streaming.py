"""Streamed training data (`data.streaming`), ranks simulated in one process: the held-out rows are never
trained on, each epoch trains every other row exactly once across the ranks for any number of files and
ranks, a bad row (also a rank's first) becomes a counted filler row, and a resumed shard continues the
same order."""
from __future__ import annotations

import itertools
import json
import math

import pytest

from lor2c_ds.config import load_config
from lor2c_ds.data import StreamShard, prepare_data
from lor2c_ds.train import load_tokenizer
from test_distributed import MINILM, needs_assets

pytestmark = needs_assets
HELD = 5  # data.max_eval_examples: the stream's first rows
BUFFER = 4
SIZES = {1: [18], 2: [4, 14], 3: [6, 7, 5]}  # rows a file; with 2 files the held-out rows span both


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(MINILM))


def write_files(tmp_path, sizes: list[int], bad=()) -> int:
    """part0.jsonl, part1.jsonl, ...: rows with ids 0, 1, ... in file order (text "item <id>"; ids in
    `bad` get an empty text). Returns the number of rows."""
    ids = iter(range(sum(sizes)))
    for k, n in enumerate(sizes):
        rows = [{"id": i, "text": "" if i in bad else f"item {i}", "label": ["neg", "pos"][i % 2]}
                for i in itertools.islice(ids, n)]
        (tmp_path / f"part{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return sum(sizes)


def streamed(tmp_path, tok, *overrides):
    cfg = load_config(None, [f"model={MINILM}", f"data.path={tmp_path / 'part*.jsonl'}", "data.streaming=true",
                             "max_steps=2", "data.on_bad_rows=skip", "data.labels=[neg, pos]",
                             f"data.max_eval_examples={HELD}", f"data.shuffle_buffer={BUFFER}", "seed=3", *overrides])
    return cfg, prepare_data(cfg, tok)


def shard(cfg, data, rank: int, world: int) -> StreamShard:
    return StreamShard(data.train, rank, world, cfg.seed, cfg.data.shuffle_buffer)  # as train.py builds it


def take(rows, n: int) -> list[dict]:
    return list(itertools.islice(iter(rows), n))


def ident(tok, row: dict) -> int:
    """The id a row was written with, read back from its tokens."""
    return int(tok.decode(row["input_ids"], skip_special_tokens=True).split()[1])


@pytest.mark.parametrize("files, world", [(2, 2), (3, 2), (1, 2), (1, 1)])
def test_each_epoch_trains_every_row_but_the_held_out_ones_once(tmp_path, tok, files, world):
    total = write_files(tmp_path, SIZES[files])
    cfg, data = streamed(tmp_path, tok)
    assert [ident(tok, r) for r in data.eval] == list(range(HELD))  # the stream's first rows
    per_rank = math.ceil((total - HELD) / world)  # an epoch: every rank yields as many rows
    epochs = [[], [], []]
    for rank in range(world):
        rows = take(shard(cfg, data, rank, world), 3 * per_rank)
        for e, epoch in enumerate(epochs):
            mine = rows[e * per_rank:(e + 1) * per_rank]
            epoch += [ident(tok, r) for r in mine if r["_valid"]]
            assert all(r["_valid"] == 1 for r in mine[:-1])  # only an epoch's last row may be a filler
    for epoch in epochs:
        assert sorted(epoch) == list(range(HELD, total))  # disjoint from the held-out rows, each row once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch


def test_the_order_is_seeded_and_a_resumed_shard_continues_it(tmp_path, tok):
    write_files(tmp_path, SIZES[3])
    cfg, data = streamed(tmp_path, tok)
    for rank in range(2):
        full = take(shard(cfg, data, rank, 2), 20)  # past the end of the first epoch (7 rows a rank)
        assert take(shard(cfg, data, rank, 2), 20) == full
        again = shard(cfg, data, rank, 2)
        again.skip = 9
        assert take(again, 11) == full[9:]
    other_cfg, other = streamed(tmp_path, tok, "seed=4")
    assert take(shard(other_cfg, other, 0, 2), 7) != take(shard(cfg, data, 0, 2), 7)


@pytest.mark.parametrize("rank", [1, 0])
def test_a_bad_first_row_is_skipped_counted_and_filled(tmp_path, tok, rank):
    write_files(tmp_path, SIZES[2])
    cfg, data = streamed(tmp_path, tok)
    clean = take(shard(cfg, data, rank, 2), 4)
    first = ident(tok, clean[0])
    write_files(tmp_path, SIZES[2], bad={first})  # the order does not depend on the text
    cfg, data = streamed(tmp_path, tok)
    mine = shard(cfg, data, rank, 2)
    rows = take(mine, 4)
    assert mine.skipped == 1
    assert [r["_valid"] for r in rows] == [0, 1, 1, 1] and rows[1:] == clean[1:]
    assert rows[0]["input_ids"] and rows[0]["labels"] in (0, 1)  # a real model input, weight 0
    batch = data.collator([dict(r) for r in rows])
    assert batch["valid"].tolist() == [0, 1, 1, 1]
    assert batch["input_ids"].shape[0] == 4 and batch["attention_mask"][0].sum() > 0
    other = shard(cfg, data, 1 - rank, 2)
    take(other, 4)
    assert other.skipped == 0


def test_max_train_examples_caps_the_streamed_rows(tmp_path, tok):
    write_files(tmp_path, SIZES[3])
    cfg, data = streamed(tmp_path, tok, "data.max_train_examples=6")
    ids = [ident(tok, r) for rank in range(2) for r in take(shard(cfg, data, rank, 2), 3) if r["_valid"]]
    assert sorted(ids) == list(range(HELD, HELD + 6))
