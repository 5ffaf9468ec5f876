"""Training-step time and peak memory of LoRA, PiSSA, BA-LoRA (ours) and BA-LoRA "as published",
plus the no-grad forward, on the same model, data and seed.

    python benchmarks/overhead.py                        # tiny Llama: 4 layers, d 256, vocab 32k, 4 × 256 tokens
    python benchmarks/overhead.py --model asset:smollm2  # SmolLM2-135M (vocab 49,152)
    python benchmarks/overhead.py --device cuda --dtype bf16

Time: median of --steps timed steps after --warmup, all variants in this process. Memory: each variant
again in a fresh subprocess, because freed memory is reused by the next variant: CPU, the peak resident
set (VmHWM, reset through /proc/self/clear_refs after the base model is built) minus the resident set
before the variant's set-up (adapter copy, teacher copy, optimiser state and the steps all count);
CUDA, max allocated minus allocated before.
"As published" = the authors' approach: a second full copy of the pre-trained model as teacher,
full-vocabulary logits for KL and entropy, `torch.svd_lowrank(Z, q=k+5, niter=2)` of the logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from balora import AdapterConfig, BALoraConfig, build_peft_model
from balora.core import regularizers as R
from balora.core.losses import shifted_targets

VARIANTS = ("lora", "pissa", "ba-lora", "published", "forward")


def tiny_llama(vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def load_model(spec: str, dtype: torch.dtype):
    if spec == "tiny":
        return tiny_llama(32000, dtype)
    from transformers import AutoModelForCausalLM

    from balora.assets import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype)


def make_batch(vocab: int, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt: the terms use only response positions
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def published_loss(student, teacher, batch, cfg: BALoraConfig) -> torch.Tensor:
    """The authors' computation (with their bugs fixed: valid positions, log-softmax)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref = teacher(**inputs).logits
    logits = student(**inputs).logits
    mask = R.valid_positions(batch["labels"])
    rows = logits[mask].float()
    task = F.cross_entropy(rows, shifted_targets(batch["labels"])[mask])
    cons = R.nlg_consistency(rows, ref[mask], None, cfg.temperature)
    div = R.nlg_diversity(rows, None, top_k=0)
    sigma = torch.svd_lowrank(rows, q=cfg.svd_k + 5, niter=2)[1]
    svd = -R.share_of_top_k(sigma, cfg.svd_k, cfg.svd_norm)
    l1, l2, l3 = cfg.lambdas
    return task + l1 * cons + l2 * div + l3 * svd


def build_step(variant: str, base, batch, device: str, rank: int, tmp: Path) -> Callable[[], None]:
    """One training step (forward, backward, AdamW step) of ``variant``, or the no-grad forward."""
    from transformers import TrainingArguments

    from balora.training.trainer import BALoraTrainer

    method = {"lora": "lora", "forward": "pissa"}.get(variant, "pissa" if variant == "pissa" else "ba-lora")
    teacher = copy.deepcopy(base).eval().requires_grad_(False) if variant == "published" else None
    model = build_peft_model(copy.deepcopy(base), AdapterConfig(method=method, r=rank), "nlg").to(device)
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if variant == "forward":
        def step() -> None:
            with torch.no_grad():
                model(**inputs)
        return step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if variant == "ba-lora":
        args = TrainingArguments(str(tmp), report_to=[], use_cpu=device == "cpu", disable_tqdm=True)
        trainer = BALoraTrainer(model=model, args=args, balora_config=BALoraConfig())
        loss_fn = lambda: trainer.compute_loss(model, batch)  # noqa: E731
    elif variant == "published":
        cfg = BALoraConfig()
        loss_fn = lambda: published_loss(model, teacher.to(device), batch, cfg)  # noqa: E731
    else:
        loss_fn = lambda: model(**batch).loss  # noqa: E731  (what a plain Trainer computes)

    def step() -> None:
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variant(step: Callable[[], None], warmup: int, steps: int, device: str) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """VmHWM (the peak resident set since the last reset), else ru_maxrss (peak since start)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


def memory_of(variant: str, args: argparse.Namespace) -> float:
    """Peak memory delta (MB) of ``variant``'s set-up + steps, measured in a fresh subprocess."""
    cmd = [sys.executable, __file__, "--only-memory", variant, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--device", args.device, "--dtype", args.dtype,
           "--warmup", "1", "--steps", "2", "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, asset:smollm2, a path or a hub id")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--only-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tmp = Path("/tmp/balora-bench")

    base = load_model(args.model, dtype).to(args.device)
    batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.device)

    if args.only_memory:  # child process: one variant, print its peak memory delta
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            import gc

            gc.collect()
            if not reset_peak_rss():
                raise SystemExit("peak RSS cannot be reset here (/proc/self/clear_refs); run on Linux")
            before = current_rss_mb()
        time_variant(build_step(args.only_memory, base, batch, args.device, args.rank, tmp), 1, args.steps, args.device)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if args.device == "cuda" else peak_rss_mb() - before
        print(peak)
        return

    variants = args.variants.split(",")
    results: dict[str, Any] = {"model": args.model, "device": args.device, "dtype": args.dtype,
                               "batch": args.batch, "seq": args.seq, "rank": args.rank, "steps_timed": args.steps,
                               "warmup": args.warmup, "threads": args.threads,
                               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                               "torch": torch.__version__, "variants": {}}
    for variant in variants:
        step = build_step(variant, base, batch, args.device, args.rank, tmp)
        times = time_variant(step, args.warmup, args.steps, args.device)
        del step
        results["variants"][variant] = {"median_s": statistics.median(times), "times_s": times,
                                        "peak_mem_mb": memory_of(variant, args)}
        print(f"{variant:>10}: {statistics.median(times):7.3f} s/step   peak mem Δ "
              f"{results['variants'][variant]['peak_mem_mb']:8.1f} MB", flush=True)
    v = results["variants"]
    ratios = {}
    if {"ba-lora", "pissa"} <= v.keys():
        ratios["time_ours_over_pissa"] = v["ba-lora"]["median_s"] / v["pissa"]["median_s"]
        ratios["mem_ours_over_pissa"] = v["ba-lora"]["peak_mem_mb"] / v["pissa"]["peak_mem_mb"]
    if {"ba-lora", "pissa", "forward"} <= v.keys():
        ratios["time_ours_over_pissa_plus_forward"] = v["ba-lora"]["median_s"] / (
            v["pissa"]["median_s"] + v["forward"]["median_s"])
    if {"ba-lora", "published"} <= v.keys():
        ratios["time_published_over_ours"] = v["published"]["median_s"] / v["ba-lora"]["median_s"]
        ratios["mem_published_over_ours"] = v["published"]["peak_mem_mb"] / v["ba-lora"]["peak_mem_mb"]
    results["ratios"] = ratios
    print("\n| variant | s/step (median) | peak memory Δ (MB) |\n|---|---|---|")
    for name, r in v.items():
        print(f"| {name} | {r['median_s']:.3f} | {r['peak_mem_mb']:.0f} |")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
