"""A LoRA / LoHa / LoKr / OFT trainer for diffusion models on Hugging Face Accelerate."""

from importlib import import_module

__all__ = ["ConfigError", "TrainConfig", "TrainResult", "TrainerError", "train_lora"]

# torch, diffusers and datasets take seconds to import: load them on first use, so that
# `train.py --help` and parameter errors answer at once.
_LAZY = {"train_lora": ".api", "TrainConfig": ".config", "ConfigError": ".errors", "TrainerError": ".errors",
         "TrainResult": ".loop"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
