"""Trains a tiny model with balora's trainer under FSDP2 (`fully_shard`, gloo on CPU), or in one process
with the same global batch; used by test_fsdp.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py OUT fsdp ba-lora:nlg,pissa:nlu,...
    python tests/fsdp_train.py OUT single ba-lora:nlg,pissa:nlu,...

accelerate enables FSDP only on accelerator devices (its state falls back to DDP on CPU), so on this CPU
the script shards the model itself: every rank builds the same model (same seeds), applies
`fully_shard` to each transformer layer and to the root, and trains its half of each global batch with
a plain (single-process) Trainer; FSDP2's backward reduce-scatters the gradients, i.e. averages them
over the ranks. The single-process run sees the same micro-batches in the same order through gradient
accumulation 2, so the two must end with the same adapter (every micro-batch has the same number of
valid labels, so the per-rank and per-window normalisations agree; dropout is off, as its random draws
differ between one process and two). Writes OUT/{method}-{task}-{mode}.pt (full tensors, rank 0).
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, SequentialSampler
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cls_batch, make_tiny_bert, make_tiny_llama  # noqa: E402

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model  # noqa: E402
from balora.core.export import save_adapter, save_converted_lora, save_converted_lora_from_adapter  # noqa: E402
from balora.core.reference import ReferenceSnapshot  # noqa: E402
from balora.core.sharded import full_state_dict, full_tensor, is_sharded  # noqa: E402

MICRO, STEPS, WORLD = 4, 3, 2


class Rows(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class InOrder(BALoraTrainer):
    def _get_train_sampler(self, *args, **kwargs):  # the micro-batches in dataset order on every rank
        return SequentialSampler(self.train_dataset)


def rows(task: str) -> list[dict]:
    """MICRO x WORLD x STEPS rows; every row fully valid (same label count per micro-batch)."""
    n = MICRO * WORLD * STEPS
    if task == "nlu":
        b = cls_batch(batch=n, seed=1)
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (n, 12), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def base_model(task: str) -> torch.nn.Module:
    """The tiny pre-trained model (same seed every call), dropout off: its draws differ between one
    process and two."""
    base = make_tiny_llama() if task == "nlg" else make_tiny_bert()
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return base


def train(out: str, method: str, task: str, sharded: bool, rank: int) -> None:
    model = build_peft_model(base_model(task), AdapterConfig(method=method, r=4, pissa_niter=2, init_seed=3), task)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = rows(task)
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        inner = model.base_model.model
        layers = inner.model.layers if task == "nlg" else inner.bert.encoder.layer
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # global micro-batch k = rows [k*WORLD*MICRO, (k+1)*WORLD*MICRO): rank r takes its r-th MICRO rows
        data = [row for k in range(STEPS) for row in
                data[(k * WORLD + rank) * MICRO:(k * WORLD + rank + 1) * MICRO]]
    mode = "fsdp" if sharded else "single"
    args = TrainingArguments(str(Path(out) / f"run-{method}-{task}-{mode}-{rank}"), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=1 if sharded else WORLD, max_steps=STEPS,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, use_cpu=not sharded)
    # a strong consistency weight, so that a wrong reference would move the adapter visibly
    balora = BALoraConfig(task=task, lambda_consistency=1.0) if method == "ba-lora" else None
    trainer = InOrder(model=model, args=args, train_dataset=Rows(data), balora_config=balora)
    trainer.train()
    adapter = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    state = full_state_dict(model)  # every rank gathers; rank 0 writes the artefacts of balora train
    if rank == 0:
        where = Path(out) / f"{method}-{task}-{mode}"
        save_adapter(model, where / "adapter", {"init_seed": 3}, state_dict=state)
        if sharded:  # PEFT's PiSSA conversion cannot run on the sharded model: converted on a reloaded copy
            save_converted_lora_from_adapter(base_model(task), where / "adapter", where / "lora_converted",
                                             ReferenceSnapshot.for_peft_model(model))
        else:
            save_converted_lora(model, where / "lora_converted")
    if rank == 0:
        torch.save({"adapter": adapter, "initial": initial, "sharded": [n for n, p in model.named_parameters()
                                                     if p.requires_grad and is_sharded(p)]},
                   Path(out) / f"{method}-{task}-{mode}.pt")


def main(out: str, mode: str, runs: str) -> None:
    sharded = mode == "fsdp"
    rank = 0
    if sharded:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        # The Trainer runs as one process per rank (FSDP2 does the data-parallel part); hide the launcher's
        # variables so that accelerate does not also wrap the model in DDP.
        for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            os.environ.pop(var, None)
    for run in runs.split(","):
        method, task = run.split(":")
        train(out, method, task, sharded, rank)
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
