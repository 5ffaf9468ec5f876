"""A 4-bit or 8-bit base (bitsandbytes) under the adapter: QLoRA for LoRA / DoRA, QPiSSA for PiSSA / BA-LoRA.

PEFT refuses to run PiSSA's SVD on quantised weights ("initialize PiSSA under float32 ... subsequently
re-quantize the residual model"), so this follows PEFT's own recipe for every method, one flow:

1. build the adapter on the full-precision model (`build_peft_model`: PiSSA splits W into W_res + B0·A0);
2. save the initial adapter (as a plain LoRA config) and the base as it now is (W_res for PiSSA, W otherwise);
3. reload that base quantised (``BitsAndBytesConfig``) and put the initial adapter on it, trainable.

The pre-trained model of BA-LoRA's consistency term is then **Quant(W_res) + B0·A0**: the quantised model
at step 0, which is what the student starts from and what the snapshot holds (`balora.core.reference`).
It differs from the full-precision W by the quantisation error of W_res; PiSSA's point is that this error
is smaller than Quant(W)'s, because the principal part B0·A0 stays in full precision.
`quantization_gap` measures both on a batch (docs/guide/distributed.md has the figures).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from balora.core.export import save_initial_adapter
from balora.core.reference import ReferenceSnapshot

BITS = (4, 8)
# Classification heads stay in full precision (a fresh head is trained in full: modules_to_save), and so
# does the output layer, as transformers does by default (an explicit list replaces its default): a tied
# lm_head (SmolLM2) would otherwise become a 4-bit layer whose weight is still the embeddings' (bitsandbytes
# then fails its shape assertion), and the logit-free NLG path reads that weight directly.
SKIP_MODULES = ["classifier", "score", "lm_head"]


def bnb_config(bits: int, compute_dtype: torch.dtype = torch.float32) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``bits`` (4: NF4 with double quantisation, as QLoRA; 8: LLM.int8)."""
    from transformers import BitsAndBytesConfig

    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=SKIP_MODULES)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES)


def quantize_base(peft_model: PeftModel, bits: int, load: Callable[..., nn.Module],
                  compute_dtype: torch.dtype = torch.float32) -> PeftModel:
    """``peft_model`` (built by `build_peft_model` on a full-precision model) on a ``bits``-bit copy of its
    base: the same initial adapter, the same step-0 snapshot, the base quantised after the adapter's
    initialisation. ``load(path, quantization_config=...)`` loads a saved base (the model's
    ``from_pretrained``). ``peft_model`` is consumed (its base is unloaded)."""
    from peft import prepare_model_for_kbit_training

    init_lora_weights = peft_model.peft_config[peft_model.active_adapter].init_lora_weights
    snapshot = ReferenceSnapshot.for_peft_model(peft_model)
    with tempfile.TemporaryDirectory(prefix="balora-quantize-") as tmp:
        save_initial_adapter(peft_model, Path(tmp) / "initial", snapshot)
        base = peft_model.unload()  # W_res for PiSSA (the adapter's part stays in the saved initial adapter)
        base.save_pretrained(Path(tmp) / "base")
        del base, peft_model
        quantized = load(str(Path(tmp) / "base"), quantization_config=bnb_config(bits, compute_dtype))
        quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
        model = PeftModel.from_pretrained(quantized, str(Path(tmp) / "initial"), is_trainable=True)
    _keep_cpu_4bit_trainable(model)
    # The adapter's own method again (PiSSA's artefacts are converted against the step-0 factors).
    model.peft_config[model.active_adapter].init_lora_weights = init_lora_weights
    loaded = ReferenceSnapshot.from_model(model)
    for name, tensor in snapshot.tensors.items():  # what the quantised student starts from, checked
        if name not in loaded.tensors or not torch.equal(loaded.tensors[name].cpu(), tensor.cpu().to(
                loaded.tensors[name].dtype)):
            raise RuntimeError(f"the reloaded initial adapter differs from the step-0 snapshot at {name!r}")
    loaded.attach(model)
    return model


def _keep_cpu_4bit_trainable(model: nn.Module) -> None:
    # bitsandbytes (0.50) repacks a 4-bit weight for an inference-only CPU kernel on the first eval-mode,
    # no-grad forward; after that, no gradient reaches the adapter. BA-LoRA's reference pass is exactly such
    # a forward between training steps, so the repacking is switched off (measured: grads None without this).
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def quantization_gap(full: nn.Module, quantized: nn.Module, **inputs: Any) -> dict[str, float]:
    """Mean and max absolute logit difference between a full-precision model and a quantised one on a batch."""
    a = full(**inputs).logits.float()
    b = quantized(**inputs).logits.float()
    diff = (a - b).abs()
    return {"mean_abs": diff.mean().item(), "max_abs": diff.max().item(), "logit_scale": a.abs().mean().item()}
