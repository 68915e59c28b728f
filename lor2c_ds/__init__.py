"""lor2c_ds: LoR2C, ShareLoR2C and LoRA fine-tuning on a ZeRO-3 sharded frozen backbone."""
from .adapters import (AdapterConfig, ConfigError, apply_adapters, load_adapters, save_adapters,
                       trainable_summary)
from .registry import ArchSpec, Projection, register_architecture


def from_pretrained(path, **kwargs):
    """Load a `lor2c-export` directory in one call (see lor2c_ds.export.load.from_pretrained)."""
    from .export.load import from_pretrained as load

    return load(path, **kwargs)

__all__ = ["AdapterConfig", "ConfigError", "apply_adapters", "load_adapters", "save_adapters",
           "trainable_summary", "ArchSpec", "Projection", "register_architecture", "from_pretrained"]
__version__ = "0.1.0"
