"""Training-step time on the CPU in float32 and with ``training.bf16`` (autocast to bfloat16 around
float32 weights), on a CPU that computes bfloat16 natively (AVX512-BF16 / AMX), same model, adapter,
batch and seed, the two interleaved so that a slow spell of the machine hits both alike.

    python benchmarks/cpu_bf16.py                               # SmolLM2-135M, PiSSA r = 16, 8 × 160 tokens
    python benchmarks/cpu_bf16.py --method ba-lora --threads 1  # with the regularisers (online reference)

Prints and writes JSON: the median step time of each, their ratio, and the losses of the same steps
(each way starts from the same adapter and optimiser state, so the losses show what bfloat16 changes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model
from balora.assets import resolve
from balora.training.preflight import cpu_has_bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--method", default="pissa")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=160)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per way per round (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/cpu_bf16.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu_has_bf16():
        raise SystemExit("this CPU has no native bfloat16: training.bf16 is refused here, nothing to measure")
    from transformers import AutoModelForCausalLM, TrainingArguments

    torch.manual_seed(0)
    model = build_peft_model(AutoModelForCausalLM.from_pretrained(resolve(args.model)),
                             AdapterConfig(method=args.method, r=args.rank), "nlg")
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    balora = BALoraConfig(task="nlg") if args.method in ("ba-lora", "lora-reg") else None
    trainer = BALoraTrainer(model=model, args=TrainingArguments("/tmp/balora-bench-bf16", use_cpu=True, report_to=[]),
                            balora_config=balora)
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    state = copy.deepcopy(optimizer.state_dict())

    def reset() -> None:  # the same starting point for both ways
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        optimizer.load_state_dict(state)

    def step(bf16: bool) -> tuple[float, float]:
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - began, float(loss.detach())

    times: dict[str, list[float]] = {"float32": [], "bf16": []}
    losses: dict[str, list[float]] = {"float32": [], "bf16": []}
    model.train()
    for r in range(args.rounds):
        for way in ("float32", "bf16"):
            reset()
            if r == 0:
                step(way == "bf16")  # warm-up (oneDNN primitives), not timed
                reset()
            for _ in range(args.steps):
                seconds, loss = step(way == "bf16")
                times[way].append(seconds)
                if r == 0:
                    losses[way].append(round(loss, 4))
    median = {way: statistics.median(t) for way, t in times.items()}
    result = {
        "model": args.model, "method": args.method, "rank": args.rank, "batch": args.batch, "seq": args.seq,
        "threads": args.threads, "steps_timed_per_way": len(times["float32"]),
        "median_step_seconds": {k: round(v, 3) for k, v in median.items()},
        "time_ratio_bf16_to_float32": round(median["bf16"] / median["float32"], 3),
        "losses_same_steps": losses,
        "command": f"python benchmarks/cpu_bf16.py --method {args.method} --steps {args.steps} --rounds {args.rounds} "
                   f"--threads {args.threads}",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
