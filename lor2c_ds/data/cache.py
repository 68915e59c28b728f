"""The prepared (read, encoded, screened, packed) splits, built once per data fingerprint and reused.

The fingerprint hashes what the rows depend on: the data section of the recipe, the task and seed, the
tokenizer (its class, vocabulary and special tokens, through its serialised form) and every data file's
path, size and modification time, plus FORMAT (the encoding code's version). Its folder under
`<LOR2C_DS_HOME>/prepared/` (or `LOR2C_DS_DATA_CACHE`) holds the splits as `datasets` Arrow files
(`save_to_disk`, read back memory-mapped) and `meta.json` (label names, the data report).

Whoever comes first builds it: a lock file taken with O_EXCL, so one process per file system builds
(pre-flight in the launcher, or the first rank), and the others wait by polling the file system, not in
a collective: the wait never counts against the rendezvous or collective timeout. A builder that fails
leaves `error.txt`, which the waiters raise; a lock whose process is gone (same host) is taken over.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "lor2c-prepared-v1"
SPLITS = ("train", "eval", "test")
builds = 0  # how many times this process built a prepared folder (tests count it)


def cache_root() -> Path:
    env = os.environ.get("LOR2C_DS_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    from ..assets import default_home

    return default_home() / "prepared"


def _files(path: str | None) -> list[list]:
    if not path:
        return []
    from .sources import _expand

    out = []
    for name in _expand(path):
        p = Path(name)
        members = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in members:
            st = f.stat() if f.exists() else None
            out.append([str(f.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
    return out


def _tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None), state.pop("padding", None)  # set by each call, not part of the vocabulary
        h.update(json.dumps(state, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token,
                         getattr(tokenizer, "chat_template", None), tokenizer.padding_side,
                         tokenizer.truncation_side], default=str).encode())
    return h.hexdigest()


def fingerprint(cfg, tokenizer) -> str:
    data = cfg.data
    files = {"path": _files(data.path), "eval_path": _files(data.eval_path), "test_path": _files(data.test_path),
             "chat_template": _files(data.chat_template)}
    key = {"format": FORMAT, "data": asdict(data), "task": cfg.task, "seed": cfg.seed, "files": files,
           "tokenizer": _tokenizer_digest(tokenizer)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _lock_is_stale(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()[:2]
    except (OSError, ValueError):
        return False  # being written
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def prepared(cfg, tokenizer, build, poll_s: float = 0.5):
    """(splits dict, meta dict) from the prepared folder for this fingerprint, built by `build()` (which
    returns them) in the first process that gets here. Returns (splits, meta, built: bool)."""
    import datasets

    global builds
    folder = cache_root() / fingerprint(cfg, tokenizer)
    done, lock, error = folder / "meta.json", folder.with_name(folder.name + ".lock"), folder / "error.txt"
    folder.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        if done.is_file():
            meta = json.loads(done.read_text())
            splits = {name: datasets.load_from_disk(str(folder / name)) if name in meta["splits"] else None
                      for name in SPLITS}
            return splits, meta, False
        if waited and error.is_file():  # the build this process waited for failed
            from .sources import DataError

            raise DataError(error.read_text().strip())
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_is_stale(lock):
                lock.unlink(missing_ok=True)
                continue
            if not waited:
                log.info("waiting for another process to prepare the data in %s", folder)
                waited = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        try:
            if done.is_file():  # built between our check and the lock
                continue
            shutil.rmtree(folder, ignore_errors=True)
            try:
                splits, meta = build()
            except Exception as e:
                folder.mkdir(parents=True, exist_ok=True)
                error.write_text(f"{e}\n")  # the waiters fail with it; the next run starts afresh
                raise
            builds += 1
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            for name, ds in splits.items():
                if ds is not None:
                    ds.save_to_disk(str(tmp / name))
            meta = dict(meta, splits=[n for n, ds in splits.items() if ds is not None], fingerprint=folder.name)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(tmp, folder)
            loaded = {name: datasets.load_from_disk(str(folder / name)) if splits.get(name) is not None else None
                      for name in SPLITS}
            return loaded, meta, True
        finally:
            lock.unlink(missing_ok=True)
