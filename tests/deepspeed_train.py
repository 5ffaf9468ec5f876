"""Trains a tiny model with balora's trainer under DeepSpeed ZeRO-2 / ZeRO-3 (two CPU processes, gloo), or
in one process with the same global batch; used by test_deepspeed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_train.py OUT zero2 ba-lora:nlg,...
    python tests/deepspeed_train.py OUT single ba-lora:nlg,...

transformers' Trainer takes DeepSpeed on a CPU-only machine, but accelerate then leaves the process group's
backend unset and counts one process, so the DeepSpeed batch size is filled for a world of 1; an accelerate
state configured beforehand with ``backend="gloo"`` (``accelerator_config.use_configured_state``) gives it
the two ranks. Each rank's dataloader takes every other micro-batch of the in-order data, so the
single-process run with gradient accumulation 2 sees the same micro-batches. Writes
OUT/{method}-{task}-{mode}.pt (rank 0).
"""

import os
import sys
from pathlib import Path

import torch
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_train import MICRO, STEPS, WORLD, InOrder, Rows, base_model, rows  # noqa: E402

from balora import AdapterConfig, BALoraConfig, ReferenceSnapshot, build_peft_model  # noqa: E402
from balora.core.reference import reference_forward  # noqa: E402
from balora.training.process_group import release_process_group  # noqa: E402


def train(out: str, method: str, task: str, mode: str, phase: str = "") -> None:
    """``phase``: "" (train through), "save" (checkpoint every 2 steps, train through: checkpoint-2 stays),
    "resume" (start a fresh trainer from checkpoint-2 of the "save" run, to the end)."""
    model = build_peft_model(base_model(task), AdapterConfig(method=method, r=4, pissa_niter=2, init_seed=3), task)
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    extra = {}
    if mode != "single":
        stage = int(mode[-1])
        # persistence threshold 0: ZeRO-3 partitions even the tiny adapter, as it does a real model's
        extra["deepspeed"] = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                              "train_batch_size": "auto", "gradient_clipping": "auto",
                              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
        extra["accelerator_config"] = {"use_configured_state": True}
    run_dir = Path(out) / f"run-{method}-{task}-{mode}{'-save' if phase else ''}"
    saving = {"save_strategy": "steps", "save_steps": 2} if phase else {"save_strategy": "no"}
    args = TrainingArguments(str(run_dir), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=1 if mode != "single" else WORLD, max_steps=STEPS,
                             learning_rate=1e-2, logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
                             use_cpu=mode == "single", **saving, **extra)
    balora = BALoraConfig(task=task, lambda_consistency=1.0) if method == "ba-lora" else None
    trainer = InOrder(model=model, args=args, train_dataset=Rows(rows(task)), balora_config=balora)
    name = Path(out) / f"{method}-{task}-{mode}{'-' + phase if phase else ''}"
    trainer.train(resume_from_checkpoint=str(run_dir / "checkpoint-2") if phase == "resume" else None)
    adapter = {}
    for n, p in trainer.model_wrapped.module.named_parameters() if mode != "single" else model.named_parameters():
        if p.requires_grad:
            if hasattr(p, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    adapter[n] = p.detach().clone()
            else:
                adapter[n] = p.detach().clone()
    # The reference after training (every rank takes part: ZeRO-3 gathers), against the pre-trained model.
    probe = rows(task)[0]
    inputs = {"input_ids": probe["input_ids"][None], "attention_mask": probe["attention_mask"][None]}
    trained = trainer.model_wrapped.module if mode != "single" else model
    reference = reference_forward(trained, ReferenceSnapshot.for_peft_model(model), **inputs).logits
    with torch.no_grad():
        trained.eval()
        student = trained(**inputs).logits
        pretrained = base_model(task).eval()(**inputs).logits
    if trainer.args.process_index == 0:
        torch.save({"adapter": adapter, "initial": initial, "reference_minus_pretrained":
                    (reference - pretrained).abs().max().item(),
                    "student_minus_pretrained": (student - pretrained).abs().max().item()}, name.with_suffix(".pt"))


def main(out: str, mode: str, runs: str, phase: str = "") -> None:
    if mode != "single":
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        from accelerate import PartialState

        PartialState(backend="gloo")
    for run in runs.split(","):
        method, task = run.split(":")
        train(out, method, task, mode, phase)


if __name__ == "__main__":
    main(*sys.argv[1:5])
    release_process_group()
