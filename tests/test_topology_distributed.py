"""MergeLoR2C + InjectLoR2C under ZeRO-3 on 2 CPU ranks: rank-count invariance through topology
changes, what happens to merged, retired and injected tensors, and resume across a change."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import REPO, classification_recipe, metrics, needs_assets, run_cli, tiny_bert4  # noqa: F401

from launcher.train import free_port

pytestmark = [pytest.mark.slow, needs_assets]
IM = {"method": "lor2c", "r": 4, "alpha": 8, "dropout": 0.0, "merges": 1, "injections": 1, "event_every_steps": 3}


def im_recipe(tmp_path: Path, model: Path, **adapter) -> Path:
    return classification_recipe(tmp_path, model, adapter={**IM, **adapter}, max_steps=8, lr=1e-2,
                                 save_every=4)


def probe(recipe: Path, out: Path, stop_after: int, *overrides: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "run_probe.py"), str(recipe),
           str(stop_after), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]


def test_merge_and_inject_two_ranks_equal_one_rank(tmp_path, tiny_bert4):
    recipe = im_recipe(tmp_path, tiny_bert4)
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"n{n}"
        run_cli(recipe, f"nproc={n}", f"output_dir={outs[n]}")
    one, two = ([r["loss"] for r in metrics(outs[n], "train")] for n in (1, 2))
    assert len(one) == 8 and torch.allclose(torch.tensor(one), torch.tensor(two), rtol=0, atol=1e-5), (one, two)
    events = [[{k: v for k, v in e.items() if k != "scores" and k != "score"} for e in metrics(outs[n], "topology")]
              for n in (1, 2)]
    assert events[0] == events[1] and [e["event"] for e in events[0]] == ["merge", "inject"]
    merge, inject = metrics(outs[2], "topology")
    assert merge["step"] == inject["step"] == 3

    final = load_file(str(outs[2] / "adapter" / "adapter_model.safetensors"))
    at_event = load_file(str(outs[2] / "checkpoints" / "step_4" / "adapter_model.safetensors"))
    lower, upper = merge["adapters"]
    # the merged adapter keeps training; the retired one is zero and stays zero
    assert not torch.equal(final[f"lor2c.adapters.{lower}.lora_B.weight"], at_event[f"lor2c.adapters.{lower}.lora_B.weight"])
    for key in (upper, inject["adapter"]):
        for part in ("lora_A", "lora_B"):
            assert final[f"lor2c.adapters.{key}.{part}.weight"].abs().max() == 0
    # the injected q/v LoRA trains: its B left zero
    for name in inject["lora"]:
        assert final[f"{name}.lora_B.weight"].abs().max() > 0
    topology = json.loads((outs[2] / "topology.json").read_text())
    assert topology["spans"][lower][:2] == merge["merged_span"] and topology["spans"][upper][2] is False
    assert topology["injected"] == inject["lora"]


def test_resume_across_a_topology_change(tmp_path, tiny_bert4):
    recipe = im_recipe(tmp_path, tiny_bert4, dropout=0.1)
    whole = probe(recipe, tmp_path / "whole", 0, f"output_dir={tmp_path / 'a'}")
    probe(recipe, tmp_path / "part", 5, f"output_dir={tmp_path / 'b'}")  # stops after the events (step 3)
    resumed = probe(recipe, tmp_path / "resumed", 0, f"output_dir={tmp_path / 'b'}")
    assert whole[0]["digest"] == whole[1]["digest"] == resumed[0]["digest"] == resumed[1]["digest"]
    assert whole[0]["layout"] == resumed[0]["layout"] == resumed[1]["layout"]
    a, b = ([r["loss"] for r in metrics(tmp_path / d, "train")] for d in ("a", "b"))
    assert a == b  # b logged steps 1-5, then 6-8 after the resume
