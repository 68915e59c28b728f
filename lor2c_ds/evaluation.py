"""Evaluation: held-out metrics, multiple-choice log-likelihood scoring, greedy generation with exact match.

Everything here runs the same way on a DeepSpeed engine (call it on every rank: under ZeRO-3 each
forward gathers the partitioned weights collectively, so every rank must run the same number of
forward passes and `generate` calls) and on a plain single-process model. Per-rank results are
gathered with `engine.all_gather_object`, so every sample counts once whatever the number of ranks;
filler rows (`valid` = 0, which only keep the ranks in step) count for nothing.

Metrics come from maintained libraries: scikit-learn (accuracy, F1, Matthews correlation) and
scipy.stats (Pearson, Spearman).
"""
from __future__ import annotations

import copy
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import engine as ds

TOKEN_TASKS = ("causal_lm", "chat")  # token-level targets: labels (B, T), the loss on next-token logits
_LOWER_IS_BETTER = ("loss", "perplexity", "mse")


class EvalDataError(ValueError):
    """A multiple-choice or generation file is missing or malformed; the message names file and line."""


# ----------------------------------------------------------------------------------------------------
# Loss: shared with the training loop
# ----------------------------------------------------------------------------------------------------

def scored_labels(batch: dict, task: str) -> torch.Tensor:
    """The targets aligned with the logits, -100 where nothing is scored (padding, prompt tokens, filler
    rows; for regression the filler rows' float targets, so a true target of -100.0 would not count)."""
    labels = batch["labels"][:, 1:] if task in TOKEN_TASKS else batch["labels"]
    labels = labels.clone()
    labels[batch["valid"] == 0] = -100
    return labels


LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the token loss (64 MB in fp32)


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, task: str,
                chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> torch.Tensor:
    """The loss summed over the scored targets: cross-entropy (classes, next tokens) or squared error.

    Token tasks take the vocabulary in chunks of about `chunk_elements` logits (whole positions): each
    chunk is upcast to fp32 and reduced on its own and, with autograd on, recomputed in backward
    (activation checkpointing), so no fp32 copy of the whole logits is ever held."""
    if task == "regression":
        keep = labels != -100
        return F.mse_loss(logits.squeeze(-1).float()[keep], labels[keep].float(), reduction="sum")
    if task not in TOKEN_TASKS:
        return _cross_entropy_sum(logits, labels)
    logits = logits[:, :-1]  # a view; each chunk below slices it
    batch, positions, vocab = logits.shape
    step = max(1, chunk_elements // max(1, batch * vocab))
    recompute = torch.is_grad_enabled() and logits.requires_grad
    total = logits[:, :0].sum(dtype=torch.float32)  # 0, on the graph: a batch of one-token rows has no chunk
    for start in range(0, positions, step):
        part, target = logits[:, start:start + step], labels[:, start:start + step]
        if recompute:
            total = total + torch.utils.checkpoint.checkpoint(_cross_entropy_sum, part, target, use_reentrant=False)
        else:
            total = total + _cross_entropy_sum(part, target)
    return total


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100, reduction="sum")


# ----------------------------------------------------------------------------------------------------
# Plumbing
# ----------------------------------------------------------------------------------------------------

def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, gather: bool) -> list:
    return ds.all_gather_object(obj) if gather else [obj]


def _device(model) -> torch.device:
    device = getattr(model, "device", None)  # a DeepSpeed engine, a transformers model
    return device if isinstance(device, torch.device) else next(model.parameters()).device


class _EvalMode:
    """Eval mode (no dropout) inside, the previous mode restored after, gradients off."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training
        self.no_grad = torch.no_grad()

    def __enter__(self):
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def shard_rows(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s row indices r, r + world, ... padded with -1 (a filler row) to ceil(n / world),
    so every rank runs the same number of forward passes."""
    rows = list(range(rank, n, world))
    return rows + [-1] * (math.ceil(n / world) - len(rows))


# ----------------------------------------------------------------------------------------------------
# Held-out split
# ----------------------------------------------------------------------------------------------------

def _shard_results(model, loader, task: str) -> dict:
    """This rank's summed loss, target count and (classification, regression) predictions."""
    from .data import model_inputs

    device = _device(model)
    loss, count, preds, targets, num_classes = 0.0, 0, [], [], None
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**model_inputs(batch)).logits
        labels = scored_labels(batch, task)
        keep = labels != -100
        loss += summed_loss(logits, labels, task).item()
        count += int(keep.sum())
        if task == "classification":
            num_classes = logits.shape[-1]
            preds += logits.argmax(-1)[keep].tolist()
            targets += labels[keep].tolist()
        elif task == "regression":
            preds += logits.squeeze(-1).float()[keep].tolist()
            targets += labels[keep].float().tolist()
    return {"loss": loss, "count": count, "preds": preds, "labels": targets, "num_classes": num_classes}


def classification_metrics(preds, labels, num_classes: int = 2) -> dict:
    """accuracy; f1: of class 1 for two classes, macro otherwise; f1_macro; mcc (Matthews)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if len(labels) == 0:
        return {"accuracy": math.nan, "f1": math.nan, "f1_macro": math.nan, "mcc": math.nan}
    f1_macro = f1_score(labels, preds, average="macro", zero_division=0)
    f1 = f1_score(labels, preds, average="binary", pos_label=1, zero_division=0) if num_classes == 2 else f1_macro
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one class in both: MCC is 0, as documented
        mcc = matthews_corrcoef(labels, preds)
    return {"accuracy": float(accuracy_score(labels, preds)), "f1": float(f1), "f1_macro": float(f1_macro),
            "mcc": float(mcc)}


def regression_metrics(preds, labels) -> dict:
    """pearson, spearman (NaN when fewer than two points or a constant side), mse."""
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    out = {"pearson": math.nan, "spearman": math.nan, "mse": float(np.mean((preds - labels) ** 2)) if len(labels) else math.nan}
    if len(labels) >= 2 and np.ptp(preds) > 0 and np.ptp(labels) > 0:
        out["pearson"] = float(pearsonr(preds, labels)[0])
        out["spearman"] = float(spearmanr(preds, labels)[0])
    return out


def summarize(parts: list[dict], task: str) -> dict:
    """The metrics of the gathered per-rank results (`_shard_results`)."""
    count = sum(p["count"] for p in parts)
    loss = sum(p["loss"] for p in parts) / count if count else math.nan
    if task in TOKEN_TASKS:
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    preds = [x for p in parts for x in p["preds"]]
    labels = [y for p in parts for y in p["labels"]]
    if task == "regression":
        return {"loss": loss, **regression_metrics(preds, labels), "examples": count}
    num_classes = next((p["num_classes"] for p in parts if p["num_classes"]), 2)
    return {"loss": loss, **classification_metrics(preds, labels, num_classes), "examples": count}


def metric_names(task: str, multiple_choice: bool = False, generation: bool = False) -> set[str]:
    """The metrics an evaluation of `task` reports (with the optional scored sets): what
    eval.best_metric may name."""
    names = {"classification": {"loss", "accuracy", "f1", "f1_macro", "mcc"},
             "regression": {"loss", "pearson", "spearman", "mse"}}.get(task, {"loss", "perplexity"})
    return names | ({"mc_accuracy", "mc_accuracy_norm"} if multiple_choice else set()) | \
        ({"exact_match"} if generation else set())


def evaluate(model, loader, task: str, *, gather: bool = True) -> dict:
    """Held-out metrics over every rank's shard of `loader` (built by `data.eval_loader`; every rank
    runs the same number of batches). A DeepSpeed engine or a plain model; with `gather=False` only
    this process's batches count (a plain model evaluated on one rank of a larger job).

    classification: loss, accuracy, f1, f1_macro, mcc, examples; regression: loss (MSE), pearson,
    spearman, mse, examples; causal_lm and chat: loss, perplexity, tokens."""
    with _EvalMode(model):
        part = _shard_results(model, loader, task)
    return summarize(_gather(part, gather), task)


def metric_direction(name: str, mode: str = "auto") -> str:
    """"min" or "max": which way `name` improves (loss, perplexity, mse and *_loss: min). A `mode` of
    max or min (eval.best_mode) wins over the name."""
    if mode in ("min", "max"):
        return mode
    base = name.rsplit("/", 1)[-1]
    return "min" if base in _LOWER_IS_BETTER or base.endswith(tuple(f"_{m}" for m in _LOWER_IS_BETTER)) else "max"


# ----------------------------------------------------------------------------------------------------
# Row files
# ----------------------------------------------------------------------------------------------------

def load_jsonl_rows(path, required_fields=()) -> list[dict]:
    """The JSON objects of a jsonl file (blank lines skipped), each holding `required_fields`."""
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"{path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalDataError(f"{path}, line {line_no}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise EvalDataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
                missing = [k for k in required_fields if k not in row]
                if missing:
                    raise EvalDataError(f"{path}, line {line_no} (row {len(rows) + 1}): no {missing[0]!r} field "
                                        f"(fields: {sorted(row)}; required: {list(required_fields)})")
                rows.append(dict(row, _line=line_no))
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path} is not UTF-8 text: {e}") from None
    if not rows:
        raise EvalDataError(f"{path} holds no rows")
    return rows


def _row_error(path, row: dict, what: str) -> EvalDataError:
    return EvalDataError(f"{path}, line {row['_line']}: {what}")


def _well_formed_messages(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)


def load_multiple_choice(path, max_examples: int | None = None) -> list[dict]:
    """Rows {"context": str, "choices": [str, ...], "label": int}, or chat rows with "messages" (a list
    of {"role", "content"}) in place of "context": the choices are then replies to that conversation."""
    rows = load_jsonl_rows(path, ("choices", "label"))[:max_examples]
    for row in rows:
        if "context" in row and "messages" in row:
            raise _row_error(path, row, "has both 'context' and 'messages'; give one")
        if "messages" in row:
            if not _well_formed_messages(row["messages"]):
                raise _row_error(path, row, "'messages' must be a non-empty list of {role, content} texts")
        elif "context" not in row:
            raise _row_error(path, row, "needs a 'context' text or 'messages' (a chat conversation)")
        elif not isinstance(row["context"], str):
            raise _row_error(path, row, f"'context' must be text, got {type(row['context']).__name__}")
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise _row_error(path, row, "'choices' must be a list of at least two non-empty texts")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise _row_error(path, row, f"'label' must be an index into the {len(choices)} choices, got {label!r}")
    return rows


def load_generation(path, max_examples: int | None = None) -> list[dict]:
    """Rows {"prompt": str, "answer": str (or a number)}, checked."""
    rows = load_jsonl_rows(path, ("prompt", "answer"))[:max_examples]
    for row in rows:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise _row_error(path, row, "'prompt' must be a non-empty text")
        if isinstance(row["answer"], bool) or not isinstance(row["answer"], (str, int, float)):
            raise _row_error(path, row, f"'answer' must be a text or a number, got {type(row['answer']).__name__}")
        row["answer"] = str(row["answer"])
    return rows


# ----------------------------------------------------------------------------------------------------
# Multiple choice: the log-likelihood of each option, as lm-evaluation-harness scores it
# ----------------------------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_token(tokenizer) -> int:
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token to stand for an empty context")
    return token


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's `_encode_pair`: trailing spaces of the context
    move to the continuation, `context + continuation` is tokenized whole and the continuation is its
    tail past the context's tokens; no special tokens; an empty context is the bos (else eos) token."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [_prefix_token(tokenizer)], _encode(tokenizer, continuation)
    whole, ctx = _encode(tokenizer, context + continuation), _encode(tokenizer, context)
    return ctx, whole[len(ctx):]


def check_chat_rows(tokenizer, rows: list[dict]) -> None:
    """Multiple-choice rows in chat form can only be scored with a chat template: say so before any work."""
    if any("messages" in row for row in rows) and not getattr(tokenizer, "chat_template", None):
        raise EvalDataError("multiple-choice rows in chat form need a tokenizer with a chat template "
                            "(set data.chat_template to a Jinja template file)")


def _rendered(tokenizer, messages: list[dict]) -> str:
    """A conversation as the chat template writes it, up to the start of the assistant's reply."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _context_text(tokenizer, row: dict) -> str:
    """A row's context: its text, or its conversation rendered by the chat template up to the reply."""
    return _rendered(tokenizer, row["messages"]) if "messages" in row else row["context"]


def _loglikelihoods(model, device, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """sum log p(continuation | context) for each (context ids, continuation ids), in one padded batch."""
    seqs = [(ctx + cont)[:-1] for ctx, cont in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (ctx, cont) in enumerate(pairs):
        start = len(ctx) - 1  # the logits at position t predict token t + 1
        rows = logits[i, start:start + len(cont)].float().log_softmax(-1)
        out.append(rows.gather(-1, torch.tensor(cont, device=rows.device)[:, None]).sum().item())
    return out


def choice_loglikelihoods(model, tokenizer, rows: list[dict], batch_size: int = 8, *,
                          gather: bool = True) -> list[list[float]]:
    """sum log p(choice tokens | context) for every choice of every row, in row order, on every rank.
    Rank r scores rows r::world, `batch_size` rows (all their choices) per forward pass, longest rows
    first (less padding), its shard padded with filler rows so every rank runs the same forward passes."""
    rank, world = _rank_world() if gather else (0, 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _device(model)
    shard = shard_rows(len(rows), rank, world)
    check_chat_rows(tokenizer, rows)
    encoded = {}
    for i in set(shard):
        row = rows[max(i, 0)]
        context = _context_text(tokenizer, row)
        encoded[i] = [encode_pair(tokenizer, context, choice) for choice in row["choices"]]
    shard.sort(key=lambda i: -max(len(c) + len(t) for c, t in encoded[i]))
    scored = []
    with _EvalMode(model):
        for start in range(0, len(shard), batch_size):
            chunk = shard[start:start + batch_size]
            pairs = [pair for i in chunk for pair in encoded[i]]
            owners = [i for i in chunk for _ in encoded[i]]
            sums = _loglikelihoods(model, device, pairs, pad_id)
            scored += [(i, [s for s, o in zip(sums, owners) if o == i]) for i in chunk if i >= 0]
    return [lls for _, lls in sorted(x for part in _gather(scored, gather) for x in part)]


def score_multiple_choice(model, tokenizer, rows: list[dict], batch_size: int = 8, *, gather: bool = True) -> dict:
    """mc_accuracy: argmax of sum log p(choice | context); mc_accuracy_norm: argmax of that sum divided
    by the choice's length in characters (lm-eval's acc_norm). A choice is appended to the context as
    it is: put the separating space in the choice (" Paris") or at the end of the context."""
    scores = choice_loglikelihoods(model, tokenizer, rows, batch_size, gather=gather)
    hits = hits_norm = 0
    for lls, row in zip(scores, rows):
        hits += int(np.argmax(lls)) == row["label"]
        hits_norm += int(np.argmax(np.array(lls) / [len(c) for c in row["choices"]])) == row["label"]
    n = len(scores)
    return {"mc_accuracy": hits / n if n else math.nan, "mc_accuracy_norm": hits_norm / n if n else math.nan,
            "mc_examples": n}


# ----------------------------------------------------------------------------------------------------
# Generation: greedy decoding, answer extraction, exact match
# ----------------------------------------------------------------------------------------------------

_NUMBER = r"[-+]?\$?\s?[-+]?\d(?:[\d,]*\d)?(?:\.\d+)?"


def normalize_number(text: str) -> str:
    """"$1,234.50" -> "1234.5", "72.0" -> "72", "-$3" -> "-3"."""
    s = re.sub(r"[\s$,+]", "", text)
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def _normalize_text(text: str) -> str:
    first = re.split(r"\.(?:\s|$)", text.strip())[0]  # up to the end of the first sentence
    return " ".join(first.split()).lower()


def extract_answer(text: str) -> str:
    """The final answer in a model's text (or a reference): "#### N", else "The answer is N" (a number,
    else the words up to the line's end), else the last number in the text, else the whole text.
    Numbers lose $ signs, thousands commas and trailing zeros of a fraction; texts lose the trailing
    period, repeated spaces and case."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer is[:\s]*(" + _NUMBER + ")"):
        m = re.search(pattern, text, flags=re.IGNORECASE)
        if m:
            return normalize_number(m.group(1))
    m = re.search(r"answer is[:\s]*([^\n]+)", text, flags=re.IGNORECASE)
    if m:
        return _normalize_text(m.group(1))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else _normalize_text(text)


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The prompt as a user turn of the tokenizer's chat template (with the generation prompt), else as is."""
    if getattr(tokenizer, "chat_template", None):
        return _encode(tokenizer, _rendered(tokenizer, [{"role": "user", "content": prompt}]))
    return tokenizer(prompt)["input_ids"]


def _greedy_config(module, max_new_tokens: int, pad_id: int):
    """The model's generation config (its eos tokens) turned greedy, sampling settings cleared."""
    from transformers import GenerationConfig

    cfg = copy.deepcopy(getattr(module, "generation_config", None) or GenerationConfig())
    cfg.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
               max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    return cfg


def generate_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, synced_gpus: bool) -> list[str]:
    """The decoded continuation of each prompt (token ids, left-padded together into one batch)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    device = _device(model)
    out = module.generate(input_ids=ids.to(device), attention_mask=mask.to(device), synced_gpus=synced_gpus,
                          generation_config=_greedy_config(module, max_new_tokens, pad_id))
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def evaluate_generation(model, tokenizer, rows: list[dict], max_new_tokens: int = 64, batch_size: int = 8, *,
                        examples: int = 3, gather: bool = True) -> dict:
    """exact_match of `extract_answer` on the greedy continuation against the row's answer, with the
    first `examples` predictions. Under ZeRO-3 (a process group of >1 ranks) every rank calls
    `generate` the same number of times (its shard padded with filler rows) with synced_gpus=True."""
    rank, world = _rank_world() if gather else (0, 1)
    synced = world > 1
    shard = shard_rows(len(rows), rank, world)
    results = []
    with _EvalMode(model):
        for start in range(0, len(shard), batch_size):
            chunk = shard[start:start + batch_size]
            texts = generate_greedy(model, tokenizer, [encode_prompt(tokenizer, rows[max(i, 0)]["prompt"])
                                                       for i in chunk], max_new_tokens, synced)
            for i, text in zip(chunk, texts):
                if i >= 0:
                    pred, gold = extract_answer(text), extract_answer(rows[i]["answer"])
                    results.append((i, text, pred, gold, pred == gold))
    merged = sorted(x for part in _gather(results, gather) for x in part)
    n = len(merged)
    return {"exact_match": sum(r[4] for r in merged) / n if n else math.nan, "generation_examples": n,
            "predictions": [{"prompt": rows[i]["prompt"], "answer": rows[i]["answer"], "generated": text,
                             "extracted": pred, "correct": ok} for i, text, pred, _, ok in merged[:examples]]}


# ----------------------------------------------------------------------------------------------------
# The extra scored sets of a recipe (eval section)
# ----------------------------------------------------------------------------------------------------

def load_eval_sets(multiple_choice_path=None, generation_path=None, max_examples: int | None = None) -> dict:
    """The multiple-choice and generation rows (the eval section's files), read and checked once,
    each capped at `max_examples`."""
    return {"multiple_choice": load_multiple_choice(multiple_choice_path, max_examples) if multiple_choice_path else None,
            "generation": load_generation(generation_path, max_examples) if generation_path else None}


def evaluate_sets(model, tokenizer, sets: dict, *, batch_size: int = 8, max_new_tokens: int = 64,
                  gather: bool = True) -> dict:
    """Multiple-choice and generation metrics of `load_eval_sets`'s rows (call on every rank)."""
    out = {}
    if sets.get("multiple_choice"):
        out.update(score_multiple_choice(model, tokenizer, sets["multiple_choice"], batch_size, gather=gather))
    if sets.get("generation"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # generation-config chatter, once per call
            out.update(evaluate_generation(model, tokenizer, sets["generation"], max_new_tokens, batch_size,
                                           gather=gather))
    return out
