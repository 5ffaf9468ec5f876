"""What a 4- or 8-bit base changes, measured on SmolLM2-135M (the real model) and XSum documents: the gap of
the step-0 model -- the model BA-LoRA's consistency term takes as its reference on a quantised base -- to the
full-precision pre-trained model, for QLoRA (Quant(W)) and QPiSSA (Quant(W_res) + B0·A0).

    python benchmarks/quantization_gap.py [--bits 4 8] [--r 16] [--docs 16] [--seq 256] [--threads 1]

Per variant: mean and max |Δlogit| against W on every valid token, the token cross-entropy of the documents
(W's own next-token loss; the increase is the quantisation's cost), and the KL(W ‖ quantised) per token.
Printed, and written to --out (JSON). bitsandbytes >= 0.50 runs these layers on a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from balora import AdapterConfig, build_peft_model


def documents(n: int, seq: int, tokenizer) -> dict[str, torch.Tensor]:
    from balora.assets import resolve

    texts = []
    with open(resolve("asset:xsum")) as f:
        for line in f:
            texts.append(json.loads(line)["document"])
            if len(texts) == n:
                break
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=seq)


@torch.no_grad()
def compare(full, quantized, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """|Δlogit|, cross-entropy and KL(full ‖ quantized) over the valid positions of ``batch``."""
    mask = batch["attention_mask"].bool()
    full_logits, quant_logits = full(**batch).logits.float(), quantized(**batch).logits.float()
    a, b = full_logits[mask], quant_logits[mask]
    # next-token loss: position t predicts token t + 1, both real tokens
    pairs = mask[:, :-1] & mask[:, 1:]
    targets = batch["input_ids"][:, 1:][pairs][:, None]
    log_a, log_b = full_logits[:, :-1][pairs].log_softmax(-1), quant_logits[:, :-1][pairs].log_softmax(-1)
    return {"mean_abs_dlogit": (a - b).abs().mean().item(), "max_abs_dlogit": (a - b).abs().max().item(),
            "logit_scale": a.abs().mean().item(),
            "ce_full": -log_a.gather(-1, targets).mean().item(),
            "ce_quantized": -log_b.gather(-1, targets).mean().item(),
            "kl_full_to_quantized": (log_a.exp() * (log_a - log_b)).sum(-1).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/quantization_gap.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from balora.assets import resolve
    from balora.training.quantized import quantize_base

    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    batch = documents(args.docs, args.seq, tokenizer)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for bits in args.bits:
        for method in ("lora", "pissa"):
            started = time.perf_counter()
            model = quantize_base(
                build_peft_model(copy.deepcopy(full), AdapterConfig(method=method, r=args.r, init_seed=0), "nlg"),
                bits, lambda p, **kw: AutoModelForCausalLM.from_pretrained(p, **kw)).eval()
            row = {"bits": bits, "variant": "QLoRA: Quant(W)" if method == "lora" else "QPiSSA: Quant(W_res) + B0·A0",
                   "method": method, "r": args.r, **compare(full, model, batch),
                   "seconds": round(time.perf_counter() - started, 1)}
            rows.append(row)
            print(f"{bits}-bit {row['variant']:<30} mean|Δlogit| {row['mean_abs_dlogit']:.4f} "
                  f"(logits ~{row['logit_scale']:.2f})  CE {row['ce_full']:.4f} -> {row['ce_quantized']:.4f}  "
                  f"KL {row['kl_full_to_quantized']:.4f}", flush=True)
            del model
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "docs": args.docs, "seq": args.seq,
                               "tokens": int(batch["attention_mask"].sum()), "rows": rows,
                               "command": "python benchmarks/quantization_gap.py " + " ".join(
                                   f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                   for k, v in vars(args).items())}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
