"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on transformers + PEFT.

Public names are imported lazily, so that light commands (``balora assets list``) do not pay for
importing torch, transformers and PEFT.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "core.config",
    "BALoraConfig": "core.config",
    "ConfigError": "core.config",
    "build_peft_model": "core.adapters",
    "default_target_modules": "core.adapters",
    "lora_config_for": "core.adapters",
    "ReferenceSnapshot": "core.reference",
    "reference_forward": "core.reference",
    "BALoraTrainer": "training.trainer",
    "BALoraTrainerMixin": "training.trainer",
    "load_trained": "core.export",
    "save_adapter": "core.export",
    "save_converted_lora": "core.export",
    "save_merged": "core.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'balora' has no attribute {name!r}")
