"""Time of BA-LoRA's reference pass with the snapshot swapped in by `functional_call` (single process,
DDP) against swapped in by value (copy in, forward, copy back: the FSDP2 route), on one unsharded model,
so that the difference is the swap itself.

    python benchmarks/reference_swap.py                        # tiny Llama: 4 layers, d 256, 4 × 256 tokens
    python benchmarks/reference_swap.py --model asset:smollm2  # SmolLM2-135M, r = 16

Rounds interleave the two (a slow spell of the machine hits both); the median over all timed passes and
the per-round median ratio value/call (with its range) are printed and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from balora import AdapterConfig, ReferenceSnapshot, build_peft_model
from balora.core.reference import reference_forward


def load(spec: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec == "tiny":
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32_000, hidden_size=256, intermediate_size=688,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                            tie_word_embeddings=False))
    from balora.assets import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(spec))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/reference_swap.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build_peft_model(load(args.model), AdapterConfig(method="ba-lora", r=args.r, pissa_niter=2), "nlg")
    snapshot = ReferenceSnapshot.for_peft_model(model)
    with torch.no_grad():  # trained values differ from the snapshot, as during training
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "logits_to_keep": 1,
              "output_hidden_states": True}
    times: dict[str, list[float]] = {"call": [], "value": []}
    ratios = []
    for round_ in range(args.rounds):
        medians = {}
        for swap in ("call", "value"):
            if round_ == 0:
                reference_forward(model, snapshot, swap, **inputs)  # warm-up
            runs = []
            for _ in range(args.passes):
                t0 = time.perf_counter()
                reference_forward(model, snapshot, swap, **inputs)
                runs.append(time.perf_counter() - t0)
            times[swap] += runs
            medians[swap] = statistics.median(runs)
        ratios.append(medians["value"] / medians["call"])
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "r": args.r, "threads": args.threads,
              "adapter_parameters": sum(t.numel() for t in snapshot.tensors.values()),
              "median_seconds": {k: statistics.median(v) for k, v in times.items()},
              "ratio_value_over_call": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
