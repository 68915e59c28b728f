"""Portable LoR2C exports: every family's export loads with AutoModelFor*.from_pretrained(trust_remote_code=True)
in a process where importing lor2c_ds fails, with the logits of lor2c_ds.from_pretrained (1e-6, fp32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from family_models import ENCODERS, FAMILIES, family_input_ids, make_family
from safetensors.torch import load_file, save_file

from lor2c_ds import AdapterConfig, apply_adapters, save_adapters
from lor2c_ds.adapters import set_layout
from lor2c_ds.export import export, from_pretrained
from lor2c_ds.export.portable import ADAPTER_FILE, MODELING_FILE, adapter_source

# Loads each export with transformers alone; lor2c_ds cannot be imported in this process.
LOAD_WITHOUT_LOR2C_DS = """
import json, sys
sys.modules["lor2c_ds"] = None  # any `import lor2c_ds` raises ImportError
try:
    import lor2c_ds
except ImportError:
    pass
else:
    raise SystemExit("lor2c_ds is importable")
import torch, transformers
from safetensors.torch import load_file, save_file
for path, auto, inputs, out in json.loads(sys.argv[1]):
    model = getattr(transformers, auto).from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(**load_file(inputs)).logits.float()
    save_file({"logits": logits.contiguous(), "has_stack": torch.tensor(hasattr(model, "lor2c"))}, out)
"""

# family -> adapter config of its export (ShareLoR2C and a MergeLoR2C-changed topology among them)
ADAPTERS = {f: dict(method="lor2c", spans=[[0, 1], [2, 2]]) for f in FAMILIES}
ADAPTERS["llama"] = dict(method="share_lor2c")
ADAPTERS["bert"] = dict(method="share_lor2c", share_groups=[[0, 2], [1]], delta_at="output.LayerNorm")
MERGED = {"qwen3": {"0": [0, 1, True], "2": [2, 2, False]}}  # span 2 retired, span 0 unchanged


def _export(tmp, family):
    base, ckpt, out = tmp / f"{family}_base", tmp / f"{family}_ckpt", tmp / f"export_{family}"
    make_family(family).save_pretrained(base)
    model = apply_adapters(make_family(family), AdapterConfig(r=4, alpha=8, **ADAPTERS[family]))
    if family in MERGED:
        set_layout(model, {"spans": MERGED[family]})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    save_adapters(model, ckpt)
    report = export(ckpt, base, out, parity_batches=1)
    assert report["parity"]["passed"], report["parity"]
    return out


@pytest.fixture(scope="module")
def portable_loads(tmp_path_factory):
    """Every family exported, its lor2c_ds.from_pretrained logits, and the same export loaded without lor2c_ds."""
    tmp = tmp_path_factory.mktemp("portable")
    ids = family_input_ids()
    jobs, expected = [], {}
    for family in FAMILIES:
        out = _export(tmp, family)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        save_file(inputs, str(tmp / f"{family}_inputs.safetensors"))
        with torch.no_grad():
            expected[family] = from_pretrained(out)(**inputs).logits.float()
        auto = "AutoModelForSequenceClassification" if family in ENCODERS else "AutoModelForCausalLM"
        jobs.append([str(out), auto, str(tmp / f"{family}_inputs.safetensors"), str(tmp / f"{family}_got.safetensors")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LOR2C_DS, json.dumps(jobs)], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, expected


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_without_lor2c_ds(portable_loads, family):
    tmp, expected = portable_loads
    got = load_file(str(tmp / f"{family}_got.safetensors"))
    assert bool(got["has_stack"])
    torch.testing.assert_close(got["logits"], expected[family], rtol=0, atol=1e-6)
    base = make_family(family)
    with torch.no_grad():
        plain = base(input_ids=family_input_ids()).logits
    assert (plain - expected[family]).abs().max() > 1e-3  # the shortcuts are in the loaded model
    config = json.loads((tmp / f"export_{family}" / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"].startswith("modeling_lor2c.")


def test_portable_code_is_the_adapter_source():
    import ast
    import inspect

    from lor2c_ds.adapters import lor2c, lora

    source = adapter_source()
    assert inspect.getsource(lor2c).split("from .lora import init_low_rank\n")[1] in source
    assert inspect.getsource(lora.init_low_rank) in source
    imports = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names} | {
        n.module for n in imports if isinstance(n, ast.ImportFrom)}
    assert all(n.level == 0 for n in imports if isinstance(n, ast.ImportFrom))
    assert modules == {"__future__", "functools", "math", "torch", "torch.nn"} or modules == {
        "__future__", "functools", "math", "torch"}, modules


def test_without_trust_remote_code_it_still_refuses(tmp_path):
    import transformers

    out = _export(tmp_path, "mistral")
    assert {p.name for p in out.iterdir()} >= {ADAPTER_FILE, MODELING_FILE}
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
