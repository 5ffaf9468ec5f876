"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on transformers + PEFT.

Public names are imported lazily, so that light commands (``balora assets list``) do not pay for
importing torch, transformers and PEFT.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterConfig": "config",
    "BALoraConfig": "config",
    "ConfigError": "config",
    "build_peft_model": "adapters",
    "default_target_modules": "adapters",
    "lora_config_for": "adapters",
    "ReferenceSnapshot": "reference",
    "reference_forward": "reference",
    "BALoraTrainer": "trainer",
    "BALoraTrainerMixin": "trainer",
    "load_trained": "export",
    "save_adapter": "export",
    "save_converted_lora": "export",
    "save_merged": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'balora' has no attribute {name!r}")
