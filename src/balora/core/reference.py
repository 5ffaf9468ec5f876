"""Outputs of the *pre-trained* model, produced by the model being trained.

After PiSSA the frozen base weight is the residual W_res = W − s·B0·A0; disabling the adapter gives
W_res, not W (the authors' code makes this mistake). The pre-trained model is the student with its
*initial* trainable tensors: W_res + s·B0·A0 = W. For gaussian LoRA (B0 = 0) and DoRA (initial
magnitude = ‖W‖) the same holds, and for NLU the initial classification head is the reference head.

So the reference is a frozen snapshot of the initial trainable tensors (the adapter factors and any
`modules_to_save` head), swapped in with `torch.func.functional_call` for one no-grad forward pass.
No second copy of the base weights is held; the snapshot costs one adapter's worth of memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

INITIAL_STATE_ATTR = "_balora_initial_state"


class ReferenceSnapshot:
    """Frozen copies of a model's trainable tensors at the moment of creation (= step 0)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors: dict[str, torch.Tensor] = {n: t.detach().clone() for n, t in tensors.items()}
        for tensor in self.tensors.values():
            tensor.requires_grad_(False)

    @classmethod
    def from_model(cls, model: nn.Module) -> ReferenceSnapshot:
        """Snapshot the trainable parameters of ``model`` as they are now."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("the model has no trainable parameters: build the adapter before the reference snapshot")
        return cls(trainable)

    @classmethod
    def for_peft_model(cls, model: nn.Module) -> ReferenceSnapshot:
        """The snapshot recorded by `balora.build_peft_model` at construction, else one taken now."""
        recorded = getattr(model, INITIAL_STATE_ATTR, None)
        return recorded if recorded is not None else cls.from_model(model)

    def attach(self, model: nn.Module) -> None:
        # A plain attribute (not a buffer): it must not be saved with the adapter or seen by the optimiser.
        object.__setattr__(model, INITIAL_STATE_ATTR, self)

    def matching(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The snapshot on the device and dtype of ``model``'s parameters (moved once, then reused)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise KeyError(f"reference snapshot names {missing[:3]}... are not parameters of {type(model).__name__}")
        for name, tensor in self.tensors.items():
            p = params[name]
            if tensor.device != p.device or tensor.dtype != p.dtype:
                self.tensors[name] = tensor.to(device=p.device, dtype=p.dtype)
        return self.tensors

    def fingerprint(self) -> str:
        """A hash of the snapshot's values, to check that every process holds the same reference."""
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            digest.update(name.encode())
            digest.update(self.tensors[name].detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off and, in transformers models, gradient checkpointing off (it only runs in training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def reference_forward(model: nn.Module, snapshot: ReferenceSnapshot, **inputs: Any) -> Any:
    """``model(**inputs)`` with the snapshot's tensors in place of the trainable ones, in eval mode
    and without building a graph. ``model`` must be the unwrapped model (not DDP)."""
    with eval_mode(model):
        return functional_call(model, snapshot.matching(model), args=(), kwargs=inputs, strict=False)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, **inputs: Any) -> Any:
    """Forward pass of an explicit frozen teacher model (the authors' approach: a second full copy)."""
    with eval_mode(teacher):
        return teacher(**inputs)
