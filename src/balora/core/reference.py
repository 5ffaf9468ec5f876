"""Outputs of the *pre-trained* model, produced by the model being trained.

After PiSSA the frozen base weight is the residual W_res = W − s·B0·A0; disabling the adapter gives
W_res, not W (the authors' code makes this mistake). The pre-trained model is the student with its
*initial* trainable tensors: W_res + s·B0·A0 = W. For gaussian LoRA (B0 = 0) and DoRA (initial
magnitude = ‖W‖) the same holds, and for NLU the initial classification head is the reference head.

So the reference is a frozen snapshot of the initial trainable tensors (the adapter factors and any
`modules_to_save` head), swapped in for one no-grad forward pass. No second copy of the base weights is
held; the snapshot costs one adapter's worth of memory.

Two ways to swap it in (`reference_forward(swap=...)`):

* ``"call"``: `torch.func.functional_call` with the snapshot in place of the parameters; nothing is
  written into the model. Default for unsharded parameters (single process, DDP, DeepSpeed ZeRO-1/2).
* ``"value"``: copy the snapshot into each parameter's storage, run the forward, copy the current
  values back (bit-exact). Under FSDP2 the parameters are sharded `DTensor`s that FSDP all-gathers
  itself before each forward, so `functional_call` cannot replace them (it fails); copying into each
  rank's *local shard* works with no engine-specific code. It must run before the student's forward of
  the same step: FSDP2 reuses the all-gathered buffers, so a later forward would overwrite tensors the
  student's backward still needs. The trainer orders it so. Default when a trainable parameter is a
  `DTensor`.

* ``"zero3"``: DeepSpeed ZeRO-3 partitions parameters into placeholders of size 0 outside its own gather
  context; the adapter's parameters are gathered, the snapshot copied in and re-partitioned, and after
  the forward the trained values are put back the same way (`zero3_swapped_in`). Default when a
  trainable parameter is managed by ZeRO-3. Any other swap on a partitioned parameter is refused
  (`SnapshotUnavailableError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.func import functional_call

from balora.core.sharded import full_tensor, is_partitioned

INITIAL_STATE_ATTR = "_balora_initial_state"
SWAPS = ("auto", "call", "value", "zero3")


class SnapshotUnavailableError(RuntimeError):
    """The snapshot reference cannot be formed for this model (e.g. partitioned by DeepSpeed ZeRO-3)."""


class ReferenceSnapshot:
    """Frozen copies of a model's trainable tensors at the moment of creation (= step 0)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        # A sharded (FSDP2) parameter is gathered whole: a collective, so every rank must snapshot together.
        self.tensors: dict[str, torch.Tensor] = {
            n: full_tensor(t).detach().clone() for n, t in tensors.items()}
        self._shards: dict[str, torch.Tensor] | None = None  # this rank's shards under FSDP2, see local_shards
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
        for name, tensor in self.matching_names(params).items():
            p = params[name]
            if tensor.device != p.device or tensor.dtype != p.dtype:
                self.tensors[name] = tensor.to(device=p.device, dtype=p.dtype)
        return self.tensors

    def local_shards(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The snapshot laid out like ``model``'s parameters: for a `DTensor` parameter (FSDP2) this rank's
        shard of the full snapshot tensor (cut once, locally: every rank holds the same full snapshot,
        taken before sharding, so ``src_data_rank=None`` needs no communication), else `matching`."""
        params = dict(model.named_parameters())
        if not any(isinstance(params.get(n), DTensor) for n in self.tensors):
            return self.matching(model)
        if self._shards is None:
            shards: dict[str, torch.Tensor] = {}
            for name, tensor in self.matching_names(params).items():
                p = params[name]
                t = tensor.to(device=p.device, dtype=p.dtype)
                shards[name] = (distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None).to_local()
                                if isinstance(p, DTensor) else t)
            self._shards = shards
        return self._shards

    def matching_names(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The snapshot, after checking that every name is a parameter of the model."""
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise KeyError(f"reference snapshot names {missing[:3]}... are not parameters of the model")
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


def resolve_swap(model: nn.Module, swap: str = "auto") -> str:
    """For ``swap="auto"``: ``"zero3"`` when a trainable parameter is managed by DeepSpeed ZeRO-3, ``"value"``
    when one is a `DTensor` (FSDP2), else ``"call"``. A partitioned parameter with another swap is refused."""
    if swap not in SWAPS:
        raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    zero3 = [n for n, p in trainable if hasattr(p, "ds_id")]
    if swap == "auto":
        if zero3:
            return "zero3"
        return "value" if any(isinstance(p, DTensor) for _, p in trainable) else "call"
    partitioned = [n for n, p in trainable if is_partitioned(p)]
    if partitioned and swap != "zero3":  # functional_call or a copy would meet DeepSpeed's empty placeholders
        raise SnapshotUnavailableError(
            f"parameter {partitioned[0]!r} is partitioned by DeepSpeed ZeRO-3: swap={swap!r} cannot put the "
            "snapshot in; use swap='zero3' (or 'auto')")
    return swap


@contextmanager
def swapped_in(model: nn.Module, snapshot: ReferenceSnapshot) -> Iterator[None]:
    """Within the block, ``model``'s trainable parameters hold the snapshot's values (copied into their
    storage, the local shard for a `DTensor`); on exit the values they had are copied back, bit for bit,
    also when the block raises."""
    params = dict(model.named_parameters())
    snap = snapshot.local_shards(model)
    targets = {n: (params[n].to_local() if isinstance(params[n], DTensor) else params[n]) for n in snap}
    with torch.no_grad():
        saved = {n: t.detach().clone() for n, t in targets.items()}
        try:
            _reshard(model)  # a module left unsharded would not see values written into its shards
            for n, t in targets.items():
                t.copy_(snap[n])
            yield
        finally:
            # FSDP2 keeps the root module unsharded after a forward without backward: free that copy of the
            # snapshot's values, or the student's next forward would reuse it (the head, under the root).
            _reshard(model)
            for n, t in targets.items():
                t.copy_(saved[n])


@contextmanager
def zero3_swapped_in(model: nn.Module, snapshot: ReferenceSnapshot) -> Iterator[None]:
    """`swapped_in` for parameters partitioned by DeepSpeed ZeRO-3: the adapter's parameters are gathered
    (`deepspeed.zero.GatheredParameters`, a collective), the snapshot copied in and re-partitioned; on exit
    gathered again and the trained values copied back. The optimiser's own fp32 partitions are not touched,
    and the values written back are the ones read, so the training state is unchanged. Costs two gathers of
    the adapter (not of the model) per reference pass."""
    import deepspeed  # only under ZeRO-3, where it is installed

    params = dict(model.named_parameters())
    names = snapshot.matching_names(params)
    handles = [params[n] for n in names]
    with torch.no_grad():
        with deepspeed.zero.GatheredParameters(handles, modifier_rank=0):
            saved = {n: params[n].detach().clone() for n in names}
            for n, tensor in names.items():
                params[n].data.copy_(tensor.to(device=params[n].device, dtype=params[n].dtype))
        try:
            yield
        finally:
            with deepspeed.zero.GatheredParameters(handles, modifier_rank=0):
                for n in names:
                    params[n].data.copy_(saved[n])


def _reshard(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@torch.no_grad()
def reference_forward(model: nn.Module, snapshot: ReferenceSnapshot, swap: str = "auto", **inputs: Any) -> Any:
    """``model(**inputs)`` with the snapshot's tensors in place of the trainable ones, in eval mode
    and without building a graph. ``model`` must be the unwrapped model (not DDP); under FSDP2 (swap
    ``"value"``) it must run before the student's forward of the step (see the module docstring)."""
    with eval_mode(model):
        how = resolve_swap(model, swap)
        if how in ("value", "zero3"):
            with (swapped_in if how == "value" else zero3_swapped_in)(model, snapshot):
                return model(**inputs)
        return functional_call(model, snapshot.matching(model), args=(), kwargs=inputs, strict=False)


@torch.no_grad()
def teacher_forward(teacher: nn.Module, **inputs: Any) -> Any:
    """Forward pass of an explicit frozen teacher model (the authors' approach: a second full copy)."""
    with eval_mode(teacher):
        return teacher(**inputs)
