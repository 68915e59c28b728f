"""What is planned: the cluster, the workload, the layouts and ZeRO knobs the model reads, and the
planner's error. The model and its formulas: the docstring of lor2c_ds/planner/__init__.py."""
from __future__ import annotations

from dataclasses import dataclass, field

GiB = 1 << 30
LAYOUTS = ("zero2", "zero3", "hpz", "mics")
RUNNABLE = ("zero2", "zero3", "hpz")  # MiCS is gone from DeepSpeed 0.19
DECODER_FAMILIES = ("llama", "mistral", "qwen2")
ENCODER_FAMILIES = ("bert", "roberta")
# ds_configs/zero3.json: the knobs the gather model reads
DEFAULT_ZERO = {"stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9,
                "stage3_max_reuse_distance": 1e9, "reduce_bucket_size": 5e7}


class PlanError(ValueError):
    """The input cannot be planned (unknown model, bad numbers, does not fit anywhere)."""


@dataclass
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    net_gbps: float  # inter-node, per node (all its NICs), Gbit/s
    intra_gbps: float = 2400.0  # per GPU inside a node (NVLink 3: 300 GB/s per direction), Gbit/s
    gpu_tflops: float = 200.0  # sustained dense TFLOP/s per GPU in the working precision
    reserve_gib: float | None = None  # None: 1 GiB + 5% of the GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        reserve = self.reserve_gib if self.reserve_gib is not None else 1.0 + 0.05 * self.gpu_mem_gib
        return (self.gpu_mem_gib - reserve) * GiB

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {getattr(self, key)!r}")
        for key in ("gpu_mem_gib", "net_gbps", "intra_gbps", "gpu_tflops"):
            if not getattr(self, key) > 0:
                raise PlanError(f"{key} must be positive, got {getattr(self, key)!r}")
        if self.usable_bytes <= 0:
            raise PlanError(f"--gpu-mem {self.gpu_mem_gib} GiB leaves nothing after the "
                            f"{self.gpu_mem_gib - self.usable_bytes / GiB:.1f} GiB reserve")


@dataclass
class Workload:
    method: str = "lor2c"
    r: int = 8
    seq: int = 2048
    micro_batch: int = 1
    precision: str = "bf16"
    task: str | None = None  # None: causal_lm for decoders, classification for encoders
    activation_checkpointing: bool | None = None  # None: the planner chooses
    adapter: dict = field(default_factory=dict)  # other AdapterConfig fields (dropout, targets, ...)
    attention: str = "flash"  # "flash" (GPU fused kernels) or "math" (CPU SDPA math path for encoders)
    num_labels: int = 2

    @property
    def elt(self) -> int:
        return 2 if self.precision == "bf16" else 4

    def validate(self) -> None:
        if self.precision not in ("bf16", "fp32"):
            raise PlanError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        for key in ("r", "seq", "micro_batch"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise PlanError(f"--{key.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.task not in (None, "causal_lm", "classification"):
            raise PlanError(f"--task must be causal_lm or classification, got {self.task!r}")

    def adapter_config(self):
        from ..adapters import AdapterConfig, ConfigError

        raw = {"method": self.method, "r": self.r, "alpha": 2.0 * self.r, **self.adapter}
        try:
            return AdapterConfig.from_dict(raw)
        except (ConfigError, TypeError) as e:
            raise PlanError(f"adapter: {e}") from None

