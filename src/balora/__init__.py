"""balora: BA-LoRA (Bias-Alleviating Low-Rank Adaptation) on transformers + PEFT."""

from .adapters import build_peft_model, default_target_modules, lora_config_for
from .config import AdapterConfig, BALoraConfig, ConfigError
from .reference import ReferenceSnapshot, reference_forward
from .trainer import BALoraTrainer, BALoraTrainerMixin

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "BALoraConfig",
    "BALoraTrainer",
    "BALoraTrainerMixin",
    "ConfigError",
    "ReferenceSnapshot",
    "build_peft_model",
    "default_target_modules",
    "lora_config_for",
    "reference_forward",
]
