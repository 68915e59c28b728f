"""lor2c_ds: LoR2C, ShareLoR2C and LoRA fine-tuning on a ZeRO-3 sharded frozen backbone."""
from .adapters import (AdapterConfig, ConfigError, apply_adapters, load_adapters, save_adapters,
                       trainable_summary)
from .registry import ArchSpec, Projection, register_architecture

__all__ = ["AdapterConfig", "ConfigError", "apply_adapters", "load_adapters", "save_adapters",
           "trainable_summary", "ArchSpec", "Projection", "register_architecture"]
__version__ = "0.1.0"
