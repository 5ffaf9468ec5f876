"""A 4-bit / 8-bit base (bitsandbytes, which runs on this CPU): QLoRA and QPiSSA built as PEFT recommends
(`balora.training.quantized`). At step 0 the quantised student equals the snapshot reference exactly (the
reference *is* Quant(W_res) + B0·A0), BA-LoRA trains on it, and the artefacts convert."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, lm_batch

pytest.importorskip("bitsandbytes")

from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, ReferenceSnapshot, build_peft_model  # noqa: E402
from balora.core.reference import reference_forward  # noqa: E402
from balora.training.quantized import quantization_gap, quantize_base  # noqa: E402


def tiny_llama_128(tied: bool = False) -> LlamaForCausalLM:
    """bitsandbytes' CPU 4-bit kernels quantise in blocks of 64 input features: hidden 128, not conftest's 32."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def _load(path: str, **kwargs) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


@pytest.fixture(scope="module")
def pre() -> LlamaForCausalLM:
    return tiny_llama_128()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method", ["lora", "pissa", "ba-lora"])
def test_quantised_student_equals_its_reference_at_step_0(pre, method, bits):
    import bitsandbytes as bnb

    model = quantize_base(build_peft_model(copy.deepcopy(pre), AdapterConfig(method=method, r=8, init_seed=3), "nlg"),
                          bits, _load).eval()
    base_layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt)
    batch = lm_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ref = reference_forward(model, ReferenceSnapshot.for_peft_model(model), **inputs).logits
        student = model(**inputs).logits
    assert torch.equal(ref, student)
    gap = quantization_gap(pre, model, **inputs)
    assert 0 < gap["mean_abs"] < 0.5 * gap["logit_scale"]  # a quantised model: close to W, not equal


@pytest.mark.parametrize("bits", [4, 8])
def test_a_tied_output_layer_stays_in_full_precision(bits):
    """SmolLM2 ties lm_head to the embeddings: the output layer is kept out of quantisation (as transformers
    does by default), else bitsandbytes fails its shape assertion in the first forward (found on SmolLM2)."""
    tied = tiny_llama_128(tied=True)
    model = quantize_base(build_peft_model(tied, AdapterConfig(method="pissa", r=8, init_seed=3), "nlg"), bits,
                          _load).eval()
    head = model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight is model.get_input_embeddings().weight
    batch = lm_batch()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.isfinite(logits).all()


def test_qpissa_keeps_the_principal_part_in_full_precision(pre):
    """4-bit: QPiSSA's step-0 model is closer to W than QLoRA's Quant(W) (measured on this tiny model:
    mean |Δlogit| 0.0248 vs 0.0285); the PiSSA paper's claim, here on random weights, a weak spectrum."""
    batch = lm_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    gaps = {m: quantization_gap(pre, quantize_base(build_peft_model(copy.deepcopy(pre), AdapterConfig(
        method=m, r=8, init_seed=3), "nlg"), 4, _load).eval(), **inputs)["mean_abs"] for m in ("lora", "pissa")}
    assert gaps["pissa"] < gaps["lora"]


def test_ba_lora_trains_on_a_4bit_base_and_converts(pre, tmp_path):
    from peft import PeftModel

    from balora.core.export import save_converted_lora

    model = quantize_base(build_peft_model(copy.deepcopy(pre), AdapterConfig(method="ba-lora", r=8, init_seed=3),
                                           "nlg"), 4, _load)
    batch = lm_batch(batch=8, seed=1)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = BALoraTrainer(model=model, args=args, train_dataset=rows, balora_config=BALoraConfig())
    trainer.train()
    logged = [r for r in trainer.state.log_history if "balora/consistency" in r]
    assert logged and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert logged[-1]["balora/consistency"] > 0  # the student left its quantised step-0 reference
    save_converted_lora(model, tmp_path / "lora_converted")
    converted = PeftModel.from_pretrained(copy.deepcopy(pre), str(tmp_path / "lora_converted"))
    assert converted.peft_config["default"].r == 16  # PEFT's PiSSA -> LoRA conversion: rank 2r


def test_balora_train_with_a_4bit_base_writes_loadable_artefacts(pre, tmp_path):
    """`balora train` with model.quantize: 4, end to end: QPiSSA trains, adapter/ and lora_converted/ load
    on the untouched full-precision base."""
    import json

    import yaml
    from conftest import make_word_tokenizer
    from peft import PeftModel

    from balora.cli import main

    model_dir = tmp_path / "tiny-llama-128"
    pre.save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"question": f"w{i % 30 + 3} w{(i * 3) % 30 + 3}", "answer": f"w{i % 30 + 40}"} for i in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "method": "ba-lora", "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir), "task": "nlg", "quantize": 4}, "adapter": {"r": 4},
        "data": {"source": str(tmp_path / "train.jsonl"), "query_field": "question", "response_field": "answer",
                 "template": "plain", "max_length": 16},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True},
    }))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2
    converted = PeftModel.from_pretrained(copy.deepcopy(pre), str(tmp_path / "run" / "lora_converted"))
    assert converted.peft_config["default"].r == 8  # PiSSA -> LoRA conversion: rank 2r
