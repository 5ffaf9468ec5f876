"""Benchmark: BA-LoRA's NLG loss (task CE + consistency + diversity [+ SVD share]) from hidden states,
fused/chunked (`balora.core.fused`) against naive full logits (`losses.nlg_terms`).

The naive path builds the (M, V) logits as ``h @ W.T`` under autograd, so they are kept for backward
as in a real model; the reference logits come from the reference hidden states without grad. Both
paths are timed forward + backward of ``task/M + λ1·L_CR + λ2·L_DR (+ λ3·L_SVD)``.

Two comparisons, reported separately:
* "no SVD": task + consistency + diversity — the fair comparison of the chunked machinery;
* "with SVD": adds L_SVD; the naive path takes the exact ``svdvals`` of the (M, V) logits (very slow
  on a CPU: run once, no warm-up), the fused path an (M, d) SVD through the output layer's factor.

Peak memory: on CPU, every variant runs once in a fresh subprocess and reports ``ru_maxrss`` after
the call minus the resident set size just before it (inputs already built, so only the loss's own
memory counts; ru_maxrss is the kernel's exact high-water mark, which a polling thread can miss).
On CUDA, ``max_memory_allocated`` minus ``memory_allocated`` before the call.

    python benchmarks/regularizers.py --json bench.json                 # CPU, float32
    python benchmarks/regularizers.py --device cuda --dtype bf16 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from balora.core import losses
from balora.core import regularizers as R
from balora.core.config import BALoraConfig
from balora.core.fused import OutputLayerFactor, fused_token_terms, nlg_terms_from_hidden

VARIANTS = ("naive", "fused", "naive+svd", "fused+svd")
TERMS = ("task_sum", "consistency", "diversity", "svd")


def make_inputs(args: argparse.Namespace):
    """One sequence of M + 1 tokens, all labelled: exactly M valid positions. In-place ops only, so
    that building the inputs leaves no memory high-water mark above the resident set."""
    g = torch.Generator(device=args.device).manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    kw = dict(generator=g, device=args.device)
    hidden = torch.randn(1, args.positions + 1, args.hidden, **kw).to(dtype)
    ref = torch.randn(1, args.positions + 1, args.hidden, **kw).mul_(0.2).add_(hidden).to(dtype)
    weight = torch.randn(args.vocab, args.hidden, **kw).mul_(3.0 / args.hidden**0.5).to(dtype)
    labels = torch.randint(0, args.vocab, (1, args.positions + 1), **kw)
    return hidden, ref, weight, labels


def naive_terms(h, ref, weight, labels, cfg, with_svd: bool) -> losses.MicroBatchTerms:
    logits = h.float() @ weight.float().T  # kept by autograd for backward, as in a model
    with torch.no_grad():
        ref_logits = ref.float() @ weight.float().T
    if with_svd:
        return losses.nlg_terms(logits, labels, cfg, ref_logits)
    # losses.nlg_terms minus its SVD term, step for step.
    mask = R.valid_positions(labels)
    rows = logits[mask].float()
    terms = losses.MicroBatchTerms(
        task_sum=torch.nn.functional.cross_entropy(rows, losses.shifted_targets(labels)[mask], reduction="sum"),
        count=mask.sum())
    terms.consistency = R.nlg_consistency(rows, ref_logits[mask], None, cfg.temperature)
    terms.diversity = R.nlg_diversity(rows, None, cfg.top_k)
    return terms


def fused_terms(h, ref, weight, labels, cfg, with_svd: bool, chunk: int, factor) -> losses.MicroBatchTerms:
    if with_svd:
        return nlg_terms_from_hidden(h, labels, weight, None, cfg, ref, chunk_size=chunk, svd_factor=factor)
    mask = R.valid_positions(labels)
    rows = h[mask]
    task, kl, entropy = fused_token_terms(rows, losses.shifted_targets(labels)[mask], weight, None,
                                          ref[mask], cfg.temperature, cfg.top_k, chunk)
    m = rows.shape[0]
    return losses.MicroBatchTerms(task, mask.sum(), cfg.temperature**2 * kl / m, -entropy / m)


def step(variant: str, inputs, cfg: BALoraConfig, chunk: int, factor):
    """One forward + backward; returns (values, gradient w.r.t. the hidden states)."""
    hidden, ref, weight, labels = inputs
    h = hidden.detach().requires_grad_()
    with_svd = variant.endswith("+svd")
    if variant.startswith("naive"):
        terms = naive_terms(h, ref, weight, labels, cfg, with_svd)
    else:
        terms = fused_terms(h, ref, weight, labels, cfg, with_svd, chunk, factor)
    loss = terms.task_sum / terms.count + cfg.lambda_consistency * terms.consistency \
        + cfg.lambda_diversity * terms.diversity
    if with_svd:
        loss = loss + cfg.lambda_svd * terms.svd
    loss.backward()
    values = {n: getattr(terms, n).item() for n in TERMS if getattr(terms, n) is not None}
    return values, h.grad


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def worker(args: argparse.Namespace) -> None:
    """Fresh process: build inputs, run `args.worker` once, save peak memory, time, values, grad."""
    torch.set_num_threads(args.threads)
    cfg = BALoraConfig()
    inputs = make_inputs(args)
    factor = OutputLayerFactor(inputs[2]) if args.worker == "fused+svd" else None
    if factor is not None:
        _ = factor.r  # computed once per output layer in training, not per step
    # A tiny call first, so that one-time set-up (thread pools, BLAS buffers) is not counted.
    hidden, ref, weight, labels = inputs
    step(args.worker, (hidden[:, :9], ref[:, :9], weight, labels[:, :9]), cfg, args.chunk_size, factor)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, setup_excess = torch.cuda.memory_allocated(), 0
    else:
        before = _rss_bytes()
        setup_excess = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    start = time.perf_counter()
    values, grad = step(args.worker, inputs, cfg, args.chunk_size, factor)
    _sync(args.device)
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    torch.save({"peak": peak, "setup_excess": setup_excess, "seconds": seconds, "values": values,
                "grad": grad.float().cpu()}, args.out)


def run_worker(variant: str, argv: list[str], directory: str) -> dict:
    out = str(Path(directory) / f"{variant.replace('+', '_')}.pt")
    subprocess.run([sys.executable, __file__, *argv, "--worker", variant, "--out", out], check=True)
    return torch.load(out)


def time_interleaved(args: argparse.Namespace, variants: list[str]) -> dict[str, list[float]]:
    """Median-able timings; variants alternate within each repeat so that load drift hits all alike."""
    torch.set_num_threads(args.threads)
    cfg, inputs = BALoraConfig(), make_inputs(args)
    factor = OutputLayerFactor(inputs[2])
    _ = factor.r  # the factor is computed once per output layer, before timing
    times: dict[str, list[float]] = {v: [] for v in variants}
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for variant in variants:
            _sync(args.device)
            start = time.perf_counter()
            step(variant, inputs, cfg, args.chunk_size, factor)
            _sync(args.device)
            if repeat:
                times[variant].append(time.perf_counter() - start)
        print(f"  round {repeat}: " + ", ".join(f"{v} {t[-1]:.2f}s" for v, t in times.items() if t and repeat),
              flush=True)
    return times


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=4096, help="M, valid positions")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-naive-svd", action="store_true", help="skip the (slow) exact naive SVD run")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    argv = sys.argv[1:]
    variants = [v for v in VARIANTS if not (args.skip_naive_svd and v == "naive+svd")]
    print(f"M={args.positions} V={args.vocab} d={args.hidden} {args.device}/{args.dtype} "
          f"threads={args.threads} chunk={args.chunk_size}", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        single = {}
        for v in variants:
            print(f"single run (peak memory) {v} ...", flush=True)
            single[v] = run_worker(v, argv, directory)
    print("timing (interleaved) ...", flush=True)
    times = time_interleaved(args, ["naive", "fused", "fused+svd"])
    # The naive exact SVD is timed once (its single run); everything else is a median.
    seconds = {v: statistics.median(t) for v, t in times.items()}
    if "naive+svd" in single:
        seconds["naive+svd"] = single["naive+svd"]["seconds"]

    mib = {v: single[v]["peak"] / 2**20 for v in variants}
    rows = []
    for v in variants:
        rows.append({"variant": v, "seconds": seconds[v], "peak_mib": mib[v],
                     "timing": f"median of {args.repeats}" if v in times else "single run",
                     "setup_excess_mib": single[v]["setup_excess"] / 2**20, "values": single[v]["values"]})
    pairs = [("fused", "naive")] + ([("fused+svd", "naive+svd")] if "naive+svd" in single else [])
    comparisons = {}
    for f, n in pairs:
        vf, vn = single[f]["values"], single[n]["values"]
        gf, gn = single[f]["grad"], single[n]["grad"]
        comparisons[f"{f} / {n}"] = {
            "time_ratio": seconds[f] / seconds[n], "memory_ratio": mib[f] / mib[n],
            "value_rel_diff": {t: _rel(vf[t], vn[t]) for t in vn},
            "grad_rel_diff": ((gf - gn).norm() / gn.norm()).item(),
        }

    print("\nnaive / fused: task + consistency + diversity (no SVD); +svd: all four terms, the naive")
    print("SVD being the exact svdvals of the (M, V) logits, the fused one through the (d, d) factor.")
    print(f"{'variant':<10} {'time (s)':>9} {'timing':>13} {'peak (MiB)':>11}")
    for r in rows:
        print(f"{r['variant']:<10} {r['seconds']:>9.2f} {r['timing']:>13} {r['peak_mib']:>11.0f}")
        if r["peak_mib"] <= 1.05 * r["setup_excess_mib"]:  # ru_maxrss may not have moved in the call
            print(f"  warning: building the inputs peaked {r['setup_excess_mib']:.0f} MiB above the baseline")
    for name, c in comparisons.items():
        values = ", ".join(f"{t} {d:.1e}" for t, d in c["value_rel_diff"].items())
        print(f"{name}: time x{c['time_ratio']:.2f} (target <= 1.3), memory x{c['memory_ratio']:.3f} "
              f"(target <= 0.25); relative differences: {values}; grad {c['grad_rel_diff']:.1e}")
    fused_svd = seconds["fused+svd"] - seconds["fused"]
    print(f"SVD term alone: fused {fused_svd:.2f}s (median difference fused+svd − fused)"
          + (f", naive {seconds['naive+svd'] - seconds['naive']:.2f}s (single run − naive median)"
             if "naive+svd" in seconds else ""))
    if args.json:
        result = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out", "json")},
                  "torch": torch.__version__, "variants": rows, "comparisons": comparisons,
                  "all_seconds": times}
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
