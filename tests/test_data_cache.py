"""Data prepared once: the prepared splits are built once per fingerprint (data, tokenizer, max_length,
...) and read back by later calls and by concurrent processes, which wait on the file system; a streamed
resume passes over consumed rows without encoding them. Counted, not timed."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from lor2c_ds.config import load_config
from lor2c_ds.data import StreamShard, cache, prepare_data
from lor2c_ds.train import load_tokenizer
from test_distributed import MINILM, needs_assets

pytestmark = needs_assets


def write_rows(path, n=40):
    path.write_text("".join(json.dumps({"text": f"row {i} " + "word " * (i % 7), "label": i % 2}) + "\n"
                            for i in range(n)))
    return path


def cfg_for(data, *overrides):
    return load_config(None, [f"model={MINILM}", "task=classification", f"data.path={data}", *overrides])


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOR2C_DS_DATA_CACHE", str(tmp_path / "prepared"))
    return tmp_path / "prepared"


def test_prepared_once_per_fingerprint_and_read_back(tmp_path, fresh_cache):
    data = write_rows(tmp_path / "rows.jsonl")
    tok = load_tokenizer(str(MINILM))
    before = cache.builds
    first = prepare_data(cfg_for(data), tok)
    again = prepare_data(cfg_for(data), tok)
    assert cache.builds == before + 1  # the second call read the prepared folder
    assert first.train["input_ids"] == again.train["input_ids"] and first.label_names == again.label_names
    assert first.report == again.report and len(again.eval) > 0
    folders = [p for p in fresh_cache.iterdir() if p.is_dir()]
    assert [p.name for p in folders] == [cache.fingerprint(cfg_for(data), tok)]
    # what the rows depend on changes the fingerprint: max_length, the data file, the tokenizer
    short = cfg_for(data, "data.max_length=8")
    assert cache.fingerprint(short, tok) != folders[0].name
    assert max(map(len, prepare_data(short, tok).train["input_ids"])) <= 8
    assert cache.builds == before + 2
    write_rows(data, n=41)
    assert cache.fingerprint(cfg_for(data), tok) != folders[0].name
    other = load_tokenizer(str(MINILM))
    other.add_tokens(["zzzyyx"])
    assert cache.fingerprint(cfg_for(data), other) != cache.fingerprint(cfg_for(data), tok)


def _prepare_in_child(cache_dir, data, queue):
    os.environ["LOR2C_DS_DATA_CACHE"] = cache_dir
    from lor2c_ds.data import cache as child_cache

    prepared = prepare_data(cfg_for(data), load_tokenizer(str(MINILM)))
    queue.put((child_cache.builds, len(prepared.train)))


def test_concurrent_processes_build_once(tmp_path, fresh_cache):
    """Three processes at once (as ranks would): one builds, the others wait and read it back."""
    data = write_rows(tmp_path / "rows.jsonl")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(str(fresh_cache), str(data), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(b for b, _ in results) == [0, 0, 1], results
    assert len({n for _, n in results}) == 1


def test_a_failed_build_fails_its_waiters_and_the_next_run_retries(tmp_path, fresh_cache):
    data = write_rows(tmp_path / "rows.jsonl")
    tok, cfg = load_tokenizer(str(MINILM)), cfg_for(data)

    def broken():
        raise ValueError("broken on purpose")

    with pytest.raises(ValueError, match="broken"):
        cache.prepared(cfg, tok, broken)
    folder = fresh_cache / cache.fingerprint(cfg, tok)
    assert (folder / "error.txt").is_file() and not (folder / "meta.json").exists()
    assert not folder.with_name(folder.name + ".lock").exists()
    assert len(prepare_data(cfg, tok).train) > 0  # a new run builds afresh


def test_streamed_resume_skips_rows_without_encoding_them(tmp_path):
    from lor2c_ds.data.sources import Stream

    rows = [{"text": f"t{i}"} for i in range(50)]
    encoded = []

    def encode(batch):
        encoded.append(batch["text"][0])
        return {"input_ids": [[len(batch["text"][0])]], "_problem": [""], "_truncated": [False]}

    shard = StreamShard(Stream([(rows, 0, None)], encode), rank=1, world=2, seed=0, buffer=1)
    shard.skip = 10  # this rank's first 10 rows were consumed before the stop
    it = iter(shard)
    got = [next(it) for _ in range(3)]
    assert len(encoded) == 3 and all(r["_valid"] == 1 for r in got)  # only the rows it yields are encoded
    assert encoded == [r["text"] for r in (rows[21], rows[23], rows[25])]  # rows 2k+1, after the 10 skipped
