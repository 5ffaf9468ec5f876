"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on transformers + PEFT.

Public names are imported lazily, so that light commands (``balora assets list``) do not pay for
importing torch, transformers and PEFT.
"""

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


def _drop_bitsandbytes_kernel_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes logs, when PEFT or transformers import it on an AVX-512 BF16 CPU, that an optional faster
    # kernel package is missing (it uses its own). One known record, dropped unless `balora -v`; installed here
    # because PEFT imports bitsandbytes before any other balora module runs (balora.training.quiet lists it).
    return logging.getLogger("balora").isEnabledFor(logging.INFO) or not str(record.msg).startswith(
        "Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_kernel_notice)

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
