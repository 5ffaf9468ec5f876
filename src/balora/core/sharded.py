"""Tensors that an engine may have sharded: FSDP2 turns parameters into `DTensor`s (each rank holds a
shard). balora reads a few parameters outside the model's forward (the frozen output layer of the
logit-free path, the reference snapshot); these helpers give them whole."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a `DTensor` (FSDP2, tensor parallelism)."""
    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a `DTensor` gathered from every rank (a collective: all ranks must call it
    together), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
