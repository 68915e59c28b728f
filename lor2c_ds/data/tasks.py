"""Rows -> token ids and targets, one encoder per task type.

classification  `text` (+ `text_pair`) -> a label id from the label map (saved with every checkpoint)
regression      `text` (+ `text_pair`) -> a float target (e.g. STS-B similarity)
chat            `messages` (or `prompt` + `response`) rendered by the chat template; the loss falls on
                the assistant turns only (their content and end-of-turn tokens), or on every token
causal_lm       plain `text`; with packing, whole documents are laid end to end in rows of
                `max_length` tokens whose `position_ids` restart at each document. Rows are fed
                without an attention mask, so transformers confines attention to each document, and
                the first token of a document is never a target of the previous one.

Every encoder marks bad rows (empty text, no label, a chat with no response) in a `_problem`
column and truncated rows in `_truncated`; `prepare_data` fails on them or skips and counts them.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..config import DataConfig
from .sources import DataError

CHAT_ROLES = ("system", "user", "assistant")


def _text_problem(value, field: str) -> str:
    if not isinstance(value, str):
        return f"{field} is missing" if value is None else f"{field} is not text"
    return "" if value.strip() else f"{field} is empty"


def label_map(train, cfg: DataConfig, path: str) -> dict[str, int]:
    """Label value (as text) -> id: data.labels in order, else the training labels sorted."""
    if cfg.labels is not None:
        values = list(cfg.labels)
    else:
        if train.column_names is None:
            raise DataError("a streamed classification set needs data.labels (the label values in id order)")
        typed = getattr(train.features[cfg.label_field], "dtype", None) is not None  # one Arrow type
        found = train.unique(cfg.label_field) if typed else list(dict.fromkeys(train[cfg.label_field]))
        found = [v for v in found if v is not None]
        texts, others = [v for v in found if isinstance(v, str)], [v for v in found if not isinstance(v, str)]
        if texts and others:
            raise DataError(f"data.label_field {cfg.label_field!r} of {path} mixes numbers and strings (e.g. "
                            f"{others[0]!r} and {texts[0]!r}); make them one type, or list the values in data.labels")
        values = sorted(found, key=lambda v: (str(type(v)), v))
    ids = {str(v): i for i, v in enumerate(values)}
    if len(ids) != len(values):
        raise DataError(f"data.labels has repeated values: {values}")
    return ids


class Encoder:
    """A picklable batched `datasets.map` function for one task (fingerprinted for the cache)."""

    def __init__(self, tokenizer, cfg: DataConfig, task: str, label_ids: dict[str, int] | None = None):
        self.tokenizer, self.cfg, self.task, self.label_ids = tokenizer, cfg, task, label_ids
        if task == "chat" and cfg.chat_template:
            path = Path(cfg.chat_template)
            if not path.is_file():
                raise DataError(f"data.chat_template {path} does not exist")
            tokenizer.chat_template = path.read_text()
        if task == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template; set data.chat_template to a Jinja template file")

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        encode = {"classification": self._labelled, "regression": self._labelled,
                  "chat": self._chat, "causal_lm": self._text}[self.task]
        out = {"input_ids": [], "labels": [], "_problem": [], "_truncated": []}
        segments = self.task in ("classification", "regression") and \
            "token_type_ids" in self.tokenizer.model_input_names
        if segments:
            out["token_type_ids"] = []
        for row in rows:
            ids, labels, problem, truncated = encode(row)
            if segments:  # a text pair's second segment (BERT)
                ids, types = ids if ids else ([], [])
                out["token_type_ids"].append(types)
            for key, value in zip(out, (ids, labels, problem, truncated)):
                out[key].append(value)
        return out

    def _truncate(self, ids: list[int]) -> tuple[list[int], bool]:
        limit = self.cfg.max_length
        return (ids[:limit], True) if len(ids) > limit else (ids, False)

    def _labelled(self, row: dict):
        cfg = self.cfg
        problem = _text_problem(row.get(cfg.text_field), cfg.text_field)
        pair = row.get(cfg.text_pair_field) if cfg.text_pair_field else None
        if cfg.text_pair_field and not problem:
            problem = _text_problem(pair, cfg.text_pair_field)
        value = row.get(cfg.label_field)
        if value is None and not problem:
            problem = f"{cfg.label_field} is missing"
        label = -100
        if not problem and self.task == "classification":
            if str(value) not in self.label_ids:
                # not skippable: the data and the label map disagree
                raise DataError(f"label {value!r} is absent from the label map {list(self.label_ids)}")
            label = self.label_ids[str(value)]
        elif not problem:
            try:
                label = float(value)
                problem = "" if math.isfinite(label) else f"{cfg.label_field} is not finite"
            except (TypeError, ValueError):
                problem = f"{cfg.label_field} {value!r} is not a number"
        if problem:
            return [], -100.0 if self.task == "regression" else -100, problem, False
        full = self.tokenizer(row[cfg.text_field], pair, truncation=False)
        truncated = len(full["input_ids"]) > cfg.max_length
        if truncated:
            full = self.tokenizer(row[cfg.text_field], pair, truncation=True, max_length=cfg.max_length)
        ids = (full["input_ids"], full.get("token_type_ids") or [0] * len(full["input_ids"]))
        return ids if "token_type_ids" in self.tokenizer.model_input_names else ids[0], label, "", truncated

    def _text(self, row: dict):
        text = row.get(self.cfg.text_field)
        problem = _text_problem(text, self.cfg.text_field)
        if problem:
            return [], [], problem, False
        ids = self.tokenizer(text)["input_ids"]
        if self.cfg.packing and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]  # the model learns where a document ends
        ids, truncated = self._truncate(ids)
        return ids, list(ids), "", truncated

    def _messages(self, row: dict) -> tuple[list[dict] | None, str]:
        cfg = self.cfg
        if cfg.messages_field in row and row[cfg.messages_field] is not None:
            messages = row[cfg.messages_field]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return None, f"{cfg.messages_field} is not a list of messages"
        else:
            prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
            problem = _text_problem(prompt, cfg.prompt_field)
            if problem:
                return None, problem
            messages = [{"role": "user", "content": prompt}]
            if isinstance(response, str) and response.strip():
                messages.append({"role": "assistant", "content": response})
        for m in messages:
            if m.get("role") not in CHAT_ROLES:
                return None, f"a message has role {m.get('role')!r}, not one of {list(CHAT_ROLES)}"
            if not isinstance(m.get("content"), str):
                return None, "a message has no text content"
        answered = [m for m in messages if m["role"] == "assistant" and m["content"].strip()]
        if not answered or len(answered) < sum(m["role"] == "assistant" for m in messages):
            return None, "a chat turn has no response"
        return messages, ""

    def _chat(self, row: dict):
        messages, problem = self._messages(row)
        if problem:
            return [], [], problem, False
        render = lambda msgs, prompt: self.tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=False, add_generation_prompt=prompt)
        text = render(messages, False)
        spans = []  # character spans of the assistant turns in `text`
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before, through = render(messages[:i], True), render(messages[: i + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise DataError("the chat template does not render a conversation as a prefix of its "
                                "continuation; the response tokens cannot be located")
            spans.append((len(before), len(through)))
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self.cfg.loss_on == "all":
            labels = list(ids)
        else:
            labels = [t if any(a <= s < b for a, b in spans) else -100
                      for t, (s, _) in zip(ids, enc["offset_mapping"])]
        ids, truncated = self._truncate(ids)
        labels = labels[: len(ids)]
        if all(y == -100 for y in labels[1:]):  # position 0 is never a target
            return [], [], "truncation left no response token", truncated
        return ids, labels, "", truncated


def pack(batch: dict, max_length: int, pad_id: int) -> dict:
    """Lay documents end to end into rows of exactly `max_length` (a batched `datasets.map`).

    A document never spans two rows (each is at most max_length after truncation); the unused tail
    of a row is padding that forms its own position block and is never a target."""
    row, positions, labels = [], [], []
    out = {"input_ids": [], "position_ids": [], "labels": []}

    def close():
        tail = max_length - len(row)
        out["input_ids"].append(row + [pad_id] * tail)
        out["position_ids"].append(positions + list(range(tail)))
        out["labels"].append(labels + [-100] * tail)

    for ids in batch["input_ids"]:
        if len(row) + len(ids) > max_length:
            close()
            row, positions, labels = [], [], []
        row += ids
        positions += range(len(ids))
        labels += [-100] + ids[1:]  # a document's first token is not predicted from the one before
    if row:
        close()
    return out
