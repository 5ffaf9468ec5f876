"""The GPU check of docs/guide/distributed.md, prepared for a session that is lent a CUDA device (none was
lent to the one that wrote it): BA-LoRA in bf16 on CUDA (1) under FSDP2 on one rank, compared with the
same run unsharded, and (2) on a 4-bit base (bitsandbytes CUDA kernels), step-0 reference = student and a
few training steps, plus the QLoRA / QPiSSA gap to the bf16 model. Tiny Llama from a config: nothing is
downloaded. Well under 10 minutes on one GPU.

    python -m torch.distributed.run --nproc_per_node 1 scripts/device_check.py OUT_DIR

Writes OUT_DIR/device_check.json and prints it.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import lm_batch  # noqa: E402
from fsdp_train import InOrder, Rows  # noqa: E402

from balora import AdapterConfig, BALoraConfig, ReferenceSnapshot, build_peft_model, reference_forward  # noqa: E402
from balora.core.sharded import full_tensor  # noqa: E402


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=4,
                                        tie_word_embeddings=False)).eval()


def train(model, out: Path, name: str) -> tuple[dict, float]:
    from transformers import TrainingArguments

    batch = lm_batch(batch=32, length=64, seed=1, vocab=512)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(32)]
    args = TrainingArguments(str(out / name), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3,
                             bf16=True, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = InOrder(model=model, args=args, train_dataset=Rows(rows), balora_config=BALoraConfig())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    adapter = {n: full_tensor(p.detach()).float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    return adapter, seconds


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("nccl")
    torch.cuda.set_device(0)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    base = tiny_llama().to("cuda", torch.bfloat16)
    batch = {k: v.cuda() for k, v in lm_batch(batch=4, length=32, vocab=512).items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # (1) FSDP2 on one rank vs unsharded, bf16
    plain = build_peft_model(copy.deepcopy(base), AdapterConfig(method="ba-lora", r=8, init_seed=3), "nlg")
    sharded = build_peft_model(copy.deepcopy(base), AdapterConfig(method="ba-lora", r=8, init_seed=3), "nlg")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda", (1,))
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    with torch.no_grad():
        ref = reference_forward(sharded, ReferenceSnapshot.for_peft_model(sharded), **inputs).logits
        student = sharded(**inputs).logits
    report["fsdp2_step0_reference_minus_student"] = (ref - student).abs().max().item()
    a, t_plain = train(plain, out, "plain")
    b, t_sharded = train(sharded, out, "fsdp2")
    report["fsdp2_vs_unsharded_max_abs"] = max((a[k] - b[k]).abs().max().item() for k in a)
    report["seconds"] = {"unsharded_4_steps": t_plain, "fsdp2_4_steps": t_sharded}

    # (2) a 4-bit base (QPiSSA) on CUDA
    from transformers import LlamaForCausalLM

    from balora.training.quantized import quantization_gap, quantize_base

    def load(path, **kw):
        return LlamaForCausalLM.from_pretrained(path, device_map={"": 0}, **kw)

    full = tiny_llama().to("cuda")
    gaps = {}
    for method in ("lora", "pissa"):
        q = quantize_base(build_peft_model(copy.deepcopy(full), AdapterConfig(method=method, r=8, init_seed=3), "nlg"),
                          4, load, compute_dtype=torch.bfloat16).eval()
        gaps[method] = quantization_gap(full, q, **inputs)
    report["4bit_gap_to_full"] = gaps
    q = quantize_base(build_peft_model(copy.deepcopy(full), AdapterConfig(method="ba-lora", r=8, init_seed=3), "nlg"),
                      4, load, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        q.eval()
        ref = reference_forward(q, ReferenceSnapshot.for_peft_model(q), **inputs).logits
        student = q(**inputs).logits
    report["4bit_step0_reference_minus_student"] = (ref - student).abs().max().item()
    _, report["seconds"]["4bit_ba_lora_4_steps"] = train(q, out, "qpissa")
    print(json.dumps(report, indent=2))
    (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
