"""Trains a tiny BA-LoRA model under `accelerate launch` (DDP, gloo on CPU); used by test_ddp.py.

Each rank writes its final adapter tensors, its reference-snapshot fingerprint and its PiSSA residual
fingerprint to OUT/rank{R}.pt so that the test can check that all ranks agree.
With ``cache`` as second argument, each rank builds-or-opens one reference cache in OUT/cache (the build
lock lets one rank build it) and trains twice, online and from the cache (SGD), writing both adapters to
OUT/cache-rank{R}.pt.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).parent))
from conftest import lm_batch, make_tiny_llama  # noqa: E402

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model  # noqa: E402
from balora.training import reference_store as RS  # noqa: E402
from balora.training.process_group import release_process_group  # noqa: E402


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


def rows_with_labels(n: int = 16) -> list[dict]:
    batch = lm_batch(batch=n, seed=1)
    return [{"input_ids": batch["input_ids"][i].tolist(), "attention_mask": batch["attention_mask"][i].tolist(),
             "labels": batch["labels"][i].tolist()} for i in range(n)]


def collate(features: list[dict]) -> dict:
    return {k: torch.tensor([f[k] for f in features]) for k in ("input_ids", "attention_mask", "labels")}


def cached_and_online(out: str) -> None:
    rows = rows_with_labels()
    adapters, built = {}, None
    for mode in ("online", "cached"):
        model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4, pissa_niter=2, init_seed=3),
                                 "nlg")
        store = None
        if mode == "cached":
            store = RS.build_reference_cache(model, rows, collate, Path(out) / "cache", batch_size=4,
                                             temperature=BALoraConfig().temperature, task="nlg")
            built = store.path
        args = TrainingArguments(str(Path(out) / mode), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=4, learning_rate=0.5, optim="sgd", logging_steps=1, report_to=[],
                                 save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True)
        data, collator = ((RS.with_example_index(rows), RS.IndexedCollator(collate)) if store is not None
                          else (rows, collate))
        trainer = BALoraTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                                balora_config=BALoraConfig(), reference_cache=store)
        trainer.train()
        adapters[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        adapters[f"{mode}-logged"] = [r for r in trainer.state.log_history if "balora/consistency" in r]
    torch.save({"world_size": trainer.args.world_size, "cache": str(built), **adapters},
               Path(out) / f"cache-rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    if sys.argv[2:] == ["cache"]:
        cached_and_online(sys.argv[1])
    else:
        main(sys.argv[1])
    release_process_group()
