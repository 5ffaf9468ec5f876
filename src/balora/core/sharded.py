"""Tensors that an engine may have sharded: FSDP2 turns parameters into `DTensor`s (each rank holds a
shard). balora reads a few parameters outside the model's forward (the frozen output layer of the
logit-free path, the reference snapshot) and saves the adapter; these helpers give them whole."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a `DTensor` (FSDP2, tensor parallelism)."""
    return isinstance(tensor, DTensor)


def is_partitioned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DeepSpeed ZeRO-3 placeholder: tagged with ``ds_id``, empty outside
    DeepSpeed's own gather context."""
    return hasattr(tensor, "ds_id") and tensor.numel() == 0


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a `DTensor` gathered from every rank (a collective: all ranks must call it
    together), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every tensor whole: under FSDP2 a collective gather (every rank calls
    it; each gets the full dict), otherwise the plain state dict. For the savers (`balora.core.export`),
    whose PEFT calls would otherwise meet sharded tensors."""
    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def layers_to_wrap_without_embeddings(model: nn.Module, names: list[str] | None) -> list[str] | None:
    """The layer classes accelerate's FSDP2 ``TRANSFORMER_BASED_WRAP`` should shard for ``model``: ``names``
    (the plugin's list; the model's ``_no_split_modules`` when None) without those that contain the input
    embeddings, or None when none does (nothing to change).

    accelerate 1.16 shards every listed module and then the input embeddings as a unit of their own; when
    the embeddings sit inside a listed module (BERT's ``BertEmbeddings``) the second ``fully_shard`` meets
    a parameter that is already a DTensor and fails deep inside torch. The embeddings keep their own unit."""
    names = list(names) if names is not None else list(getattr(model, "_no_split_modules", None) or [])
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None:
        return None
    owners = {type(m).__name__ for m in model.modules()
              if type(m).__name__ in names and m is not embeddings and any(c is embeddings for c in m.modules())}
    return [n for n in names if n not in owners] if owners else None
