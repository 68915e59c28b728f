"""A checkpoint's size against (trainable tensors + fp32 master + Adam moments) plus metadata (the JSON
files, the RNG files, the safetensors headers): `python tests/checkpoint_size.py OUTPUT_DIR/checkpoints/step_k`."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from safetensors import safe_open


def report(tag_dir: Path) -> dict:
    with safe_open(str(tag_dir / "trainable_state.safetensors"), "pt") as f:
        numel = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("master/"))
    with safe_open(str(tag_dir / "adapter_model.safetensors"), "pt") as f:
        param_bytes = f.get_tensor(next(iter(f.keys()))).element_size()  # the training dtype
    files = [p for p in tag_dir.iterdir() if p.is_file()]
    metadata = sum(p.stat().st_size for p in files if p.suffix == ".json" or p.name.startswith("rng_state"))
    metadata += sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for p in files
                    if p.suffix == ".safetensors" and not p.name.startswith("rng_state"))
    total = sum(p.stat().st_size for p in files)
    bound = numel * (param_bytes + 4 * 3)  # the tensor in its dtype; fp32 master, exp_avg, exp_avg_sq
    return {"trainable_numel": numel, "params_plus_optimizer_bytes": bound, "metadata_bytes": metadata,
            "checkpoint_bytes": total, "ratio": (total - metadata) / bound}


if __name__ == "__main__":
    print(json.dumps(report(Path(sys.argv[1]))))
