"""The mixin composes with TRL's SFTTrainer: completion-only labels from TRL, BA-LoRA's loss from us."""

import pytest
import torch
from conftest import make_tiny_llama, make_word_tokenizer

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from balora import AdapterConfig, BALoraConfig, build_peft_model  # noqa: E402


def test_sft_trainer_with_mixin_trains_and_logs_terms(tmp_path):
    from balora.training.sft import BALoraSFTTrainer

    rows = [{"prompt": " ".join(f"w{(i + j) % 20}" for j in range(4)),
             "completion": " " + " ".join(f"w{(i + j) % 7 + 30}" for j in range(6))} for i in range(16)]
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4), "nlg")
    args = trl.SFTConfig(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
                         logging_steps=4, report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True,
                         max_length=32)
    trainer = BALoraSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=make_word_tokenizer(), balora_config=BALoraConfig())
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"][:, :4] == -100).all()  # TRL's completion-only labels reach our loss
    trainer.train()
    logs = [r for r in trainer.state.log_history if "balora/consistency" in r]
    assert len(logs) == 3
    assert logs[-1]["task_loss"] < logs[0]["task_loss"]
    assert all(torch.isfinite(torch.tensor(r["balora/svd"])) for r in logs)
