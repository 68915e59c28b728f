"""The whole journey on a checkpoint saved in bf16, as hub checkpoints ship: train on 2 ranks under
ZeRO-3 in bf16 -> SIGUSR1 -> resume -> export in bf16 with the parity check -> load the export (plain
transformers for LoRA/ResLoRA, `lor2c_ds.from_pretrained` for LoR2C) -> lor2c-eval. Slow."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import CHITCHAT, POLARITY, REPO, metrics, needs_assets, save_tiny_bert, save_tiny_llama, write_recipe
from test_run_paths import wait_for_step

from lor2c_ds.export.load import UNIT_ROUNDOFF

pytestmark = [pytest.mark.slow, needs_assets]
STEPS = 10  # stopped after step 2 or later, resumed to the end


def save_bf16(path: Path, saver) -> Path:
    """The tiny model, saved in bf16 (model.to(torch.bfloat16).save_pretrained)."""
    import transformers

    saver(path)
    config = json.loads((path / "config.json").read_text())
    model = getattr(transformers, config["architectures"][0]).from_pretrained(path)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory) -> Path:
    return save_bf16(tmp_path_factory.mktemp("llama_bf16"), save_tiny_llama)


@pytest.fixture(scope="module")
def bf16_bert(tmp_path_factory) -> Path:
    return save_bf16(tmp_path_factory.mktemp("bert_bf16"), lambda p: save_tiny_bert(p, layers=2))


CASES = {
    "lora": ("llama", {"method": "lora"}),
    "lor2c": ("llama", {"method": "lor2c"}),
    "reslora": ("llama", {"method": "reslora", "reslora_variant": "is"}),
    "share_lor2c_bert": ("bert", {"method": "share_lor2c"}),
}


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def call(tool: str, argv: list[str]) -> None:
    """lor2c-export / lor2c-eval in this process: its interpreter and imports are paid for already."""
    import importlib

    code = importlib.import_module(f"launcher.{tool}").main(argv)
    assert code == 0, f"lor2c-{tool} {' '.join(argv)} exited {code}"


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_checkpoint_train_preempt_resume_export_load_eval(tmp_path, case, bf16_llama, bf16_bert):
    family, adapter = CASES[case]
    model = bf16_llama if family == "llama" else bf16_bert
    assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16"
    data = ({"path": str(CHITCHAT), "max_length": 48, "max_train_examples": 256, "max_eval_examples": 16}
            if family == "llama" else
            {"path": str(POLARITY), "format": "polarity_csv", "max_length": 32, "max_train_examples": 256,
             "max_eval_examples": 32})
    out = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "recipe.yaml", model=str(model), task="causal_lm" if family == "llama" else "classification",
        data=data, adapter={"r": 4, "alpha": 8, "dropout": 0.0, **adapter}, precision="bf16", deepspeed="zero3",
        nproc=2, global_batch_size=8, micro_batch_size=2, lr=5e-3, log_every=1, max_steps=STEPS, eval_before=False,
        output_dir=str(out))

    log = tmp_path / "train.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "launcher.train", "--config", str(recipe)], cwd=REPO,
                                stdout=sink, stderr=subprocess.STDOUT)
        wait_for_step(out, 2, proc)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = (out / "checkpoints" / "latest").read_text().strip()
    assert int(stopped.split("_")[1]) < STEPS and not (out / "adapter").exists()
    run(["launcher.train", "--config", str(recipe)])  # the requeue
    steps = [r["step"] for r in metrics(out, "train")]
    assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))
    final = metrics(out, "eval")[-1]

    export = tmp_path / "export"
    call("export", ["--checkpoint", str(out), "--base", str(model), "--out", str(export), "--dtype", "bf16"])
    report = json.loads((export / "export_report.json").read_text())
    parity = report["parity"]
    print(f"{case}: bf16 export parity max abs {parity['max_abs_diff']:.3g}, relative {parity['max_rel_diff']:.3g}, "
          f"unmerged bf16 floor {parity['dtype_floor_rel_diff']}, bound {parity['bound']}")
    if report["exact_merge"]:
        floor = parity["dtype_floor_rel_diff"]
        assert 0 < floor < 0.1 and parity["bound"] == pytest.approx(2 * floor + UNIT_ROUNDOFF[torch.bfloat16])
        assert parity["passed"] is True, parity
    else:  # ResLoRA is: an approximate merge, its error reported
        assert parity["bound"] is None and 0 < parity["max_rel_diff"] < 1.0, parity

    import transformers

    import lor2c_ds

    if report["plain_transformers"]:  # LoRA, ResLoRA: no lor2c_ds needed
        loaded = transformers.AutoModelForCausalLM.from_pretrained(export)
        assert case in ("lora", "reslora") and type(loaded).__module__.startswith("transformers.")
    else:
        loaded = lor2c_ds.from_pretrained(export)
        assert hasattr(loaded, "lor2c")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}

    metrics_file = tmp_path / "eval.json"
    call("eval", ["--model", str(export), "--out", str(metrics_file)])
    evaluated = json.loads(metrics_file.read_text())["eval"]
    key = "perplexity" if family == "llama" else "accuracy"
    tol = 0.05 if report["exact_merge"] else 0.25  # bf16 training graph vs an fp32 evaluation of the export
    assert evaluated[key] == pytest.approx(final[key], rel=tol), (evaluated, final)
    call("eval", ["--run", str(out), "--out", str(metrics_file)])  # the run's adapters on the bf16 base
    of_run = json.loads(metrics_file.read_text())["eval"]
    assert of_run[key] == pytest.approx(final[key], rel=0.05), (of_run, final)
