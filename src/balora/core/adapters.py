"""Build the PEFT model for a named method. PEFT does the adapters (PiSSA, DoRA, rsLoRA); this module
only chooses its options and makes the PiSSA initialisation reproducible.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from torch import nn

from balora.core.config import ALL_LINEAR, AdapterConfig
from balora.core.reference import ReferenceSnapshot

logger = logging.getLogger(__name__)

# Leaf names of the projections that Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2, Gemma...) use.
LLAMA_STYLE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Heads that PEFT's SEQ_CLS task keeps trainable (a fresh head has nothing to adapt from).
CLASSIFIER_HEADS = ("classifier", "score")


def default_target_modules(model: nn.Module, task: str) -> list[str]:
    """Attention and MLP projections for Llama-style models; every linear layer (but the output
    layer / classification head) otherwise, as in the paper's NLU runs."""
    linear_names = {name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    leaves = {name.rsplit(".", 1)[-1] for name in linear_names}
    if set(LLAMA_STYLE_TARGETS) <= leaves:
        return list(LLAMA_STYLE_TARGETS)
    excluded: set[str] = set(CLASSIFIER_HEADS)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, mod in model.named_modules():
        if mod is output or name.split(".")[0] in CLASSIFIER_HEADS:
            excluded.add(name)
    targets = sorted(
        name for name in linear_names if name not in excluded and name.split(".")[0] not in CLASSIFIER_HEADS
    )
    if not targets:
        raise ValueError(f"no nn.Linear layers to adapt in {type(model).__name__}; set adapter.target_modules")
    return targets


def lora_config_for(adapter: AdapterConfig, model: nn.Module, task: str) -> LoraConfig:
    """The PEFT `LoraConfig` for ``adapter.method``. ``adapter.target_modules`` goes to PEFT as given: a list
    (suffix matching), ``"all-linear"`` or a regular expression (a full match of the module name)."""
    if adapter.pissa:
        init: Any = "pissa" if adapter.pissa_niter is None else f"pissa_niter_{adapter.pissa_niter}"
    else:
        init = True  # PEFT's default: Kaiming-uniform A, zero B (the "gaussian" LoRA of the paper)
    task_type = TaskType.CAUSAL_LM if task == "nlg" else TaskType.SEQ_CLS
    modules_to_save = adapter.modules_to_save
    if modules_to_save is None and task == "nlu":
        modules_to_save = [name for name in CLASSIFIER_HEADS if hasattr(model, name)]
    return LoraConfig(
        task_type=task_type,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=_targets(adapter.target_modules) or default_target_modules(model, task),
        init_lora_weights=init,
        use_dora=adapter.method == "dora",
        use_rslora=adapter.method == "rslora",
        modules_to_save=modules_to_save or None,
        bias="none",
    )


def _targets(target_modules: list[str] | str | None) -> list[str] | str | None:
    """A list copied (PEFT turns it into a set), a string as given (``all-linear`` in PEFT's lower case)."""
    if isinstance(target_modules, str):
        return ALL_LINEAR if target_modules.lower() == ALL_LINEAR else target_modules
    return list(target_modules) if target_modules else None


def _describe_targets(target_modules: Any) -> str:
    return target_modules if isinstance(target_modules, str) else ", ".join(sorted(target_modules or ()))


def build_peft_model(model: nn.Module, adapter: AdapterConfig, task: str = "nlg") -> PeftModel:
    """Wrap ``model`` with the adapter of ``adapter.method``.

    The randomised parts (gaussian A, ``pissa_niter_N``'s random sketch, a fresh classification head
    is created by the caller) are drawn under ``adapter.init_seed`` in a forked RNG, so that every
    process and every rebuild gets the same adapter and the same PiSSA residual, without touching
    the caller's random stream.
    """
    config = lora_config_for(adapter, model, task)
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0 if adapter.init_seed is None else adapter.init_seed)
        with warnings.catch_warnings():
            if not logger.isEnabledFor(logging.INFO):  # PEFT reads transformers 5's deprecated alias; -v shows it
                warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
            peft_model = get_peft_model(model, config)
    # The initial trainable tensors are the reference model's (see balora.core.reference); record them now,
    # before any training or checkpoint loading can change them.
    ReferenceSnapshot.from_model(peft_model).attach(peft_model)
    logger.info("built %s adapter (r=%d, alpha=%s) on %s", adapter.method, adapter.r, adapter.alpha,
                _describe_targets(config.target_modules))
    return peft_model


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
