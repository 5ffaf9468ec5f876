"""Trains a tiny model with balora's trainer under accelerate's FSDP2 (`fully_shard`, two processes, gloo
on this CPU), or in one process with the same global batch; used by test_fsdp.py (and its helpers by
deepspeed_train.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_train.py OUT fsdp ba-lora:nlg,... [save|resume]
    python tests/fsdp_train.py OUT single ba-lora:nlg,pissa:nlu,...

accelerate 1.16 turns FSDP on only for accelerator devices: on a CPU it computes MULTI_CPU and the Trainer
wraps the model in DDP. The script configures accelerate's state as `accelerate launch --config_file
fsdp2.yaml` would on GPUs (the FSDP2 plugin built from the shipped config's `fsdp_config`) and then sets the
one field accelerate withholds on CPUs, `distributed_type = FSDP`. From there everything is accelerate's
and the Trainer's own FSDP2 path: `fsdp2_prepare_model` shards each transformer layer and the root, the
Trainer saves and loads checkpoints through `save_fsdp_model` / `load_fsdp_model` and the optimiser
counterparts. The model is fp32 (the shipped config's bf16 is left out: the comparison is exact).

Each rank's dataloader takes every other micro-batch of the in-order data, so the single-process run with
gradient accumulation 2 sees the same micro-batches (every micro-batch has the same number of valid labels,
so the per-rank and per-window normalisations agree; dropout is off, as its random draws differ between one
process and two). Writes OUT/{method}-{task}-{mode}[-{phase}].pt (full tensors, rank 0) and, on a run
straight through, the artefacts adapter/ and lora_converted/ as `balora train` writes them.
"""

import os
import sys
from importlib import resources
from pathlib import Path

import torch
import yaml
from torch.utils.data import Dataset, SequentialSampler
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from conftest import cls_batch, make_tiny_bert, make_tiny_llama  # noqa: E402

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model  # noqa: E402
from balora.core.export import save_adapter, save_converted_lora, save_converted_lora_from_adapter  # noqa: E402
from balora.core.reference import ReferenceSnapshot, reference_forward  # noqa: E402
from balora.core.sharded import full_state_dict, full_tensor, is_sharded  # noqa: E402
from balora.training.process_group import release_process_group  # noqa: E402

MICRO, STEPS, WORLD = 4, 3, 2


class Rows(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class InOrder(BALoraTrainer):
    def _get_train_sampler(self, *args, **kwargs):  # the micro-batches in dataset order
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


def configure_fsdp2_on_cpu() -> None:
    """accelerate's state as `accelerate launch --config_file "$(balora launch-config fsdp2)"` sets it, on gloo:
    the launcher's environment variables from the shipped config's ``fsdp_config`` (``fsdp_version: 2`` ->
    ``FSDP_VERSION=2`` ...), the plugin read from them; the Trainer picks the state up through
    ``accelerator_config.use_configured_state``."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    path = resources.files("balora") / "configs" / "accelerate" / "fsdp2.yaml"
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    for key, value in yaml.safe_load(path.read_text())["fsdp_config"].items():
        os.environ["FSDP_" + key.removeprefix("fsdp_").upper()] = str(value).lower() if isinstance(value, bool) \
            else str(value)
    PartialState(cpu=True, backend="gloo")
    plugin = FullyShardedDataParallelPlugin()
    Accelerator(cpu=True, fsdp_plugin=plugin)
    # the one switch accelerate keeps for accelerator devices (state.py: MULTI_CPU is not in its FSDP list)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def train(out: str, method: str, task: str, mode: str, phase: str = "") -> None:
    """``phase``: "" (train through, write the artefacts), "save" (checkpoint every 2 steps, train through:
    checkpoint-2 stays), "resume" (a fresh model and trainer from checkpoint-2 of the "save" run, to the end)."""
    model = build_peft_model(base_model(task), AdapterConfig(method=method, r=4, pissa_niter=2, init_seed=3), task)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sharded = mode == "fsdp"
    if sharded:  # each run as in a fresh process: the plugin's wrap list as the shipped config leaves it (balora's
        # trainer drops BertEmbeddings from BERT's list: accelerate would shard it, then its embeddings again)
        from accelerate.state import AcceleratorState

        AcceleratorState().fsdp_plugin.transformer_cls_names_to_wrap = None
    run_dir = Path(out) / f"run-{method}-{task}-{mode}{'-save' if phase else ''}"
    saving = {"save_strategy": "steps", "save_steps": 2} if phase else {"save_strategy": "no"}
    extra = {"accelerator_config": {"use_configured_state": True}} if sharded else {}
    args = TrainingArguments(str(run_dir), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=1 if sharded else WORLD, max_steps=STEPS,
                             learning_rate=1e-2, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
                             use_cpu=True, **saving, **extra)
    # a strong consistency weight, so that a wrong reference would move the adapter visibly
    balora = BALoraConfig(task=task, lambda_consistency=1.0) if method == "ba-lora" else None
    trainer = InOrder(model=model, args=args, train_dataset=Rows(rows(task)), balora_config=balora)
    trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-2") if phase == "resume" else None)
    rank = trainer.args.process_index

    adapter = {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}
    # The reference after training (every rank takes part: a value swap on each shard), against the
    # pre-trained model.
    probe = rows(task)[0]
    inputs = {"input_ids": probe["input_ids"][None], "attention_mask": probe["attention_mask"][None]}
    reference = full_tensor(reference_forward(model, ReferenceSnapshot.for_peft_model(model), **inputs).logits)
    with torch.no_grad():
        model.eval()
        student = full_tensor(model(**inputs).logits)
        pretrained = base_model(task).eval()(**inputs).logits
    name = Path(out) / f"{method}-{task}-{mode}{'-' + phase if phase else ''}"
    if not phase:
        state = full_state_dict(model)  # every rank gathers; rank 0 writes the artefacts of balora train
        if rank == 0:
            save_adapter(model, name / "adapter", {"init_seed": 3}, state_dict=state)
            if sharded:  # PEFT's PiSSA conversion cannot run on the sharded model: converted on a reloaded copy
                save_converted_lora_from_adapter(base_model(task), name / "adapter", name / "lora_converted",
                                                 ReferenceSnapshot.for_peft_model(model))
            else:
                save_converted_lora(model, name / "lora_converted")
    if rank == 0:
        torch.save({"adapter": adapter, "initial": initial,
                    "sharded": [n for n, p in model.named_parameters() if p.requires_grad and is_sharded(p)],
                    "reference_minus_pretrained": (reference - pretrained).abs().max().item(),
                    "student_minus_pretrained": (student - pretrained).abs().max().item()}, name.with_suffix(".pt"))


def main(out: str, mode: str, runs: str, phase: str = "") -> None:
    if mode == "fsdp":
        configure_fsdp2_on_cpu()
    for run in runs.split(","):
        method, task = run.split(":")
        train(out, method, task, mode, phase)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    release_process_group()
