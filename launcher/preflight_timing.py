"""How long lor2c-train's pre-flight takes on a recipe, and whether a rank's data preparation after it
reuses its tokenization (README, "Bad input and failing ranks").

    python -m launcher.preflight_timing RECIPE.yaml

Prints pre-flight with an empty `datasets` cache (cold), pre-flight again (warm), and `prepare_data`
in a fresh process on that cache, as a rank runs it after pre-flight.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time


def _prepare_in_new_process(recipe: str) -> None:
    from lor2c_ds.config import load_config
    from lor2c_ds.data import prepare_data
    from lor2c_ds.train import load_tokenizer

    cfg = load_config(recipe)
    start = time.perf_counter()
    prepare_data(cfg, load_tokenizer(cfg.model))
    print(f"{recipe}: prepare_data in a new process {time.perf_counter() - start:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--prepare":
        _prepare_in_new_process(argv[1])
        return 0
    recipe = argv[0]
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="preflight_timing_hf_")
    from launcher.train import preflight
    from lor2c_ds.config import load_config

    for label in ("cold", "warm"):
        cfg = load_config(recipe, [f"output_dir={tempfile.mkdtemp(prefix='preflight_timing_out_')}/run"])
        start = time.perf_counter()
        preflight(cfg, env={})
        print(f"{recipe}: pre-flight {label} {time.perf_counter() - start:.1f} s", flush=True)
    subprocess.run([sys.executable, "-m", "launcher.preflight_timing", "--prepare", recipe], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
