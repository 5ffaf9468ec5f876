"""Training-step time and peak memory of LoRA, PiSSA, BA-LoRA (ours, online reference), BA-LoRA with
the cached reference (issue 16) and BA-LoRA "as published", plus the no-grad forward, on the same model,
data and seed.

    python benchmarks/overhead.py                        # tiny Llama: 4 layers, d 256, vocab 32k, 4 × 256 tokens
    python benchmarks/overhead.py --model asset:smollm2  # SmolLM2-135M (vocab 49,152)
    python benchmarks/overhead.py --model asset:minilm --task nlu   # MiniLM-L6 sequence classification
    python benchmarks/overhead.py --device cuda --dtype bf16

Time: --repeats rounds; in each round every variant runs --steps timed steps (after --warmup in the
first), variants interleaved so that a slow spell of the machine hits all of them alike; the median
over all timed steps and the spread of the per-round medians are reported, and the ratios are taken
per round (the median ratio and its range). "ba-lora-cached" reads the reference outputs of the batch
from a reference cache built before timing (balora.training.reference_store); its build time is
reported per 1,000 tokens next to the no-grad forward's. Memory: each variant
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

VARIANTS = ("lora", "pissa", "ba-lora", "ba-lora-cached", "published", "forward")
NLU_VARIANTS = ("lora", "pissa", "ba-lora", "ba-lora-cached", "forward")  # "published" is the NLG loss


def tiny_llama(vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype)


def load_model(spec: str, dtype: torch.dtype, task: str = "nlg"):
    if spec == "tiny":
        return tiny_llama(32000, dtype)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from balora.assets import resolve

    if task == "nlu":
        torch.manual_seed(0)  # the new head's init
        return AutoModelForSequenceClassification.from_pretrained(resolve(spec), dtype=dtype, num_labels=2)
    return AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype)


def make_batch(vocab: int, batch: int, seq: int, device: str, task: str = "nlg",
               seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if task == "nlu" else 0, vocab, (batch, seq), generator=g)
    if task == "nlu":
        labels = torch.randint(0, 2, (batch,), generator=g)
    else:
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # a prompt: the terms use only response positions
    return {k: v.to(device) for k, v in
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()}


def cached_reference(model, batch, task: str, tmp: Path, extra_batches: int = 7):
    """A reference cache built as `reference_cache: auto` does before training, over the batch's examples
    (indices 0..B-1, the ones the timed steps read) and ``extra_batches`` more batches of random examples
    (so the build's throughput is measured on more than one batch). Returns (store, the batch with its
    ``example_index``, timings: the identity hashes once, then the build per token)."""
    import shutil

    from balora.training.reference_store import build_reference_cache, reference_manifest

    n, seq = batch["input_ids"].shape[0], batch["input_ids"].shape[1]
    more = make_batch(model.config.vocab_size, n * extra_batches, seq, str(batch["input_ids"].device), task, seed=1)
    rows = [{k: t[i].tolist() for k, t in part.items()} for part in (batch, more)
            for i in range(part["input_ids"].shape[0])]

    def collate(features):
        return {k: torch.tensor([f[k] for f in features], device=batch["input_ids"].device) for k in batch}

    path = tmp / f"cache-{task}"
    shutil.rmtree(path, ignore_errors=True)
    temperature = BALoraConfig(task=task).temperature
    t0 = time.perf_counter()
    manifest = reference_manifest(model, rows, task=task, temperature=temperature)
    t1 = time.perf_counter()
    store = build_reference_cache(model, rows, collate, path, batch_size=n, task=task, temperature=temperature,
                                  max_bytes=None, manifest=manifest)
    t2 = time.perf_counter()
    indexed = {**batch, "example_index": torch.arange(n, device=batch["input_ids"].device)}
    return store, indexed, {"hash_s": t1 - t0, "build_s": t2 - t1, "examples": len(rows), "tokens": len(rows) * seq}


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


def build_step(variant: str, base, batch, device: str, rank: int, tmp: Path, task: str = "nlg",
               info: dict[str, Any] | None = None) -> Callable[[], None]:
    """One training step (forward, backward, AdamW step) of ``variant``, or the no-grad forward.
    ``info`` receives the cache build time of "ba-lora-cached"."""
    from transformers import TrainingArguments

    from balora.training.trainer import BALoraTrainer

    method = {"lora": "lora", "pissa": "pissa", "forward": "pissa"}.get(variant, "ba-lora")
    teacher = copy.deepcopy(base).eval().requires_grad_(False) if variant == "published" else None
    model = build_peft_model(copy.deepcopy(base), AdapterConfig(method=method, r=rank), task).to(device)
    model.train()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if variant == "forward":
        def step() -> None:
            with torch.no_grad():
                model(**inputs)
        return step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    if variant in ("ba-lora", "ba-lora-cached"):
        store, used = None, batch
        if variant == "ba-lora-cached":
            store, used, timing = cached_reference(model, batch, task, tmp)
            if info is not None:
                info["cache_build"] = timing
        args = TrainingArguments(str(tmp), report_to=[], use_cpu=device == "cpu", disable_tqdm=True)
        trainer = BALoraTrainer(model=model, args=args, balora_config=BALoraConfig(task=task), reference_cache=store)
        loss_fn = lambda: trainer.compute_loss(model, dict(used))  # noqa: E731
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
    cmd = [sys.executable, __file__, "--only-memory", variant, "--model", args.model, "--task", args.task,
           "--batch", str(args.batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--device", args.device, "--dtype", args.dtype,
           "--warmup", "1", "--steps", "2", "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def ratio_stats(per_round: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "per_round": per_round}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, asset:smollm2, asset:minilm, a path or a hub id")
    parser.add_argument("--task", default="nlg", choices=["nlg", "nlu"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, variants interleaved")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=None, help=f"comma-separated (default: {','.join(VARIANTS)}; "
                                                         f"nlu: {','.join(NLU_VARIANTS)})")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--only-memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tmp = Path("/tmp/balora-bench")

    base = load_model(args.model, dtype, args.task).to(args.device)
    batch = make_batch(base.config.vocab_size, args.batch, args.seq, args.device, args.task)

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
        step = build_step(args.only_memory, base, batch, args.device, args.rank, tmp, args.task)
        time_variant(step, 1, args.steps, args.device)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if args.device == "cuda" else peak_rss_mb() - before
        print(peak)
        return

    variants = (args.variants or ",".join(NLU_VARIANTS if args.task == "nlu" else VARIANTS)).split(",")
    results: dict[str, Any] = {"model": args.model, "task": args.task, "device": args.device, "dtype": args.dtype,
                               "batch": args.batch, "seq": args.seq, "rank": args.rank,
                               "steps_per_round": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                               "threads": args.threads,
                               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                               "torch": torch.__version__, "variants": {}}
    info: dict[str, Any] = {}
    steps = {v: build_step(v, base, batch, args.device, args.rank, tmp, args.task, info) for v in variants}
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    for round_ in range(args.repeats):
        for variant in variants:
            times[variant].append(time_variant(steps[variant], args.warmup if round_ == 0 else 0, args.steps,
                                               args.device))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{v} {statistics.median(times[v][-1]):.3f}" for v in variants), flush=True)
    del steps
    for variant in variants:
        flat = [t for r in times[variant] for t in r]
        entry = {"median_s": statistics.median(flat), "round_medians_s": [statistics.median(r) for r in times[variant]],
                 "times_s": times[variant]}
        if not args.no_memory:
            entry["peak_mem_mb"] = memory_of(variant, args)
        results["variants"][variant] = entry
    v = results["variants"]

    def per_round(a: str, b: str | tuple[str, str]) -> dict[str, Any] | None:
        bs = (b,) if isinstance(b, str) else b
        if a not in v or not all(x in v for x in bs):
            return None
        return ratio_stats([v[a]["round_medians_s"][i] / sum(v[x]["round_medians_s"][i] for x in bs)
                            for i in range(args.repeats)])

    ratios = {name: r for name, r in {
        "time_cached_over_pissa": per_round("ba-lora-cached", "pissa"),
        "time_ours_over_pissa": per_round("ba-lora", "pissa"),
        "time_ours_over_pissa_plus_forward": per_round("ba-lora", ("pissa", "forward")),
        "time_cached_over_ours": per_round("ba-lora-cached", "ba-lora"),
        "time_published_over_ours": per_round("published", "ba-lora"),
    }.items() if r is not None}
    if not args.no_memory:
        for name, (a, b) in {"mem_cached_over_pissa": ("ba-lora-cached", "pissa"),
                             "mem_ours_over_pissa": ("ba-lora", "pissa"),
                             "mem_published_over_ours": ("published", "ba-lora")}.items():
            if a in v and b in v:
                ratios[name] = v[a]["peak_mem_mb"] / v[b]["peak_mem_mb"]
    if "cache_build" in info:
        build = dict(info["cache_build"])
        build["seconds_per_1000_tokens"] = build["build_s"] / build["tokens"] * 1000
        if "forward" in v:  # the online reference costs about one no-grad forward of each batch, every step
            build["forward_seconds_per_1000_tokens"] = v["forward"]["median_s"] / (args.batch * args.seq) * 1000
        results["cache_build"] = build
    results["ratios"] = ratios
    print("\n| variant | s/step (median) | round medians | peak memory Δ (MB) |\n|---|---|---|---|")
    for name, r in v.items():
        rounds = ", ".join(f"{x:.3f}" for x in r["round_medians_s"])
        mem = f"{r['peak_mem_mb']:.0f}" if "peak_mem_mb" in r else "–"
        print(f"| {name} | {r['median_s']:.3f} | {rounds} | {mem} |")
    for name, value in ratios.items():
        text = (f"{value['median']:.3f} (rounds {value['min']:.3f}–{value['max']:.3f})" if isinstance(value, dict)
                else f"{value:.3f}")
        print(f"{name}: {text}")
    if "cache_build" in results:
        b = results["cache_build"]
        print(f"cache build: {b['seconds_per_1000_tokens']:.3f} s per 1,000 tokens over {b['examples']} examples"
              + (f" (no-grad forward: {b['forward_seconds_per_1000_tokens']:.3f})" if "forward" in v else "")
              + f", plus {b['hash_s']:.2f} s once for the identity hashes")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
