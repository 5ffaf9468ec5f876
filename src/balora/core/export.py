"""What a trained BA-LoRA / PiSSA model is saved as, and how each artefact is loaded again.

* ``adapter/``, on the untouched pre-trained model: `load_trained` (PEFT re-runs the PiSSA SVD on
  load, turning W into W_res, then loads A, B).
* ``lora_converted/``, on the untouched pre-trained model: plain ``PeftModel.from_pretrained``; a rank 2r
  LoRA, ΔW = BA − B0A0, no SVD, mixes with other LoRAs.
* ``merged/``, a full model: ``AutoModel*.from_pretrained``.

The PiSSA ``adapter/`` must never be loaded onto a model that is already the residual, and the
``lora_converted/`` one never onto the residual either: both expect the untouched W.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from balora.core.reference import ReferenceSnapshot

METADATA_FILE = "balora_adapter.json"


def _adapter_name(peft_model: PeftModel) -> str:
    return peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else "default"


def _is_pissa(peft_model: PeftModel) -> bool:
    init = peft_model.peft_config[_adapter_name(peft_model)].init_lora_weights
    return str(init).lower().startswith("pissa")


def save_adapter(peft_model: PeftModel, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """The trained PEFT adapter, plus ``balora_adapter.json`` (method, init seed) for `load_trained`."""
    directory = Path(directory)
    peft_model.save_pretrained(directory)
    (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True))
    return directory


def save_initial_adapter(peft_model: PeftModel, directory: str | Path,
                         snapshot: ReferenceSnapshot | None = None) -> Path:
    """The adapter as it was at step 0 (from the reference snapshot), configured as a plain LoRA
    (``init_lora_weights=True``) as PEFT's PiSSA → LoRA conversion requires."""
    snapshot = snapshot or ReferenceSnapshot.for_peft_model(peft_model)
    state = peft_model.state_dict()
    state.update({name: t.to(state[name].device, state[name].dtype) for name, t in snapshot.tensors.items()})
    config = peft_model.peft_config[_adapter_name(peft_model)]
    original_init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(directory, state_dict=state)
    finally:
        config.init_lora_weights = original_init
    return Path(directory)


def save_converted_lora(peft_model: PeftModel, directory: str | Path,
                        snapshot: ReferenceSnapshot | None = None) -> Path:
    """A plain LoRA adapter that reproduces the trained model on the *untouched* base model.

    For PiSSA adapters this is PEFT's conversion (rank 2r: [A; A0], [B, −B0]); other methods are
    plain LoRA / DoRA already and are saved as they are.
    """
    directory = Path(directory)
    if not _is_pissa(peft_model):
        peft_model.save_pretrained(directory)
        return directory
    with tempfile.TemporaryDirectory() as tmp:
        initial = Path(tmp) / "initial_adapter"
        save_initial_adapter(peft_model, initial, snapshot)
        peft_model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(initial))
    return directory


def save_merged(peft_model: PeftModel, directory: str | Path, tokenizer: Any = None) -> Path:
    """The full fine-tuned model (adapter merged into W_res, i.e. W + ΔW). Works on a copy, so the
    caller's model stays usable; peak memory is two models for the duration of the call."""
    merged = copy.deepcopy(peft_model).merge_and_unload(safe_merge=True)
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return Path(directory)


def load_trained(base_model: nn.Module, adapter_dir: str | Path, is_trainable: bool = False) -> PeftModel:
    """Load ``adapter/`` (any method) onto the *untouched* pre-trained ``base_model``.

    PEFT rebuilds the PiSSA residual while loading; for the randomised ``pissa_niter_N`` init the
    seed recorded at training time makes the rebuilt residual identical.
    """
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    devices = [torch.device("cuda", torch.cuda.current_device())] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(meta.get("init_seed", 0)))
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
