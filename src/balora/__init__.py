"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on transformers + PEFT.

Public names are imported lazily, so that light commands (``balora assets list``) do not pay for
importing torch, transformers and PEFT.
"""

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"


# Two known records that optional packages log while PEFT / transformers / accelerate import them, dropped
# unless `balora -v` (balora.training.quiet lists them); installed here, before anything imports those
# packages: bitsandbytes on an AVX-512 BF16 CPU (an optional faster kernel package is missing; it uses its
# own), and DeepSpeed on a machine without a GPU (it detects the CPU and says so).
_KNOWN_RECORDS = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
}


def _known_record_filter(prefix: str) -> Any:
    def keep(record: logging.LogRecord) -> bool:
        return logging.getLogger("balora").isEnabledFor(logging.INFO) or not str(record.msg).startswith(prefix)
    return keep


for _name, _prefix in _KNOWN_RECORDS.items():
    logging.getLogger(_name).addFilter(_known_record_filter(_prefix))

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
