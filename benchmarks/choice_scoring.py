"""Closed-set answer scoring on the real model: one forward per prompt (answers of one token share it) against
one forward per (prompt, answer), the way the scorer worked before, in the same run.

    python benchmarks/choice_scoring.py [--items 48] [--batch-size 16] [--threads 1]

SmolLM2-135M-Instruct on the first --items privacy-policy test pairs (eval task privacy_policy: "yes" / "no"
after the clause and the question). Prints and writes (--out, JSON) the seconds of each way, their ratio, the
largest |difference| of a log-probability and whether any prediction changed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from balora.evaluation.generation import format_prompt, load_for_eval
from balora.evaluation.likelihood import _encode_pairs, _score_encoded
from balora.training.data import dataset_splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="asset:smollm2")
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/choice_scoring.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ev = load_for_eval(args.model, device="cpu")
    items = dataset_splits("privacy-policy-words")["test"][:args.items]
    choices = sorted({it["response"] for it in items})
    prompts = [format_prompt(it["query"], "alpaca", ev.tokenizer) for it in items]
    encoded = _encode_pairs(ev.tokenizer, [(p, c) for p in prompts for c in choices])
    pad = ev.tokenizer.pad_token_id if ev.tokenizer.pad_token_id is not None else ev.tokenizer.eos_token_id

    _score_encoded(ev.model, encoded[:args.batch_size], args.batch_size, pad)  # warm-up, not timed
    timings, scores = {}, {}
    for way in ("per_answer", "shared_prompt"):
        start = time.perf_counter()
        if way == "per_answer":  # each answer's requests alone: no input is shared, one forward per pair
            got = [None] * len(encoded)
            for j in range(len(choices)):
                part = list(range(j, len(encoded), len(choices)))
                for i, s in zip(part, _score_encoded(ev.model, [encoded[i] for i in part], args.batch_size, pad)):
                    got[i] = s
        else:
            got = _score_encoded(ev.model, encoded, args.batch_size, pad)
        timings[way] = time.perf_counter() - start
        scores[way] = [lp for lp, _ in got]

    def predictions(lps: list[float]) -> list[str]:
        return [choices[max(range(len(choices)), key=lambda j: lps[i * len(choices) + j])]
                for i in range(len(items))]

    result = {
        "model": args.model, "items": len(items), "choices": choices, "batch_size": args.batch_size,
        "threads": args.threads, "seconds_per_answer_forward": round(timings["per_answer"], 2),
        "seconds_shared_prompt": round(timings["shared_prompt"], 2),
        "time_ratio_shared_to_per_answer": round(timings["shared_prompt"] / timings["per_answer"], 3),
        "max_abs_logprob_difference": max(abs(a - b) for a, b in zip(scores["per_answer"], scores["shared_prompt"])),
        "predictions_changed": sum(a != b for a, b in zip(predictions(scores["per_answer"]),
                                                            predictions(scores["shared_prompt"]))),
        "command": f"python benchmarks/choice_scoring.py --items {args.items} --batch-size {args.batch_size} "
                   f"--threads {args.threads}",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
