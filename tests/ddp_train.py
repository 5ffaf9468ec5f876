"""Trains a tiny BA-LoRA model under `accelerate launch` (DDP, gloo on CPU); used by test_ddp.py.

Each rank writes its final adapter tensors, its reference-snapshot fingerprint and its PiSSA residual
fingerprint to OUT/rank{R}.pt so that the test can check that all ranks agree.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from conftest import lm_batch, make_tiny_llama  # noqa: E402

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model  # noqa: E402


class Rows(Dataset):
    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def main(out: str) -> None:
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4, pissa_niter=2, init_seed=3), "nlg")
    args = TrainingArguments(out, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
                             learning_rate=1e-2, logging_steps=2, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, use_cpu=True)
    trainer = BALoraTrainer(model=model, args=args, train_dataset=Rows(lm_batch(batch=16, seed=1)),
                            balora_config=BALoraConfig())
    trainer.train()
    rank = trainer.args.process_index
    residual = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    torch.save({
        "world_size": trainer.args.world_size,
        "adapter": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
        "snapshot": trainer.reference_snapshot.fingerprint(),
        "residual": residual,
        "logged": [r for r in trainer.state.log_history if "balora/consistency" in r],
    }, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
