"""Stage 1 of `balora lab noise`: a seeded half split, nested label flips, and a deterministic full
fine-tune whose only input that differs between noise levels is the labels."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balora.assets import resolve
from balora.core.config import ConfigError
from balora.experiments.report import Say, say_print
from balora.training.data import sorted_labels
from balora.utils import now_iso, write_json

__all__ = ["flip_labels", "full_finetune", "level_name", "make_checkpoints", "save_encoder", "split_halves"]


def level_name(p: float) -> str:
    """A noise level's name: its checkpoint directory and its key in results.json (``noise-0.2``)."""
    return f"noise-{p:g}"


def split_halves(records: Sequence[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded half/half split (original order kept inside each half): stage 1 and stage 2 data."""
    order = list(range(len(records)))
    random.Random(f"{seed}/noise-halves").shuffle(order)
    half = len(order) // 2
    return [records[i] for i in sorted(order[:half])], [records[i] for i in sorted(order[half:])]


def flip_labels(labels: Sequence[int], fraction: float, num_classes: int, seed: int) -> tuple[list[int], list[int]]:
    """Flip ``round(fraction · n)`` labels (seeded); returns (noisy labels, flipped indices).

    Nested by construction: the flipped examples are a prefix of one seeded permutation, and each
    example's wrong label is drawn once, whatever the fraction; so the 20 % flips are a subset of
    the 40 % flips, with the same wrong labels."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    n = len(labels)
    order = list(range(n))
    random.Random(f"{seed}/noise-order").shuffle(order)
    wrong_rng = random.Random(f"{seed}/noise-label")
    # an offset in 1..C-1 from the true class: another class, uniformly (binary: the other one)
    wrong = [(lab + wrong_rng.randrange(1, num_classes)) % num_classes for lab in labels]
    flipped = sorted(order[:round(fraction * n)])
    noisy = list(labels)
    for i in flipped:
        noisy[i] = wrong[i]
    return noisy, flipped


def full_finetune(model_name: str, texts: Sequence[str], labels: Sequence[int], num_labels: int, *,
                  pairs: Sequence[str] | None = None, steps: int, learning_rate: float, batch_size: int,
                  max_length: int, seed: int, weight_decay: float = 0.0, warmup_steps: int = 0,
                  log_every: int = 10, say: Say = say_print) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune every weight of ``model_name`` (+ a fresh head) for ``steps`` AdamW steps; returns
    (model, tokenizer, info). Linear warm-up then linear decay to 0.

    Deterministic given ``seed``: the head's initialisation, the batch order (a seeded permutation
    per pass over the data) and the dropout masks do not depend on the labels, so two calls that
    differ only in ``labels`` see identical batches. The caller's torch RNG is left untouched."""
    import torch  # heavy: only stage 1 trains here
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(texts) != len(labels) or (pairs is not None and len(pairs) != len(texts)):
        raise ValueError("texts, pairs and labels must have the same length")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    path = resolve(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        order_rng = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * batch_size:
            order += torch.randperm(len(texts), generator=order_rng).tolist()
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            return max(0.0, (steps - step) / max(1, steps - warmup_steps))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        losses: list[float] = []
        started = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            batch = tokenizer.pad({k: [enc[k][i] for i in idx] for k in enc}, return_tensors="pt")
            out = model(**batch, labels=torch.tensor([labels[i] for i in idx]))
            out.loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                recent = losses[-log_every:]
                say(f"  step {step + 1}/{steps}: loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return model, tokenizer, {"losses": losses, "train_seconds": time.perf_counter() - started}


def save_encoder(model: Any, tokenizer: Any, directory: Path) -> None:
    """The encoder without its classification head (``model.base_model``), and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model.base_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _fingerprint(rows: list[dict], d: Any) -> str:
    keys = [d.text_field, d.text_pair_field, d.label_field]
    text = json.dumps([[r.get(k) for k in keys if k] for r in rows], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_checkpoints(checkpoints: dict[float, Path], first: list[dict], d: Any, *, base_model: str,
                     pretrain: dict[str, Any], data_keys: Sequence[str], source: str,
                     say: Say = say_print) -> dict[str, Any]:
    """Stage 1 for every noise level (``checkpoints``: level -> directory) whose checkpoint is missing,
    on the records ``first`` read with the data settings ``d``; returns each level's noise.json."""
    raw = [r[d.label_field] for r in first]
    classes = sorted_labels(set(raw))
    ids = [classes.index(lab) for lab in raw]
    texts = [str(r[d.text_field]) for r in first]
    pairs = [str(r[d.text_pair_field]) for r in first] if d.text_pair_field else None
    settings = {"base_model": base_model, **pretrain, "examples_used": len(first),
                "classes": [str(c) for c in classes], "data_fingerprint": _fingerprint(first, d),
                "data": {k: getattr(d, k) for k in data_keys}}
    done: dict[str, Any] = {}
    for p, directory in checkpoints.items():
        marker = directory / "noise.json"
        if marker.is_file():
            stored = json.loads(marker.read_text())
            if stored.get("settings") != json.loads(json.dumps(settings, default=str)) or stored.get("noise") != p:
                raise ConfigError(f"{source}: pretrain: {directory} was made with other settings; delete it "
                                  "to redo stage 1, or choose another output_dir")
            say(f"noise: stage 1 {level_name(p)}: done ({marker}), skipped")
            done[level_name(p)] = stored
            continue
        noisy, flipped = flip_labels(ids, p, len(classes), pretrain["noise_seed"])
        say(f"noise: stage 1 {level_name(p)}: full fine-tuning {base_model} on {len(ids)} examples, "
            f"{len(flipped)} labels flipped")
        pre = pretrain
        model, tokenizer, info = full_finetune(
            base_model, texts, noisy, len(classes), pairs=pairs, steps=pre["steps"],
            learning_rate=float(pre["learning_rate"]), batch_size=pre["batch_size"], max_length=pre["max_length"],
            seed=pre["seed"], weight_decay=float(pre["weight_decay"]), warmup_steps=pre["warmup_steps"],
            log_every=pre["log_every"], say=say)
        save_encoder(model, tokenizer, directory)
        tail = info["losses"][-10:]
        record = {"noise": p, "flipped": len(flipped), "examples": len(ids),
                  "flipped_fingerprint": hashlib.sha1(json.dumps(flipped).encode()).hexdigest()[:16],
                  "final_loss": sum(tail) / len(tail), "losses": info["losses"],
                  "train_seconds": info["train_seconds"], "settings": settings, "finished_at": now_iso()}
        write_json(marker, record)  # last: marks the checkpoint complete
        done[level_name(p)] = json.loads(marker.read_text())
    return done
