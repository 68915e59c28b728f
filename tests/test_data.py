"""Bring-your-own data: every source format, column mapping, task encoders (labels, chat masking,
packing), bad rows, and the per-rank sample order (sharding, filler rows, resume)."""
from __future__ import annotations

import json
import re

import datasets
import pytest
import torch

from lor2c_ds.config import ConfigError, load_config
from lor2c_ds.data import DataError, EpochSampler, model_inputs, prepare_data
from lor2c_ds.data.loaders import FILLER, StreamShard
from lor2c_ds.data.sources import read
from lor2c_ds.train import load_tokenizer
from test_distributed import CHITCHAT_CHAT, MINILM, SMOLLM, needs_assets

pytestmark = needs_assets
ROWS = [{"text": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "label": ["neg", "pos"][i % 2]}
        for i in range(20)]


def write_all_formats(tmp_path, rows) -> dict[str, str]:
    """The same rows in every format `data.path` accepts."""
    table = datasets.Dataset.from_list(rows)
    paths = {}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["jsonl"] = tmp_path / "d.jsonl"
    (tmp_path / "d.json").write_text(json.dumps(rows))
    paths["json"] = tmp_path / "d.json"
    table.to_csv(str(tmp_path / "d.csv"))
    paths["csv"] = tmp_path / "d.csv"
    table.to_csv(str(tmp_path / "d.tsv"), sep="\t")
    paths["tsv"] = tmp_path / "d.tsv"
    table.to_parquet(str(tmp_path / "d.parquet"))
    paths["parquet"] = tmp_path / "d.parquet"
    table.save_to_disk(str(tmp_path / "saved"))
    paths["saved"] = tmp_path / "saved"
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    paths["arrow"] = arrow
    return {k: str(v) for k, v in paths.items()}


def cfg_for(model, *overrides):
    return load_config(None, [f"model={model}", *overrides])


@pytest.fixture(scope="module")
def bert_tok():
    return load_tokenizer(str(MINILM))


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(str(SMOLLM))


def test_every_source_format_loads_the_same_rows(tmp_path, bert_tok):
    encoded = {}
    for fmt, path in write_all_formats(tmp_path, ROWS).items():
        cfg = cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}", "data.max_length=16")
        data = prepare_data(cfg, bert_tok)
        encoded[fmt] = [(r["input_ids"], r["labels"]) for r in data.eval]
        assert data.label_names == ["neg", "pos"], fmt
    reference = encoded.pop("jsonl")
    assert len(reference) == len(ROWS)
    assert [y for _, y in reference] == [i % 2 for i in range(20)]
    for fmt, rows in encoded.items():
        assert rows == reference, fmt


def test_held_out_split_is_a_seeded_fraction(tmp_path, bert_tok):
    path = write_all_formats(tmp_path, ROWS)["jsonl"]
    cfg = cfg_for(MINILM, f"data.path={path}", "data.eval_fraction=0.25")
    a, b = prepare_data(cfg, bert_tok), prepare_data(cfg, bert_tok)
    assert (len(a.train), len(a.eval)) == (15, 5)
    assert list(a.eval["input_ids"]) == list(b.eval["input_ids"])
    train_ids = {tuple(x) for x in a.train["input_ids"]}
    assert not train_ids & {tuple(x) for x in a.eval["input_ids"]}  # disjoint


def test_saved_dataset_dict_provides_its_splits(tmp_path, bert_tok):
    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:12]),
                              validation=datasets.Dataset.from_list(ROWS[12:16]),
                              test=datasets.Dataset.from_list(ROWS[16:]))
    dd.save_to_disk(str(tmp_path / "dd"))
    data = prepare_data(cfg_for(MINILM, f"data.path={tmp_path / 'dd'}"), bert_tok)
    assert (len(data.train), len(data.eval), len(data.test)) == (12, 4, 4)


def test_text_pair_and_regression_targets(tmp_path, bert_tok):
    rows = [{"s1": f"a man plays {i}", "s2": f"a person plays {i}", "score": i / 4} for i in range(8)]
    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}", "task=regression", "num_labels=1",
                  "data.text_field=s1", "data.text_pair_field=s2", "data.label_field=score")
    data = prepare_data(cfg, bert_tok)
    batch = data.collator([dict(r) for r in data.eval])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == [i / 4 for i in range(8)]
    assert batch["token_type_ids"][0].max() == 1  # the pair is encoded as a second segment
    first = bert_tok("a man plays 0", "a person plays 0")["input_ids"]
    assert data.eval[0]["input_ids"] == first


def test_truncation_is_counted(tmp_path, bert_tok):
    rows = [{"text": "word " * n, "label": n % 2} for n in (3, 40, 5, 60)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_data(cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}", "data.max_length=16"), bert_tok)
    assert data.report["train"]["truncated"] == 2
    assert max(len(r["input_ids"]) for r in data.train) == 16


@pytest.mark.parametrize("rows,message", [
    ([{"text": "fine", "label": 1}, {"text": "  ", "label": 0}], "3 bad row(s): text is empty in {\"text\": \"  \", \"label\": 0}"),
    ([{"text": "fine", "label": 1}, {"text": "ok", "label": None}], "label is missing"),
    ([{"sentence": "fine", "label": 1}], "has no column 'text'"),
])
def test_bad_rows_fail_with_the_row_or_are_skipped_and_counted(tmp_path, bert_tok, rows, message):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    cfg = cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}")
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_data(cfg, bert_tok)
    if "column" not in message:
        data = prepare_data(cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}", "data.on_bad_rows=skip"),
                            bert_tok)
        assert len(data.train) == 3 and sum(data.report["train"]["skipped"].values()) == 3


def test_malformed_jsonl_names_file_and_line(tmp_path, bert_tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", label: 1}\n')
    with pytest.raises(DataError, match=rf"data file {path}: line 3 is not valid JSON"):
        prepare_data(cfg_for(MINILM, f"data.path={path}"), bert_tok)


def test_label_absent_from_label_map_at_evaluation(tmp_path, bert_tok):
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"t{i}", "label": ["a", "b"][i % 2]}) + "\n" for i in range(6)))
    held.write_text(json.dumps({"text": "x", "label": "a"}) + "\n" + json.dumps({"text": "y", "label": "c"}) + "\n")
    with pytest.raises(DataError, match=r"eval split .*label 'c' is absent from the label map \['a', 'b'\]"):
        prepare_data(cfg_for(MINILM, f"data.path={train}", f"data.eval_path={held}"), bert_tok)


def test_configured_label_order_is_the_id_order(tmp_path, bert_tok):
    path = write_all_formats(tmp_path, ROWS)["jsonl"]
    data = prepare_data(cfg_for(MINILM, f"data.path={path}", f"data.eval_path={path}", "data.labels=[pos, neg]"),
                        bert_tok)
    assert data.label_names == ["pos", "neg"]
    assert [r["labels"] for r in data.eval][:2] == [1, 0]  # row 0 is "neg"


def _chat_rows(tmp_path, rows):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_loss_falls_on_exactly_the_response_tokens(tmp_path, smol_tok):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}]
    path = _chat_rows(tmp_path, [{"messages": messages}] * 2 + [{"prompt": "2+2?", "response": "4"}] * 2)
    data = prepare_data(cfg_for(SMOLLM, "task=chat", f"data.path={path}", f"data.eval_path={path}",
                                "data.max_length=256"), smol_tok)
    row = data.eval[0]
    # Independent: the assistant turns as the template renders them, tokenized on their own.
    turn = lambda text: smol_tok(text + "<|im_end|>\n", add_special_tokens=False)["input_ids"]  # noqa: E731
    scored = [t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]
    assert scored == turn("Hello! How can I help?") + turn("No.")
    assert [y for y in row["labels"] if y != -100] == scored  # a scored label is its own token
    full = smol_tok.apply_chat_template(messages, tokenize=False)
    assert row["input_ids"] == smol_tok(full, add_special_tokens=False)["input_ids"]
    pair = data.eval[2]  # prompt/response columns become a user and an assistant message
    assert [t for t, y in zip(pair["input_ids"], pair["labels"]) if y != -100] == turn("4")
    every = prepare_data(cfg_for(SMOLLM, "task=chat", f"data.path={path}", f"data.eval_path={path}",
                                 "data.loss_on=all"), smol_tok)
    assert every.eval[0]["labels"] == every.eval[0]["input_ids"]


def test_chat_template_file_and_turn_without_response(tmp_path, bert_tok):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant: {% endif %}")
    path = _chat_rows(tmp_path, [{"prompt": "say yes", "response": "yes"}] * 4)
    data = prepare_data(cfg_for(MINILM, "task=chat", f"data.path={path}", f"data.eval_path={path}",
                                f"data.chat_template={template}"), bert_tok)
    row = data.eval[0]
    assert bert_tok.decode([t for t, y in zip(row["input_ids"], row["labels"]) if y != -100]) == "yes"
    with pytest.raises(DataError, match="no chat template"):
        prepare_data(cfg_for(MINILM, "task=chat", f"data.path={path}"), load_tokenizer(str(MINILM)))
    bad = _chat_rows(tmp_path, [{"messages": [{"role": "user", "content": "hello?"}]}] * 3)
    with pytest.raises(DataError, match="a chat turn has no response"):
        prepare_data(cfg_for(MINILM, "task=chat", f"data.path={bad}", f"data.chat_template={template}"), bert_tok)


def test_chitchat_messages_asset(smol_tok):
    first = json.loads(CHITCHAT_CHAT.read_text().splitlines()[0])["messages"]
    assert [m["role"] for m in first[:4]] == ["user", "assistant", "user", "assistant"]
    assert sum(1 for _ in CHITCHAT_CHAT.open()) == 4018  # the 7,168 conversations with two or more turns


def test_packing_keeps_attention_within_each_document(tmp_path, smol_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    docs = [{"text": " ".join(["word"] * n) + f" end {n}"} for n in (5, 9, 3, 14, 7, 4)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = cfg_for(SMOLLM, "task=causal_lm", f"data.path={path}", f"data.eval_path={path}", "data.packing=true",
                  "data.max_length=32")
    data = prepare_data(cfg, smol_tok)
    rows = list(data.eval)
    assert all(len(r["input_ids"]) == 32 for r in rows)
    assert data.report["eval"]["documents"] == 6 and len(rows) < 6
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=len(smol_tok),
                                         attn_implementation="sdpa")).eval()
    batch = data.collator([dict(r) for r in rows])
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits
    seen = 0
    for b, row in enumerate(rows):
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for s, e in zip(starts, starts[1:] + [32]):
            ids = row["input_ids"][s:e]
            if row["labels"][s + 1 if e - s > 1 else s] == -100 and all(y == -100 for y in row["labels"][s:e]):
                continue  # the padding tail
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[b, s:e], alone, atol=1e-4, rtol=1e-4)
            assert row["labels"][s] == -100  # never predicted from the previous document
            assert row["labels"][s + 1:e] == ids[1:]
            assert ids[-1] == smol_tok.eos_token_id
            seen += 1
    assert seen == 6


@pytest.mark.parametrize("n,global_batch,world", [(37, 8, 2), (32, 8, 4), (5, 4, 1), (50, 12, 3)])
def test_epoch_shards_cover_the_dataset_exactly_once(n, global_batch, world):
    per_rank = [list(EpochSampler(n, global_batch, r, world, seed=3)) for r in range(world)]
    samples = [i for shard in per_rank for i in shard if i != FILLER]
    assert sorted(samples) == list(range(n))  # nothing lost, nothing repeated
    fillers = sum(shard.count(FILLER) for shard in per_rank)
    assert fillers == -n % global_batch  # only the last global batch is filled up
    assert len({len(s) for s in per_rank}) == 1  # every rank runs the same number of micro-batches
    one = EpochSampler(n, global_batch, 0, 1, seed=3).global_order()
    for step in range(len(one) // global_batch):  # step k covers the same samples at any world size
        window = slice(step * global_batch // world, (step + 1) * global_batch // world)
        assert sorted(i for s in per_rank for i in s[window]) == sorted(one[step * global_batch:(step + 1) * global_batch])


def test_epochs_reshuffle_and_resume_continues_the_same_order():
    sampler = EpochSampler(40, 8, 1, 2, seed=7)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) != epoch1
    sampler.set_epoch(1)
    sampler.skip = 6
    assert list(sampler) == epoch1[6:] and len(sampler) == len(epoch1) - 6


def test_streaming_shards_read_each_row_once_per_epoch(tmp_path, bert_tok):
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(24)]
    files = []
    for k in range(4):  # four files, two ranks
        files.append(tmp_path / f"part{k}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in rows[k * 6:(k + 1) * 6]))
    cfg = cfg_for(MINILM, f"data.path={tmp_path / 'part*.jsonl'}", "data.streaming=true", "max_steps=2",
                  "data.on_bad_rows=skip")
    stream = read(cfg.data.path, cfg.data, streaming=True)  # the glob: one stream shard a file
    stream = stream.map(lambda b: {**b, "_problem": [""] * len(b["text"]), "_truncated": [False] * len(b["text"])},
                        batched=True)
    seen = []
    for rank in range(2):
        shard = StreamShard(stream, rank, 2, seed=0, buffer=8)
        got = [r["text"] for r, _ in zip(shard, range(12))]
        seen += got
        again = StreamShard(stream, rank, 2, seed=0, buffer=8)
        again.skip = 5
        assert [r["text"] for r, _ in zip(again, range(7))] == got[5:]  # resume: same order
    assert sorted(seen) == sorted(r["text"] for r in rows)


def test_streaming_needs_max_steps_and_a_held_out_set(tmp_path, bert_tok):
    path = write_all_formats(tmp_path, ROWS)["jsonl"]
    with pytest.raises(ConfigError, match="streaming needs max_steps"):
        cfg_for(MINILM, f"data.path={path}", "data.streaming=true")
    with pytest.raises(ConfigError, match="set data.on_bad_rows: skip"):
        cfg_for(MINILM, f"data.path={path}", "data.streaming=true", "max_steps=3")
    stream = ["data.streaming=true", "max_steps=3", "data.on_bad_rows=skip", "data.labels=[neg, pos]"]
    with pytest.raises(DataError, match="needs data.eval_path or data.max_eval_examples"):
        prepare_data(cfg_for(MINILM, f"data.path={path}", *stream), bert_tok)
    data = prepare_data(cfg_for(MINILM, f"data.path={path}", *stream, "data.max_eval_examples=4"), bert_tok)
    assert data.streaming and len(data.eval) == 4
    assert len(list(data.train)) == 16  # the held-out rows are not trained on
