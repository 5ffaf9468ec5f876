"""The library on tiny models built from configs: reference = pre-trained model, gradients, training,
save → reload → convert round trips, gradient-accumulation invariance."""

import copy
import json
import math

import pytest
import torch
from conftest import cls_batch, lm_batch, make_tiny_bert, make_tiny_llama
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import TrainingArguments

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, ReferenceSnapshot, build_peft_model, reference_forward
from balora.core.config import METHODS
from balora.core.export import load_trained, save_adapter, save_converted_lora, save_merged
from balora.core.losses import nlg_terms
from balora.training.preflight import cpu_has_bf16

ALL_METHODS = list(METHODS)


class ListDataset(Dataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def inputs_of(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def args(tmp_path, **kw):
    base = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=10, logging_steps=5,
                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(str(tmp_path / "out"), **base)


# ---------------------------------------------------------------- step 0: reference == pre-trained
@pytest.mark.parametrize("swap", ["call", "value"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_reference_equals_pretrained_llama(method, swap):
    pre = make_tiny_llama()
    model = build_peft_model(copy.deepcopy(pre), AdapterConfig(method=method, r=4), "nlg")
    batch = lm_batch()
    with torch.no_grad():
        want = pre(**inputs_of(batch)).logits
        ref = reference_forward(model, ReferenceSnapshot.for_peft_model(model), swap, **inputs_of(batch)).logits
        student = model(**inputs_of(batch)).logits
    assert (ref - want).abs().max() < 1e-4
    assert (student - want).abs().max() < 1e-4  # every method starts at the pre-trained model
    terms = nlg_terms(student, batch["labels"], BALoraConfig(), ref)
    assert terms.consistency.abs().item() < 1e-6


def test_disabled_pissa_adapter_is_the_residual_not_the_pretrained_model():
    pre = make_tiny_llama()
    model = build_peft_model(copy.deepcopy(pre), AdapterConfig(method="ba-lora", r=4), "nlg")
    batch = inputs_of(lm_batch())
    with torch.no_grad(), model.disable_adapter():
        residual = model(**batch).logits
    assert (residual - pre(**batch).logits).abs().max() > 1e-2


@pytest.mark.parametrize("swap", ["call", "value"])
@pytest.mark.parametrize("method", ["ba-lora", "lora", "dora"])
def test_reference_equals_pretrained_bert_with_initial_head(method, swap):
    pre = make_tiny_bert()
    model = build_peft_model(copy.deepcopy(pre), AdapterConfig(method=method, r=4), "nlu")
    batch = cls_batch()
    with torch.no_grad():
        # move the student away from its initial state, as training would
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        ref = reference_forward(model, ReferenceSnapshot.for_peft_model(model), swap, **inputs_of(batch)).logits
        moved = model(**inputs_of(batch)).logits
        want = pre(**inputs_of(batch)).logits
    assert (ref - want).abs().max() < 1e-4
    assert (moved - want).abs().max() > 1e-3


@pytest.mark.parametrize("swap", ["call", "value"])
def test_reference_pass_leaves_model_mode_and_parameters_alone(swap):
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4, dropout=0.1), "nlg")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    snapshot = ReferenceSnapshot.for_peft_model(model)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(1.0)
    first = reference_forward(model, snapshot, swap, **inputs_of(lm_batch())).logits
    second = reference_forward(model, snapshot, swap, **inputs_of(lm_batch())).logits
    assert torch.equal(first, second)  # dropout is off: deterministic
    assert model.training
    for n, p in model.named_parameters():
        expected = before[n] + 1.0 if p.requires_grad else before[n]
        assert torch.equal(p.detach(), expected), n
    assert all(not t.requires_grad for t in snapshot.tensors.values())


def test_value_swap_restores_the_parameters_when_the_forward_raises():
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4), "nlg")
    snapshot = ReferenceSnapshot.for_peft_model(model)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.5)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(IndexError):
        reference_forward(model, snapshot, "value", input_ids=torch.full((1, 3), 10_000))  # past the vocabulary
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), trained[n]), n


def test_auto_swap_and_zero3_placeholders_refused_by_the_other_swaps():
    from balora.core.reference import SnapshotUnavailableError, resolve_swap

    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4), "nlg")
    assert resolve_swap(model) == "call"  # unsharded parameters: functional_call
    with pytest.raises(ValueError, match="swap must be one of"):
        resolve_swap(model, "copy")
    snapshot = ReferenceSnapshot.for_peft_model(model)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # what DeepSpeed ZeRO-3 leaves outside its gather context
        param.data = torch.empty(0)
    param.ds_id = 7
    assert resolve_swap(model) == "zero3"  # what auto picks for a parameter DeepSpeed manages
    with pytest.raises(SnapshotUnavailableError, match="partitioned by DeepSpeed ZeRO-3.*swap='zero3'"):
        reference_forward(model, snapshot, "value", **inputs_of(lm_batch()))


# ---------------------------------------------------------------- gradients and training
def train_tiny(tmp_path, method, task="nlg", steps=30, balora=None, **kw):
    if task == "nlg":
        pattern = torch.arange(12) % 7 + 3
        ids = pattern.repeat(8, 1)
        labels = ids.clone()
        labels[:, :3] = -100
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        model = build_peft_model(make_tiny_llama(), AdapterConfig(method=method, r=4), "nlg")
    else:
        data = cls_batch(batch=16)
        data["input_ids"][:, 1] = data["labels"] + 5  # a learnable cue
        model = build_peft_model(make_tiny_bert(), AdapterConfig(method=method, r=4), "nlu")
    if balora is None and method in ("ba-lora", "lora-reg"):
        balora = BALoraConfig(task=task)
    trainer = BALoraTrainer(model=model, args=args(tmp_path, max_steps=steps, **kw),
                            train_dataset=ListDataset(data), balora_config=balora)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_method_lowers_the_task_loss_nlg(tmp_path, method):
    trainer = train_tiny(tmp_path, method, logging_steps=1)
    losses = [r["task_loss"] for r in trainer.state.log_history if "task_loss" in r]
    # a random tiny model with a frozen random output layer learns slowly: ln(96) = 4.56 → about 4.0
    assert losses[-1] < 0.9 * losses[0], losses
    if method in ("ba-lora", "lora-reg"):
        logged = trainer.state.log_history[-2]
        for key in ("balora/consistency", "balora/diversity", "balora/svd", "balora/weighted_consistency",
                    "balora/lambda_consistency", "balora/lambda_diversity", "balora/lambda_svd"):
            assert key in logged
        assert logged["balora/consistency"] > 0  # the student has moved away from the reference
    else:
        assert not any(k.startswith("balora/") for k in trainer.state.log_history[-2])


@pytest.mark.parametrize("method", ["ba-lora", "pissa", "lora"])
def test_each_method_lowers_the_task_loss_nlu(tmp_path, method):
    trainer = train_tiny(tmp_path, method, task="nlu", steps=40, logging_steps=1, learning_rate=2e-2)
    losses = [r["task_loss"] for r in trainer.state.log_history if "task_loss" in r]
    assert min(losses[-5:]) < 0.8 * losses[0], losses


def test_gradients_reach_only_adapter_and_head(tmp_path):
    for task, model, batch in (
        ("nlg", build_peft_model(make_tiny_llama(), AdapterConfig(r=4), "nlg"), lm_batch()),
        ("nlu", build_peft_model(make_tiny_bert(), AdapterConfig(r=4), "nlu"), cls_batch()),
    ):
        trainer = BALoraTrainer(model=model, args=args(tmp_path), balora_config=BALoraConfig(task=task))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        model.train()
        trainer.compute_loss(model, batch).backward()
        for name, p in model.named_parameters():
            allowed = "lora_" in name or "modules_to_save" in name
            if allowed:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
            else:
                assert not p.requires_grad and p.grad is None, name
        assert all(not t.requires_grad and t.grad is None for t in trainer.reference_snapshot.tensors.values())


def test_snapshot_frozen_and_unchanged_after_training(tmp_path):
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4), "nlg")
    initial = {n: t.clone() for n, t in ReferenceSnapshot.for_peft_model(model).tensors.items()}
    data = lm_batch(batch=8)
    trainer = BALoraTrainer(model=model, args=args(tmp_path), train_dataset=ListDataset(data),
                            balora_config=BALoraConfig())
    trainer.train()
    snap = trainer.reference_snapshot
    assert snap is ReferenceSnapshot.for_peft_model(model)
    for name, t in snap.tensors.items():
        assert not t.requires_grad
        assert torch.equal(t, initial[name])
    trained = dict(model.named_parameters())
    assert any(not torch.equal(trained[n], initial[n]) for n in initial)
    snap_ids = {id(t) for t in snap.tensors.values()}
    assert all(id(p) not in snap_ids for group in trainer.optimizer.param_groups for p in group["params"])


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="ba-lora", r=4), "nlg")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    trainer = BALoraTrainer(model=model, args=args(tmp_path, max_steps=2, logging_steps=1),
                            train_dataset=ListDataset(lm_batch(batch=8)), balora_config=BALoraConfig())
    with pytest.raises(FloatingPointError, match=r"non-finite logits\) at step 0\. Checkpoints already written to .* are intact"):
        trainer.train()


# ---------------------------------------------------------------- gradient accumulation
def variable_length_batch():
    batch = lm_batch(batch=8, length=12, prompt=2, seed=3)
    for row, prompt in enumerate([2, 9, 3, 10, 4, 2, 8, 6]):  # very different valid counts per row
        batch["labels"][row, :prompt] = -100
    return batch


def one_sgd_step_update(tmp_path, per_device, accumulation, balora):
    pre = make_tiny_llama(seed=1)
    model = build_peft_model(pre, AdapterConfig(method="ba-lora", r=4), "nlg")
    with torch.no_grad():  # start away from the reference so the consistency gradient is not zero
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = BALoraTrainer(
        model=model,
        args=args(tmp_path, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                  max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                  logging_steps=1),
        train_dataset=ListDataset(variable_length_batch()), balora_config=balora,
    )
    trainer.train()
    return {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_invariance_task_plus_consistency(tmp_path):
    cfg = BALoraConfig(lambda_consistency=1.0, lambda_diversity=0.0, lambda_svd=0.0)
    full = one_sgd_step_update(tmp_path / "a", 8, 1, cfg)
    accumulated = one_sgd_step_update(tmp_path / "b", 4, 2, cfg)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-7)
    assert sum(d.abs().sum() for d in full.values()) > 0


# ---------------------------------------------------------------- save → reload → convert
@pytest.mark.parametrize("method", ["ba-lora", "lora", "dora"])
def test_save_reload_convert_merge_round_trip(tmp_path, method):
    trainer = train_tiny(tmp_path, method, steps=5)
    model = trainer.model
    model.eval()
    batch = inputs_of(lm_batch())
    with torch.no_grad():
        want = model(**batch).logits
    save_adapter(model, tmp_path / "adapter", {"method": method, "init_seed": 0})
    save_converted_lora(model, tmp_path / "lora_converted")
    save_merged(model, tmp_path / "merged")

    reloaded = load_trained(make_tiny_llama(), tmp_path / "adapter")
    converted = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "lora_converted"))
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        for other in (reloaded, converted, merged):
            assert (other.eval()(**batch).logits - want).abs().max() < 1e-4
    config = json.loads((tmp_path / "lora_converted" / "adapter_config.json").read_text())
    if method == "ba-lora":
        assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r plain LoRA
    assert not str(config["init_lora_weights"]).startswith("pissa")


def test_pissa_niter_rebuilds_the_same_residual(tmp_path):
    adapter = AdapterConfig(method="ba-lora", r=4, pissa_niter=2, init_seed=7)
    a = build_peft_model(make_tiny_llama(), adapter, "nlg")
    b = build_peft_model(make_tiny_llama(), adapter, "nlg")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    with torch.no_grad():
        for _, p in a.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
        want = a(**inputs_of(lm_batch())).logits
    save_adapter(a, tmp_path / "adapter", {"init_seed": 7})
    reloaded = load_trained(make_tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        assert (reloaded(**inputs_of(lm_batch())).logits - want).abs().max() < 1e-5


# ---------------------------------------------------------------- logit-free (fused) path in the trainer
def test_trainer_fused_loss_equals_full_logits_loss_and_gradients(tmp_path):
    batch = variable_length_batch()
    results = {}
    for fused in (True, False):
        model = build_peft_model(make_tiny_llama(seed=2), AdapterConfig(method="ba-lora", r=4), "nlg")
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        trainer = BALoraTrainer(model=model, args=args(tmp_path), balora_config=BALoraConfig(), fused_loss=fused,
                                loss_chunk_size=7)
        assert (trainer._fused is not None) == fused
        model.train()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad},
                          {k: v.item() for k, v in trainer._sums.items()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-3, atol=1e-6)
    for key, value in results[False][2].items():
        assert results[True][2][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


def test_an_output_layer_partitioned_by_zero3_falls_back_to_full_logits(tmp_path, caplog):
    model = build_peft_model(make_tiny_llama(), AdapterConfig(method="pissa", r=4), "nlg")
    trainer = BALoraTrainer(model=model, args=args(tmp_path), balora_config=None)
    assert trainer._fused is not None
    head = model.get_output_embeddings()
    whole = head.weight
    placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    placeholder.ds_id = 3  # as DeepSpeed ZeRO-3 leaves it after wrapping, outside its gather context
    head.weight = placeholder
    with caplog.at_level("WARNING", logger="balora.training.trainer"):
        assert trainer._bound_head(trainer._fused) is None
    assert "partitioned by DeepSpeed ZeRO-3; computing the loss from full logits" in caplog.text
    head.weight = whole
    model.train()
    trainer._fused = trainer._bound_head(trainer._fused)
    assert trainer._fused[0] is whole  # an unsharded layer is used as it is, no copy


def test_trainable_output_layer_falls_back_to_full_logits(tmp_path, caplog):
    adapter = AdapterConfig(method="ba-lora", r=4, target_modules=["q_proj", "v_proj", "lm_head"])
    model = build_peft_model(make_tiny_llama(), adapter, "nlg")
    with caplog.at_level("WARNING", logger="balora.training.trainer"):
        trainer = BALoraTrainer(model=model, args=args(tmp_path), balora_config=BALoraConfig())
    assert trainer._fused is None
    assert "computing the loss from full logits: the output layer is adapted by PEFT" in caplog.text
    model.train()
    assert torch.isfinite(trainer.compute_loss(model, lm_batch()))


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bfloat16")
@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_bf16_mixed_precision_on_a_bf16_cpu_trains_like_float32(tmp_path, task):
    """training.bf16 on a CPU with bfloat16: autocast around float32 weights; BA-LoRA's terms stay finite
    (they compute in float32) and the losses follow the float32 run's closely."""
    runs = {}
    for bf16 in (False, True):
        trainer = train_tiny(tmp_path / str(bf16), "ba-lora", task=task, steps=6, logging_steps=1, bf16=bf16)
        log = [h for h in trainer.state.log_history if "loss" in h]
        runs[bf16] = [h["loss"] for h in log]
        assert all(math.isfinite(h[k]) for h in log for k in h if k.startswith("balora/"))
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not bf16 weights
    assert len(runs[True]) == 6
    assert runs[True] == pytest.approx(runs[False], rel=0.05, abs=0.02)
    assert runs[True] != runs[False]  # autocast did act
