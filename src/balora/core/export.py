"""What a trained BA-LoRA / PiSSA model is saved as, and how each artefact is loaded again.

* ``adapter/``, on the untouched pre-trained model: `load_trained` (PEFT re-runs the PiSSA SVD on
  load, turning W into W_res, then loads A, B).
* ``lora_converted/``, on the untouched pre-trained model: plain ``PeftModel.from_pretrained``; a rank 2r
  LoRA, ΔW = BA − B0A0, no SVD, mixes with other LoRAs.
* ``merged/``, a full model: ``AutoModel*.from_pretrained``.

The PiSSA ``adapter/`` must never be loaded onto a model that is already the residual, and the
``lora_converted/`` one never onto the residual either: both expect the untouched W.

Modules trained in full (``modules_to_save``: a classification head) travel in every artefact, so that
each reproduces the trained model on the untouched base with a fresh head of the same shape.
``base_model_name_or_path`` (an argument of the savers) is what ``adapter_config.json`` records as the
base model: the id a user elsewhere can load (a hub id), not the path it was loaded from here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from balora.core.reference import ReferenceSnapshot

METADATA_FILE = "balora_adapter.json"


def _adapter_name(peft_model: PeftModel) -> str:
    return peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else "default"


def _is_pissa(peft_model: PeftModel) -> bool:
    init = peft_model.peft_config[_adapter_name(peft_model)].init_lora_weights
    return str(init).lower().startswith("pissa")


@contextlib.contextmanager
def _recorded_base(peft_model: PeftModel, base_model_name_or_path: str | None) -> Iterator[None]:
    """While saving, every adapter config names ``base_model_name_or_path`` (when given) as its base."""
    if not base_model_name_or_path:
        yield
        return
    configs = list(peft_model.peft_config.values())
    original = [config.base_model_name_or_path for config in configs]
    for config in configs:
        config.base_model_name_or_path = base_model_name_or_path
    try:
        yield
    finally:
        for config, name in zip(configs, original):
            config.base_model_name_or_path = name


def save_adapter(peft_model: PeftModel, directory: str | Path, metadata: dict[str, Any] | None = None, *,
                 base_model_name_or_path: str | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                 ) -> Path:
    """The trained PEFT adapter, plus ``balora_adapter.json`` (method, init seed, the base model's id
    and asset) for `load_trained`. ``state_dict``: the model's whole state dict when its parameters are
    sharded (`balora.core.sharded.full_state_dict`), else read from the model."""
    directory = Path(directory)
    with _recorded_base(peft_model, base_model_name_or_path):
        peft_model.save_pretrained(directory, **({} if state_dict is None else {"state_dict": state_dict}))
    (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True))
    return directory


def save_initial_adapter(peft_model: PeftModel, directory: str | Path,
                         snapshot: ReferenceSnapshot | None = None,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The adapter as it was at step 0 (from the reference snapshot), configured as a plain LoRA
    (``init_lora_weights=True``) as PEFT's PiSSA → LoRA conversion requires."""
    snapshot = snapshot or ReferenceSnapshot.for_peft_model(peft_model)
    state = dict(peft_model.state_dict() if state_dict is None else state_dict)
    state.update({name: t.to(state[name].device, state[name].dtype) for name, t in snapshot.tensors.items()})
    config = peft_model.peft_config[_adapter_name(peft_model)]
    original_init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model.save_pretrained(directory, state_dict=state)
    finally:
        config.init_lora_weights = original_init
    return Path(directory)


def _add_trained_modules(peft_model: PeftModel, directory: Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Put the tensors of the adapter that are not LoRA factors (``modules_to_save``: the trained
    classification head) into ``directory``'s weights, where PEFT's PiSSA → LoRA conversion leaves
    them out; returns their names."""
    trained = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=_adapter_name(peft_model))
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    extra = {name: t.detach().to("cpu").contiguous().clone() for name, t in trained.items()
             if name not in tensors and "lora_A" not in name and "lora_B" not in name}
    if extra:
        save_file({**tensors, **extra}, path, metadata={"format": "pt"})
    return sorted(extra)


def save_converted_lora(peft_model: PeftModel, directory: str | Path,
                        snapshot: ReferenceSnapshot | None = None, *,
                        base_model_name_or_path: str | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A plain LoRA adapter that reproduces the trained model on the *untouched* base model.

    For PiSSA adapters this is PEFT's conversion (rank 2r: [A; A0], [B, −B0]) plus the modules
    trained in full (``modules_to_save``, e.g. the classification head), which the conversion drops;
    other methods are plain LoRA / DoRA already and are saved as they are.
    """
    directory = Path(directory)
    given = {} if state_dict is None else {"state_dict": state_dict}
    with _recorded_base(peft_model, base_model_name_or_path):
        if not _is_pissa(peft_model):
            peft_model.save_pretrained(directory, **given)
            return directory
        with tempfile.TemporaryDirectory() as tmp:
            initial = Path(tmp) / "initial_adapter"
            save_initial_adapter(peft_model, initial, snapshot, state_dict)
            peft_model.save_pretrained(directory, path_initial_model_for_weight_conversion=str(initial), **given)
    _add_trained_modules(peft_model, directory, state_dict)
    return directory


def save_converted_lora_from_adapter(base_model: nn.Module, adapter_dir: str | Path, directory: str | Path,
                                    snapshot: ReferenceSnapshot, *,
                                    base_model_name_or_path: str | None = None) -> Path:
    """`save_converted_lora` for a model whose parameters are sharded (FSDP2): PEFT's conversion loads
    a second adapter into the model, which a sharded model cannot take, so the saved ``adapter_dir`` is
    loaded onto the untouched ``base_model`` (one process, `load_trained`: the same PiSSA residual) and
    converted there, with ``snapshot`` (the training's step-0 tensors, whole) as the initial adapter."""
    plain = load_trained(base_model, adapter_dir)
    return save_converted_lora(plain, directory, snapshot, base_model_name_or_path=base_model_name_or_path)


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
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        if not logging.getLogger("balora").isEnabledFor(logging.INFO):  # -v shows it
            # PEFT reads transformers 5's deprecated alias while wrapping (as in build_peft_model): nothing to do
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
        torch.manual_seed(int(meta.get("init_seed", 0)))
        return PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
