"""lor2c_ds.evaluation and lor2c-eval: metrics against independent computations, lm-eval style
multiple-choice scoring, answer extraction, greedy generation against a manual loop, 2 ranks under
ZeRO-3 against 1, the CLI end to end on a tiny export, and its bad-input messages.

Everything runs on tiny random models with a character-level tokenizer built here: no assets needed.
Run as a script (`tests/test_evaluation.py probe ...`) under torchrun, it is the 2-rank probe."""
from __future__ import annotations

import json
import math
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bert, make_llama

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 6


# ------------------------------------------------------------------------------------------------
# Tiny assets: a character tokenizer (ids match LlamaConfig's bos 1 / eos 2), saved models, rows
# ------------------------------------------------------------------------------------------------

def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *string.ascii_letters, *string.digits, *" .,$#?!:-+'\n"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_model(path: Path, family: str, num_labels: int = 2) -> Path:
    if family == "llama":
        model = make_llama()
    else:
        model = make_bert()
        if num_labels != model.config.num_labels:  # a fresh head of the right size, seeded
            torch.manual_seed(1)
            model.classifier = torch.nn.Linear(model.config.hidden_size, num_labels)
            model.config.num_labels = num_labels
            model.config.problem_type = "regression" if num_labels == 1 else None
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


MC_ROWS = [
    {"context": "Q: 2+2? A:", "choices": [" 4", " 5", " four"], "label": 0},
    {"context": "Hello ", "choices": ["world", "there!"], "label": 1},  # trailing space moves to the choice
    {"context": "", "choices": ["abc", "d"], "label": 1},  # empty context: bos stands for it
    {"context": "The sky is", "choices": [" blue", " green", " made of cheese"], "label": 0},
    {"context": "1, 2, 3,", "choices": [" 4", " 5"], "label": 0},
]
GEN_ROWS = [{"prompt": p, "answer": a} for p, a in [
    ("What is 3+4?", "7"), ("Count: 1, 2,", "The answer is 3."), ("Say hi", "#### 12"),
    ("A longer prompt about apples and pears?", "hi"), ("Q", "x")]]


def eval_rows(task: str, n: int = 7) -> list[dict]:
    """Token rows of varied length: class ids, float targets, or token targets."""
    g = torch.Generator().manual_seed(7)
    rows = []
    for i in range(n):
        ids = torch.randint(4, 70, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        label = {"classification": i // 2 % 2, "regression": float(torch.rand((), generator=g)) * 5}.get(task, ids)
        rows.append({"input_ids": ids, "labels": label})
    return rows


def collate(rows: list[dict]) -> dict:
    """The data module's batch layout, right-padded; token targets padded with -100."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda xs, v: xs + [v] * (width - len(xs))
    batch = {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
             "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
             "valid": torch.tensor([float(r.get("_valid", 1)) for r in rows])}
    labels = [r["labels"] for r in rows]
    batch["labels"] = torch.tensor([pad(y, -100) for y in labels]) if isinstance(labels[0], list) else \
        torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    return batch


def loader(task: str, rank: int = 0, world: int = 1):
    from lor2c_ds.data import eval_loader

    return eval_loader(eval_rows(task), collate, 2, rank, world)


# ------------------------------------------------------------------------------------------------
# Loss and metrics
# ------------------------------------------------------------------------------------------------

def test_scored_labels_and_summed_loss_by_task():
    from lor2c_ds.evaluation import scored_labels, summed_loss

    valid = torch.tensor([1.0, 0.0])
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    y = scored_labels({"labels": torch.tensor([2, 1]), "valid": valid}, "classification")
    assert y.tolist() == [2, -100]
    assert summed_loss(logits, y, "classification").item() == pytest.approx(-logits[0].log_softmax(-1)[2].item())
    y = scored_labels({"labels": torch.tensor([0.5, 3.0]), "valid": valid}, "regression")
    assert summed_loss(logits[:, :1], y, "regression").item() == pytest.approx((logits[0, 0].item() - 0.5) ** 2)
    tokens = torch.tensor([[5, 6, -100], [7, 8, 9]])
    seq_logits = torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(1))
    for task in ("causal_lm", "chat"):
        y = scored_labels({"labels": tokens, "valid": valid}, task)
        assert y.tolist() == [[6, -100], [-100, -100]]  # shifted; the filler row is dropped
        assert summed_loss(seq_logits, y, task).item() == pytest.approx(-seq_logits[0, 0].log_softmax(-1)[6].item())


def test_train_module_still_exports_the_loss():
    from lor2c_ds import evaluation, train

    assert train.scored_labels is evaluation.scored_labels and train.summed_loss is evaluation.summed_loss


def test_binary_classification_metrics_by_hand():
    from lor2c_ds.evaluation import classification_metrics

    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 0, 1, 0, 1, 0, 0, 1]
    tp, fp, fn, tn = 3, 1, 1, 3
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    got = classification_metrics(preds, labels, num_classes=2)
    assert got == pytest.approx({"accuracy": 6 / 8, "f1": f1_pos, "f1_macro": (f1_pos + f1_neg) / 2, "mcc": mcc})


def test_multiclass_metrics_by_hand():
    from lor2c_ds.evaluation import classification_metrics

    labels = [0, 0, 1, 1, 2, 2, 2]
    preds = [0, 1, 1, 1, 2, 0, 2]
    cm = np.zeros((3, 3))
    for y, p in zip(labels, preds):
        cm[y, p] += 1
    f1s = [2 * cm[k, k] / (cm[k].sum() + cm[:, k].sum()) for k in range(3)]
    # Gorodkin's multi-class MCC from the confusion matrix
    c, s, t, p = np.trace(cm), cm.sum(), cm.sum(1), cm.sum(0)
    mcc = (c * s - t @ p) / math.sqrt((s ** 2 - p @ p) * (s ** 2 - t @ t))
    got = classification_metrics(preds, labels, num_classes=3)
    assert got == pytest.approx({"accuracy": 5 / 7, "f1": np.mean(f1s), "f1_macro": np.mean(f1s), "mcc": mcc})


def test_regression_metrics_against_numpy():
    from lor2c_ds.evaluation import regression_metrics

    rng = np.random.default_rng(0)
    labels = rng.normal(size=20)
    preds = labels + rng.normal(scale=0.5, size=20)
    rank = lambda x: np.argsort(np.argsort(x))
    got = regression_metrics(preds.tolist(), labels.tolist())
    assert got["pearson"] == pytest.approx(np.corrcoef(preds, labels)[0, 1])
    assert got["spearman"] == pytest.approx(np.corrcoef(rank(preds), rank(labels))[0, 1])
    assert got["mse"] == pytest.approx(np.mean((preds - labels) ** 2))
    assert math.isnan(regression_metrics([1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"])  # constant prediction


@pytest.mark.parametrize("name,direction", [("loss", "min"), ("perplexity", "min"), ("mse", "min"),
                                            ("eval/loss", "min"), ("accuracy", "max"), ("f1", "max"),
                                            ("mcc", "max"), ("pearson", "max"), ("mc_accuracy", "max"),
                                            ("exact_match", "max")])
def test_metric_direction(name, direction):
    from lor2c_ds.evaluation import metric_direction

    assert metric_direction(name) == direction
    assert metric_direction(name, "min") == "min" and metric_direction(name, "max") == "max"


def test_evaluate_classification_and_regression_drop_filler_rows():
    from lor2c_ds.evaluation import classification_metrics, evaluate, regression_metrics

    for task, num_labels in (("classification", 2), ("regression", 1)):
        model = make_bert()
        if num_labels == 1:
            torch.manual_seed(1)
            model.classifier = torch.nn.Linear(model.config.hidden_size, 1)
        rows = eval_rows(task)
        with torch.no_grad():
            outs = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        # 7 rows on rank 0 of 2 -> rows 0, 2, 4, 6; on rank 1 -> 1, 3, 5 and a filler row
        got = [evaluate(model, loader(task, r, 2), task, gather=False) for r in (0, 1)]
        assert [g["examples"] for g in got] == [4, 3]
        mine = [i for i in range(7) if i % 2 == 1]
        if task == "classification":
            nll = sum(-o.log_softmax(-1)[rows[i]["labels"]].item() for i, o in enumerate(outs) if i in mine)
            expected = classification_metrics([outs[i].argmax().item() for i in mine],
                                              [rows[i]["labels"] for i in mine])
        else:
            nll = sum((outs[i][0].item() - rows[i]["labels"]) ** 2 for i in mine)
            expected = regression_metrics([outs[i][0].item() for i in mine], [rows[i]["labels"] for i in mine])
        assert got[1]["loss"] == pytest.approx(nll / 3, rel=1e-5)
        assert {k: got[1][k] for k in expected} == pytest.approx(expected, rel=1e-5)
    assert model.training is False


def test_evaluate_causal_lm_perplexity_against_a_token_loop():
    from lor2c_ds.evaluation import evaluate

    model = make_llama()
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in eval_rows("causal_lm"):
            ids = torch.tensor([row["input_ids"]])
            logp = model(input_ids=ids).logits[0].log_softmax(-1)
            for t in range(1, ids.shape[1]):
                nll -= logp[t - 1, ids[0, t]].item()
                tokens += 1
    model.train()
    got = evaluate(model, loader("causal_lm"), "causal_lm")
    assert model.training  # the previous mode comes back
    assert got["tokens"] == tokens
    assert got["loss"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------------

def manual_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """Independent: with one token per character, the choice's tokens are its characters (plus the
    context's trailing spaces); sum log p over them with a plain loop, one position at a time."""
    stripped = context.rstrip()
    cont = context[len(stripped):] + choice
    ctx_ids = [tokenizer.bos_token_id] if not stripped else tokenizer.convert_tokens_to_ids(list(stripped))
    ids = ctx_ids + tokenizer.convert_tokens_to_ids(list(cont))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return sum(logits[t - 1].log_softmax(-1)[ids[t]].item() for t in range(len(ctx_ids), len(ids)))


def test_encode_pair_follows_lm_eval():
    from lor2c_ds.evaluation import encode_pair

    tok = char_tokenizer()
    ctx, cont = encode_pair(tok, "Hello ", "world")
    assert tok.decode(ctx) == "Hello" and tok.decode(cont) == " world"
    ctx, cont = encode_pair(tok, "", "ab")
    assert ctx == [tok.bos_token_id] and tok.decode(cont) == "ab"


def test_multiple_choice_matches_a_plain_loop():
    from lor2c_ds.evaluation import choice_loglikelihoods, score_multiple_choice

    model, tok = make_llama(), char_tokenizer()
    expected = [[manual_loglikelihood(model, tok, r["context"], c) for c in r["choices"]] for r in MC_ROWS]
    got = choice_loglikelihoods(model, tok, MC_ROWS, batch_size=2)
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, abs=1e-4)
    acc = np.mean([np.argmax(e) == r["label"] for e, r in zip(expected, MC_ROWS)])
    acc_norm = np.mean([np.argmax(np.array(e) / [len(c) for c in r["choices"]]) == r["label"]
                        for e, r in zip(expected, MC_ROWS)])
    assert score_multiple_choice(model, tok, MC_ROWS, batch_size=3) == pytest.approx(
        {"mc_accuracy": acc, "mc_accuracy_norm": acc_norm, "mc_examples": len(MC_ROWS)})


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
CHAT_MC_ROWS = [
    {"messages": [{"role": "user", "content": "hi"}], "choices": [" hello", " no"], "label": 0},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "and 3+3?"}], "choices": [" 6", " 7", " six"], "label": 0},
]


def test_chat_rows_are_scored_after_the_rendered_conversation():
    """A row {"messages", "choices", "label"} is scored as the reply to the conversation: the context
    is the tokenizer's chat template rendered with the generation prompt, then each choice follows."""
    from lor2c_ds.evaluation import choice_loglikelihoods

    model, tok = make_llama(), char_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    rows = [*CHAT_MC_ROWS, MC_ROWS[0]]  # plain rows and chat rows mix
    contexts = ["u: hi\na:", "u: 2+2?\na: 4\nu: and 3+3?\na:", MC_ROWS[0]["context"]]
    expected = [[manual_loglikelihood(model, tok, ctx, c) for c in r["choices"]] for ctx, r in zip(contexts, rows)]
    got = choice_loglikelihoods(model, tok, rows, batch_size=2)
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, abs=1e-4)


def test_chat_rows_need_a_chat_template_and_well_formed_messages(tmp_path):
    from lor2c_ds.evaluation import EvalDataError, choice_loglikelihoods, load_multiple_choice

    chat = {"messages": [{"role": "user", "content": "hi"}], "choices": ["a", "b"], "label": 1}
    assert load_multiple_choice(write_jsonl(tmp_path / "ok.jsonl", [chat]))[0]["messages"] == chat["messages"]
    for bad, says in [({**chat, "messages": "hi"}, "'messages' must be a non-empty list of {role, content}"),
                      ({**chat, "messages": [{"role": "user"}]}, "'messages' must be a non-empty list"),
                      ({"choices": ["a", "b"], "label": 0}, "needs a 'context' text or 'messages'"),
                      ({**chat, "context": "c"}, "has both 'context' and 'messages'")]:
        with pytest.raises(EvalDataError, match=r"bad\.jsonl, line 1: " + re.escape(says)):
            load_multiple_choice(write_jsonl(tmp_path / "bad.jsonl", [bad]))
    with pytest.raises(EvalDataError, match="in chat form need a tokenizer with a chat template"):
        choice_loglikelihoods(make_llama(), char_tokenizer(), [chat])


# ------------------------------------------------------------------------------------------------
# Answer extraction and generation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,answer", [
    ("The answer is 1,234.", "1234"),
    ("so 5 + 7 = 12\n#### 12", "12"),
    ("She pays $1,000.50 in total.", "1000.5"),
    ("The answer is $72.00", "72"),
    ("I think the answer is: -3.", "-3"),
    ("3 apples, then 4, so 7.", "7"),
    ("It costs 18.0 dollars", "18"),
    ("The answer is Paris. Paris is big.", "paris"),
    ("Paris.", "paris"),
    ("no number here", "no number here"),
    ("#### 5\nThe answer is 6", "5"),
])
def test_extract_answer(text, answer):
    from lor2c_ds.evaluation import extract_answer

    assert extract_answer(text) == answer


def manual_greedy(model, tokenizer, ids: list[int], max_new: int) -> str:
    ids = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            token = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
            ids.append(token)
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("template", [False, True])
def test_generation_matches_a_manual_greedy_loop(template):
    from lor2c_ds.evaluation import evaluate_generation, extract_answer

    model, tok = make_llama(), char_tokenizer()
    if template:
        tok.chat_template = "{% for m in messages %}U: {{ m['content'] }}\n{% endfor %}A:"
    texts = []
    for row in GEN_ROWS:
        prompt = f"U: {row['prompt']}\nA:" if template else row["prompt"]
        texts.append(manual_greedy(model, tok, tok(prompt, add_special_tokens=False)["input_ids"], MAX_NEW))
    rows = [dict(r) for r in GEN_ROWS]
    rows[0]["answer"] = f"The answer is {extract_answer(texts[0])}."  # one right by construction
    got = evaluate_generation(model, tok, rows, max_new_tokens=MAX_NEW, batch_size=3, examples=len(rows))
    assert [p["generated"] for p in got["predictions"]] == texts  # left-padded batches change nothing
    expected = np.mean([extract_answer(t) == extract_answer(r["answer"]) for t, r in zip(texts, rows)])
    assert got["exact_match"] == pytest.approx(expected) and expected >= 1 / len(rows)
    assert got["generation_examples"] == len(rows)


# ------------------------------------------------------------------------------------------------
# Row files
# ------------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_row_file_errors_name_the_file_and_line(tmp_path):
    from lor2c_ds.evaluation import (
        EvalDataError,
        load_generation,
        load_jsonl_rows,
        load_multiple_choice,
    )

    with pytest.raises(EvalDataError, match="does not exist"):
        load_jsonl_rows(tmp_path / "nope.jsonl", ("prompt",))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, "", "{not json"])
    with pytest.raises(EvalDataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        load_generation(bad)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(EvalDataError, match=r"line 2 \(row 2\): no 'answer' field"):
        load_generation(missing)
    label = write_jsonl(tmp_path / "label.jsonl", [{"context": "c", "choices": ["a", "b"], "label": 2}])
    with pytest.raises(EvalDataError, match=r"line 1: 'label' must be an index into the 2 choices"):
        load_multiple_choice(label)
    with pytest.raises(EvalDataError, match="holds no rows"):
        load_jsonl_rows(write_jsonl(tmp_path / "empty.jsonl", [""]))
    assert load_generation(write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "p", "answer": 5}]))[0]["answer"] == "5"


# ------------------------------------------------------------------------------------------------
# 2 ranks under ZeRO-3 equal 1 rank
# ------------------------------------------------------------------------------------------------

def randomize_adapters(model) -> None:
    """Seeded non-zero adapter weights (LoRA's B starts at zero); heads and backbone untouched."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))


def build(model_dir: Path, task: str, ds_config: dict | None = None):
    """The model a probe rank and the 1-rank reference both evaluate: base + seeded LoRA."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lor2c_ds import AdapterConfig, apply_adapters
    from lor2c_ds.engine import zero3_loading

    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    with zero3_loading(ds_config or {}):
        model = cls.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = apply_adapters(model, AdapterConfig(method="lora", r=2, alpha=4))
    randomize_adapters(model)
    return model


def evaluate_all(dirs: dict, engine_for=None) -> dict:
    """Every metric the probe compares; `engine_for(model)` wraps a model in a DeepSpeed engine."""
    from lor2c_ds import evaluation as ev
    from lor2c_ds.data import eval_loader

    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if engine_for else (0, 1)
    out = {}
    for task in ("classification", "regression", "causal_lm"):
        model = build(dirs[task], task, engine_for.ds_config if engine_for else None)
        model = engine_for(model) if engine_for else model
        out[task] = ev.evaluate(model, eval_loader(eval_rows(task), collate, 2, rank, world), task)
        if task == "causal_lm":
            tok = char_tokenizer()
            out["loglikelihoods"] = ev.choice_loglikelihoods(model, tok, MC_ROWS, batch_size=2)
            chat_tok = char_tokenizer()
            chat_tok.chat_template = CHAT_TEMPLATE
            out["chat_loglikelihoods"] = ev.choice_loglikelihoods(model, chat_tok, [*CHAT_MC_ROWS, *MC_ROWS],
                                                                  batch_size=2)
            out.update(ev.evaluate_sets(model, tok, {"multiple_choice": MC_ROWS, "generation": GEN_ROWS},
                                        batch_size=2, max_new_tokens=MAX_NEW))
    return out


def probe(llama: str, bert: str, bert1: str, out: str) -> None:
    """One rank of the 2-rank run (under torchrun)."""
    from lor2c_ds import engine as ds
    from lor2c_ds.config import TrainConfig

    rank, world = ds.init_distributed()
    cfg = TrainConfig(model=llama, micro_batch_size=1, global_batch_size=world, deepspeed="zero3")
    ds_config = ds.build_ds_config(cfg, world, total_steps=1)
    engine_for = lambda model: ds.initialize(model, ds_config)
    engine_for.ds_config = ds_config
    result = evaluate_all({"causal_lm": llama, "classification": bert, "regression": bert1}, engine_for)
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    ds.shutdown()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_models")
    return {"causal_lm": save_model(root / "llama", "llama"), "classification": save_model(root / "bert", "bert"),
            "regression": save_model(root / "bert1", "bert", num_labels=1)}


@pytest.mark.slow
def test_two_ranks_under_zero3_equal_one_rank(tmp_path, model_dirs):
    from launcher.train import free_port

    out = tmp_path / "probe"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", __file__, "probe",
           *(str(model_dirs[k]) for k in ("causal_lm", "classification", "regression")), str(out)]
    env = dict(os.environ, LOR2C_DIST_TIMEOUT_S="120", OMP_NUM_THREADS="1")  # a rank out of step fails fast
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank holds the gathered result
    two, one = ranks[0], evaluate_all(model_dirs)
    assert two["classification"]["examples"] == one["classification"]["examples"] == 7
    assert two["regression"]["examples"] == 7 and two["causal_lm"]["tokens"] == one["causal_lm"]["tokens"]
    for task in ("classification", "regression", "causal_lm"):
        assert two[task] == pytest.approx(one[task], rel=1e-5, abs=1e-6), task
    for a, b in zip(two["loglikelihoods"], one["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-4)
    assert len(two["chat_loglikelihoods"]) == len(CHAT_MC_ROWS) + len(MC_ROWS)  # in row order, chat rows first
    for a, b in zip(two["chat_loglikelihoods"], one["chat_loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-4)
    for a, b in zip(one["chat_loglikelihoods"][len(CHAT_MC_ROWS):], one["loglikelihoods"]):
        assert a == pytest.approx(b, abs=1e-4)  # other batches, other padding: the same sums
    for key in ("mc_accuracy", "mc_accuracy_norm", "mc_examples", "exact_match", "generation_examples",
                "predictions"):
        assert two[key] == one[key], key


# ------------------------------------------------------------------------------------------------
# lor2c-eval
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(model_dirs, tmp_path_factory) -> dict:
    """A LoR2C 'run' on the tiny LLaMA (train_config.json + adapter/, random adapter weights), its
    export, its data and row files."""
    from lor2c_ds import AdapterConfig, apply_adapters, save_adapters
    from lor2c_ds.config import load_config
    from lor2c_ds.export import export

    root = tmp_path_factory.mktemp("eval_run")
    data = write_jsonl(root / "text.jsonl", [{"text": f"Row {i}: the {i} apples cost ${i * 3}."} for i in range(24)])
    recipe = write_jsonl(root / "recipe.yaml", [json.dumps({
        "model": str(model_dirs["causal_lm"]), "task": "causal_lm", "output_dir": str(root / "run"),
        "data": {"path": str(data), "max_length": 32, "eval_fraction": 0.25},
        "adapter": {"method": "lor2c", "r": 2, "alpha": 4}, "micro_batch_size": 4})])
    cfg = load_config(recipe)
    model = apply_adapters(make_llama(), AdapterConfig(method="lor2c", r=2, alpha=4))
    randomize_adapters(model)
    run = root / "run"
    save_adapters(model, run / "adapter")
    (run / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    export(run, cfg.model, root / "export", parity_batches=1)
    return {"run": run, "export": root / "export", "recipe": recipe, "model": model,
            "mc": write_jsonl(root / "mc.jsonl", MC_ROWS), "gen": write_jsonl(root / "gen.jsonl", GEN_ROWS)}


def lor2c_eval(*args: str) -> tuple[int, dict | None, str]:
    import contextlib
    import io

    from launcher.eval import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in args])
    return code, json.loads(stdout.getvalue()) if code == 0 else None, stderr.getvalue()


def test_cli_on_an_export_and_on_its_run(tiny_run, tmp_path):
    from lor2c_ds.evaluation import score_multiple_choice

    out = tmp_path / "metrics.json"
    code, exported, err = lor2c_eval("--model", tiny_run["export"], "--split", "eval", "--multiple-choice",
                                     tiny_run["mc"], "--generation", tiny_run["gen"], "--max-new-tokens", MAX_NEW,
                                     "--out", out)
    assert code == 0, err
    assert json.loads(out.read_text()) == exported
    assert exported["task"] == "causal_lm" and exported["eval"]["tokens"] > 0  # the run's recipe was found
    assert exported["generation_examples"] == len(GEN_ROWS) and len(exported["predictions"]) == 3
    trained = tiny_run["model"].eval()
    assert exported["mc_accuracy"] == pytest.approx(
        score_multiple_choice(trained, char_tokenizer(), MC_ROWS)["mc_accuracy"])
    code, from_run, err = lor2c_eval("--run", tiny_run["run"], "--multiple-choice", tiny_run["mc"], "--split", "eval")
    assert code == 0, err
    assert from_run["eval"] == pytest.approx(exported["eval"], rel=1e-5)  # export == base + adapters
    assert from_run["mc_accuracy"] == exported["mc_accuracy"]


def test_cli_bad_input(tiny_run, model_dirs, tmp_path):
    out = tmp_path / "keep.json"
    out.write_text("old")
    bad_mc = write_jsonl(tmp_path / "bad.jsonl", [MC_ROWS[0], {"context": "x", "choices": ["a", "b"]}])
    cases = [
        (["--model", tmp_path / "absent"], "model directory .*absent does not exist"),
        (["--run", tmp_path], "holds no adapter_config.json"),
        (["--run", tiny_run["run"], "--split", "test"], "no data.test_path"),
        (["--model", tiny_run["export"], "--multiple-choice", bad_mc], r"bad\.jsonl, line 2 \(row 2\): no 'label'"),
        (["--model", tiny_run["export"], "--generation", tmp_path / "none.jsonl"], "none.jsonl does not exist"),
        (["--model", model_dirs["classification"], "--generation", tiny_run["gen"]], "need a causal language model"),
        (["--model", model_dirs["causal_lm"], "--split", "eval"], "needs the recipe's data: pass --config"),
        (["--model", model_dirs["causal_lm"], "--set", "lr=1"], "--set needs a recipe"),
        (["--run", tiny_run["run"], "--set", "adapter.r=0"], "r must be"),
        (["--run", tiny_run["run"], "--batch-size", "0"], "--batch-size must be a positive integer"),
    ]
    for args, message in cases:
        code, _, err = lor2c_eval(*args, "--out", out)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("lor2c-eval: error: "), err
        assert __import__("re").search(message, err), (message, err)
    assert out.read_text() == "old"


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    probe(*sys.argv[2:])


def test_metric_names_are_what_summarize_reports():
    """eval.best_metric is checked against metric_names before training: it must match the real keys."""
    from lor2c_ds.evaluation import metric_names, summarize

    parts = [{"loss": 1.0, "count": 2, "preds": [0, 1], "labels": [0, 1], "num_classes": 2}]
    for task in ("classification", "regression", "causal_lm", "chat"):
        reported = set(summarize(parts, task)) - {"examples", "tokens"}
        assert reported == metric_names(task), task
