"""Merge-on-save export: one consolidated checkpoint from a (sharded) training run.

Every mergeable delta is folded into the backbone weights: any adapter module attached under a
projection that exposes `delta_weight()` (Linear layout, d_out x d_in; `chunk`/`chunks` for fused
projections; `exact_merge = False`, or a `merge_rule` other than "exact", marks an approximate
merge such as ResLoRA is/ms). LoR2C shortcuts
cannot be folded: they are kept as tensors in the same shards, listed in a `lor2c_export` section of
config.json, whose `model_type` is renamed so that a plain `AutoModel*.from_pretrained` fails loudly
instead of dropping them. `from_pretrained` here loads such an export in one call.

The merge streams: the adapted model is built on the meta device (no weights), the adapters are
loaded (small), then every output tensor is read from the base safetensors, folded, cast and written
straight into its shard, one tensor at a time. No DeepSpeed process is needed: a ZeRO-3 checkpoint
already holds the trainable tensors gathered whole (`adapter_model.safetensors`).
"""
from .background import export_run_checkpoint, wait_for_exports
from .load import SECTION, from_pretrained
from .merge import DTYPES, ExportError, check_out, export, find_train_config, resolve_checkpoint
from .safetensors_io import INDEX_NAME

__all__ = ["DTYPES", "ExportError", "INDEX_NAME", "SECTION", "check_out", "export", "export_run_checkpoint",
           "wait_for_exports", "find_train_config", "from_pretrained", "resolve_checkpoint"]
