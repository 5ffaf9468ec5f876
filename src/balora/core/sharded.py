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
