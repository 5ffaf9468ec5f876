"""``balora lab noise``: does BA-LoRA's gain over PiSSA grow with the label noise of pre-training?

Design (what makes it a controlled experiment)
----------------------------------------------
Stage 1 makes one "pre-trained" checkpoint per noise level p by *full* fine-tuning the same base
encoder (every weight, no adapter) on the same labelled examples (the first half of the task's
training split, in a seeded order) for the same number of steps, with the same optimiser, learning
rate, batch order, head initialisation and dropout masks (one seed). The only difference is that a
fraction p of the labels is flipped. The flipped sets are nested: the examples flipped at 20 % are
among those flipped at 40 %, each with the same wrong label. Only the encoder (no head) is kept.

Stage 2 adapts every checkpoint with each method and seed to the clean downstream task: the *other*
half of the training split (disjoint from stage 1) with its true labels, and the task's test split;
one `balora compare` grid per noise level, identical but for ``model.name``.

So two downstream runs that differ in the noise level differ only in the checkpoint, and two
checkpoints differ only in which labels they were shown; any change in downstream accuracy, and in
BA-LoRA − PiSSA, is caused by the pre-training label noise (on CPU the runs are deterministic). This
is unlike the paper's probe, which compared different model families (RoBERTa vs T5).
Limits: stage 1 is continued *supervised* training on the same domain (a proxy for noisy
pre-training, not language-model pre-training), and a flipped label is conflicting evidence about
the very task adapted to downstream.

Spec::

    experiment: noise
    output_dir: docs/results/lab/noise
    base_model: asset:minilm
    data: {source: asset:rotten-tomatoes, splits: rotten-tomatoes, text_field: text, label_field: label}
    noise_levels: [0.0, 0.2, 0.4]
    pretrain: {steps: 100, learning_rate: 5.0e-5, batch_size: 16, max_length: 64, seed: 0}
    downstream: {base: nlu-rotten-tomatoes-minilm.yaml, overrides: [training.max_steps=100]}
    methods: [lora, pissa, ba-lora]
    seeds: [1, 2, 3]
    gain: [ba-lora, pissa]

Outputs: ``checkpoints/noise-<p>/`` (model files, gitignored; ``noise.json`` written last marks it
done), ``data/downstream/{train,test}.jsonl``, ``downstream/noise-<p>/`` (compare runs),
``results.json``, ``README.md``, ``plots/noise.png``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

from balora.core.config import ConfigError
from balora.experiments.lab.common import (LabSpec, Say, check_keys, compare_spec, figure, fmt, get_list, get_mapping, get_value,
                     load_lab_spec, md_table, now, regenerate_lines, save_figure, say_print, separated, set_path,
                     spread_words, stats, write_json)

KEYS = ("base_model", "data", "noise_levels", "pretrain", "downstream", "methods", "seeds", "gain")
DATA_KEYS = ("source", "splits", "split_seed", "text_field", "text_pair_field", "label_field", "train_limit",
             "test_limit", "test_fraction", "validation_fraction")
PRETRAIN_DEFAULTS: dict[str, Any] = {"steps": 100, "learning_rate": 5e-5, "batch_size": 16, "max_length": 64,
                                     "seed": 0, "noise_seed": 0, "weight_decay": 0.0, "warmup_steps": 0,
                                     "examples": None, "log_every": 10}
PRETRAIN_KINDS: dict[str, Any] = {"steps": int, "learning_rate": (int, float), "batch_size": int,
                                  "max_length": int, "seed": int, "noise_seed": int, "weight_decay": (int, float),
                                  "warmup_steps": int, "examples": int, "log_every": int}
DOWNSTREAM_KEYS = ("base", "base_config", "overrides", "grid")


# ---------------------------------------------------------------------------- data
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


def _write_if_changed(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ---------------------------------------------------------------------------- stage 1
def full_finetune(model_name: str, texts: Sequence[str], labels: Sequence[int], num_labels: int, *,
                  pairs: Sequence[str] | None = None, steps: int, learning_rate: float, batch_size: int,
                  max_length: int, seed: int, weight_decay: float = 0.0, warmup_steps: int = 0,
                  log_every: int = 10, say: Say = say_print) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune every weight of ``model_name`` (+ a fresh head) for ``steps`` AdamW steps; returns
    (model, tokenizer, info). Linear warm-up then linear decay to 0.

    Deterministic given ``seed``: the head's initialisation, the batch order (a seeded permutation
    per pass over the data) and the dropout masks do not depend on the labels, so two calls that
    differ only in ``labels`` see identical batches. The caller's torch RNG is left untouched."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from balora.assets import resolve

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


def _level_name(p: float) -> str:
    return f"noise-{p:g}"


# ---------------------------------------------------------------------------- the spec
class _Setup:
    """Everything the spec decides, checked before anything runs."""

    def __init__(self, spec: LabSpec) -> None:
        from balora.training.run_config import run_config_from_dict

        self.spec = spec
        self.base_model = get_value(spec, spec.data, "base_model", str, "asset:minilm", "base_model")
        data = get_mapping(spec, "data", {"source": "asset:rotten-tomatoes", "splits": "rotten-tomatoes"})
        check_keys(spec, data, DATA_KEYS, "data")
        try:
            self.data_cfg = run_config_from_dict({"model": {"name": self.base_model, "task": "nlu"},
                                                  "data": data}).data
        except ConfigError as error:
            raise ConfigError(f"{spec.path}: {error}") from None
        self.levels = [float(p) for p in get_list(spec, "noise_levels", (int, float), default=[0.0, 0.2, 0.4])]
        for i, p in enumerate(self.levels):
            if not 0 <= p < 1:
                raise spec.error(f"noise_levels[{i}]", f"a fraction of flipped labels in [0, 1), got {p}")
        if len({_level_name(p) for p in self.levels}) != len(self.levels):
            raise spec.error("noise_levels", f"repeated level in {self.levels}")
        pre = get_mapping(spec, "pretrain", {})
        check_keys(spec, pre, tuple(PRETRAIN_DEFAULTS), "pretrain")
        self.pretrain = {k: get_value(spec, pre, k, PRETRAIN_KINDS[k], d, f"pretrain.{k}")
                         for k, d in PRETRAIN_DEFAULTS.items()}
        for key in ("steps", "batch_size", "max_length"):
            if self.pretrain[key] < 1:
                raise spec.error(f"pretrain.{key}", f"must be >= 1, got {self.pretrain[key]}")
        self.methods = get_list(spec, "methods", str, default=["lora", "pissa", "ba-lora"])
        self.seeds = get_list(spec, "seeds", int, default=[1, 2, 3])
        self.gain = get_list(spec, "gain", str, default=["ba-lora", "pissa"])
        if len(self.gain) != 2 or any(m not in self.methods for m in self.gain):
            raise spec.error("gain", f"expected two of the methods {self.methods} (gain = first − second), "
                                     f"got {self.gain}")
        downstream = get_mapping(spec, "downstream")
        check_keys(spec, downstream, DOWNSTREAM_KEYS, "downstream")
        out = spec.output_dir
        self.checkpoints = {p: out / "checkpoints" / _level_name(p) for p in self.levels}
        self.data_dir = out / "data" / "downstream"
        self.compare_specs = {}
        for p in self.levels:
            cspec = compare_spec(spec, downstream, "downstream", name=_level_name(p),
                                 output_dir=out / "downstream" / _level_name(p),
                                 grid={"method": self.methods, "training.seed": self.seeds},
                                 metrics=["test.accuracy", "test.macro_f1", "test.mcc"])
            d = self.data_cfg
            for key, value in (("model.name", str(self.checkpoints[p])), ("model.task", "nlu"),
                               ("data.source", str(self.data_dir)), ("data.splits", "auto"),
                               ("data.text_field", d.text_field), ("data.text_pair_field", d.text_pair_field),
                               ("data.label_field", d.label_field), ("data.validation_fraction", 0.0)):
                set_path(cspec.base, key, value)
            self.compare_specs[p] = cspec


# ---------------------------------------------------------------------------- running
def _stage_data(setup: _Setup) -> tuple[list[dict], list[dict], list[dict]]:
    """(stage-1 records, stage-2 train records, test records) from the configured task."""
    from balora.training.run import raw_splits
    from balora.training.run_config import RunConfig

    cfg = RunConfig(model=RunConfig().model, data=setup.data_cfg)
    parts = raw_splits(cfg)
    first, second = split_halves(parts["train"], setup.data_cfg.split_seed)
    if setup.pretrain["examples"] is not None:
        first = first[:setup.pretrain["examples"]]
    if not first or not second or not parts["test"]:
        raise setup.spec.error("data", f"too little data: {len(first)} stage-1, {len(second)} stage-2 and "
                                       f"{len(parts['test'])} test examples")
    return first, second, list(parts["test"])


def _fingerprint(rows: list[dict], d: Any) -> str:
    keys = [d.text_field, d.text_pair_field, d.label_field]
    text = json.dumps([[r.get(k) for k in keys if k] for r in rows], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_checkpoints(setup: _Setup, first: list[dict], say: Say) -> dict[str, Any]:
    """Stage 1 for every noise level whose checkpoint is missing; returns each level's noise.json."""
    from balora.training.data import _sorted_labels

    d = setup.data_cfg
    raw = [r[d.label_field] for r in first]
    classes = _sorted_labels(set(raw))
    ids = [classes.index(lab) for lab in raw]
    texts = [str(r[d.text_field]) for r in first]
    pairs = [str(r[d.text_pair_field]) for r in first] if d.text_pair_field else None
    settings = {"base_model": setup.base_model, **setup.pretrain, "examples_used": len(first),
                "classes": [str(c) for c in classes], "data_fingerprint": _fingerprint(first, d),
                "data": {k: getattr(d, k) for k in DATA_KEYS}}
    done: dict[str, Any] = {}
    for p, directory in setup.checkpoints.items():
        marker = directory / "noise.json"
        if marker.is_file():
            stored = json.loads(marker.read_text())
            if stored.get("settings") != json.loads(json.dumps(settings, default=str)) or stored.get("noise") != p:
                raise ConfigError(f"{setup.spec.path}: pretrain: {directory} was made with other settings; delete "
                                  "it to redo stage 1, or choose another output_dir")
            say(f"noise: stage 1 {_level_name(p)}: done ({marker}), skipped")
            done[_level_name(p)] = stored
            continue
        noisy, flipped = flip_labels(ids, p, len(classes), setup.pretrain["noise_seed"])
        say(f"noise: stage 1 {_level_name(p)}: full fine-tuning {setup.base_model} on {len(ids)} examples, "
            f"{len(flipped)} labels flipped")
        pre = setup.pretrain
        model, tokenizer, info = full_finetune(
            setup.base_model, texts, noisy, len(classes), pairs=pairs, steps=pre["steps"],
            learning_rate=float(pre["learning_rate"]), batch_size=pre["batch_size"], max_length=pre["max_length"],
            seed=pre["seed"], weight_decay=float(pre["weight_decay"]), warmup_steps=pre["warmup_steps"],
            log_every=pre["log_every"], say=say)
        save_encoder(model, tokenizer, directory)
        tail = info["losses"][-10:]
        record = {"noise": p, "flipped": len(flipped), "examples": len(ids),
                  "flipped_fingerprint": hashlib.sha1(json.dumps(flipped).encode()).hexdigest()[:16],
                  "final_loss": sum(tail) / len(tail), "losses": info["losses"],
                  "train_seconds": info["train_seconds"], "settings": settings, "finished_at": now()}
        write_json(marker, record)  # last: marks the checkpoint complete
        done[_level_name(p)] = json.loads(marker.read_text())
    return done


def _results(setup: _Setup) -> dict[str, list[dict[str, Any]]]:
    from balora.experiments.compare import build_cells

    rows: dict[str, list[dict[str, Any]]] = {}
    for p, cspec in setup.compare_specs.items():
        rows[_level_name(p)] = []
        for cell in build_cells(cspec):
            if cell.result_path.is_file():
                r = json.loads(cell.result_path.read_text())
                test = r.get("metrics", {}).get("test", {})
                rows[_level_name(p)].append({"cell_id": r["cell_id"], "status": r.get("status"),
                                             "method": r.get("method"), "seed": r.get("seed"),
                                             "accuracy": test.get("accuracy"), "macro_f1": test.get("macro_f1"),
                                             "mcc": test.get("mcc"), "train_seconds": r.get("train_seconds")})
    return rows


def paired_gain(rows: list[dict[str, Any]], a: str, b: str, metric: str = "accuracy") -> dict[str, Any]:
    """Mean ± std over seeds of (a − b), paired by seed (same seed: same head init and data order)."""
    by = {(r["method"], r["seed"]): r[metric] for r in rows if r["status"] == "ok" and r[metric] is not None}
    seeds = sorted({s for (m, s) in by if m == a} & {s for (m, s) in by if m == b})
    return {**stats([by[(a, s)] - by[(b, s)] for s in seeds]), "seeds": seeds}


def report(setup: _Setup, stage1: dict[str, Any]) -> dict[str, Any]:
    rows = _results(setup)
    a, b = setup.gain
    levels = [_level_name(p) for p in setup.levels]
    table = {lvl: {m: stats([r["accuracy"] for r in rows[lvl] if r["method"] == m and r["status"] == "ok"])
                   for m in setup.methods} for lvl in levels}
    gains = {lvl: paired_gain(rows[lvl], a, b) for lvl in levels}
    out = {"experiment": "noise", "spec": str(setup.spec.path), "noise_levels": setup.levels,
           "methods": setup.methods, "seeds": setup.seeds, "gain": {"a": a, "b": b, "by_level": gains},
           "pretrain": setup.pretrain, "base_model": setup.base_model,
           "stage1": {k: {kk: v for kk, v in rec.items() if kk != "losses"} for k, rec in stage1.items()},
           "accuracy": table, "cells": rows, "finished_at": now()}
    plot = _plot(setup, table, gains, setup.spec.output_dir / "plots" / "noise.png")
    out["plots"] = [str(plot.relative_to(setup.spec.output_dir))]
    write_json(setup.spec.output_dir / "results.json", out)
    (setup.spec.output_dir / "README.md").write_text(render(setup, out))
    return out


def _plot(setup: _Setup, table: dict[str, Any], gains: dict[str, Any], path: Path) -> Path:
    fig, (ax1, ax2) = figure(2)
    xs = [100 * p for p in setup.levels]
    levels = [_level_name(p) for p in setup.levels]
    for m in setup.methods:
        pts = [(x, table[lvl][m]) for x, lvl in zip(xs, levels) if table[lvl][m]["n"]]
        if pts:
            ax1.errorbar([x for x, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] or 0 for _, s in pts],
                         marker="o", capsize=3, label=m)
    ax1.set(xlabel="labels flipped in stage 1 (%)", ylabel="downstream test accuracy", title="accuracy")
    ax1.legend(fontsize=8)
    pts = [(x, gains[lvl]) for x, lvl in zip(xs, levels) if gains[lvl]["n"]]
    if pts:
        ax2.errorbar([x for x, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] or 0 for _, s in pts],
                     marker="o", capsize=3, color="tab:red")
    ax2.axhline(0, color="grey", lw=0.8)
    a, b = setup.gain
    ax2.set(xlabel="labels flipped in stage 1 (%)", ylabel=f"{a} − {b} accuracy (paired by seed)",
            title=f"gain of {a} over {b}")
    for ax in (ax1, ax2):
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def render(setup: _Setup, out: dict[str, Any]) -> str:
    spec, pre, a, b = setup.spec, setup.pretrain, *setup.gain
    levels = [_level_name(p) for p in setup.levels]
    lines = ["# Noise: pre-training label noise and BA-LoRA's gain", "",
             "Question: the paper claims BA-LoRA's gain over PiSSA grows with the noise in the pre-training "
             "data. Its evidence compared different model families; here the checkpoints differ only in "
             "the label noise of their (continued) pre-training.", "",
             "## Design", "",
             f"1. **Stage 1 (noisy pre-training).** `{setup.base_model}` is fine-tuned in full (all weights, "
             f"no adapter) on the first half of the training split of `{setup.data_cfg.source}` (seeded split, "
             f"{out['stage1'][levels[0]]['examples'] if levels[0] in out['stage1'] else '?'} examples) with "
             f"{', '.join(f'{100 * p:g} %' for p in setup.levels)} of the labels flipped: {pre['steps']} AdamW "
             f"steps, batch {pre['batch_size']}, learning rate {pre['learning_rate']} (linear warm-up "
             f"{pre['warmup_steps']} steps, then linear decay), max length {pre['max_length']}, seed {pre['seed']}. "
             "Same examples, batch order, head initialisation and dropout masks for every level; the flipped "
             "sets are nested (the examples flipped at a lower level are among those flipped at a higher one, with "
             "the same wrong labels). "
             "The encoder is kept, the head dropped.",
             f"2. **Stage 2 (clean adaptation).** Each checkpoint is adapted with {', '.join(setup.methods)} "
             f"× seeds {', '.join(map(str, setup.seeds))} to the disjoint second half of the training split with "
             "its true labels, and scored on the task's test split; the run configuration is the same for "
             "every checkpoint (`downstream` in the spec).",
             "3. **Why this isolates the noise.** Two stage-2 runs at different noise levels differ only in "
             "the checkpoint, and two checkpoints differ only in which labels they were shown, so a change "
             "in downstream accuracy, or in the gain, is caused by the label noise. Caveats: stage 1 is "
             "continued supervised training on the same domain (a proxy for noisy pre-training, not language-"
             "model pre-training), and its noise is conflicting evidence about the downstream task itself.", "",
             "## Results", "",
             f"Downstream test accuracy, mean ± sample std over seeds; gain = {a} − {b}, paired by seed.", ""]
    header = ["labels flipped", "stage-1 final loss"] + setup.methods + [f"gain {a} − {b}"]
    rows = []
    for p, lvl in zip(setup.levels, levels):
        s1 = out["stage1"].get(lvl)
        rows.append([f"{100 * p:g} %", f"{s1['final_loss']:.3f}" if s1 else "–"]
                    + [fmt(out["accuracy"][lvl][m]) for m in setup.methods]
                    + [fmt(out["gain"]["by_level"][lvl], sign=True)])
    lines += md_table(header, rows) + ["", "![noise](plots/noise.png)", "", "## What reproduced", ""]
    gains = out["gain"]["by_level"]
    have = [(p, gains[lvl]) for p, lvl in zip(setup.levels, levels) if gains[lvl]["n"]]
    if len(have) < 2:
        lines.append("- Not enough finished levels to say how the gain changes with noise.")
    else:
        means = [g["mean"] for _, g in have]
        grows = all(x < y for x, y in zip(means, means[1:]))
        lo, hi = have[0], have[-1]
        lines.append(f"- Gain of {a} over {b}: " + ", ".join(f"{100 * p:g} %: {fmt(g, sign=True)}" for p, g in have)
                     + ".")
        lines.append(f"- The paper's claim (the gain grows with noise): "
                     + ("the mean gain increases at every step" if grows else "the mean gain does not increase "
                        "monotonically") + f"; {100 * hi[0]:g} % vs {100 * lo[0]:g} %: "
                     f"{hi[1]['mean'] - lo[1]['mean']:+.3f}, {spread_words(hi[1], lo[1])}.")
        verdict = separated(hi[1], lo[1])
        lines.append("- Verdict: " + ("reproduced." if grows and verdict else
                                      "not reproduced beyond the seed spread." if not verdict else
                                      "not reproduced (no monotone growth)."))
    lines += [""] + regenerate_lines("noise", spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Stage 1 (missing checkpoints), stage 2 (compare grids, resumable), then the report."""
    from balora.experiments.compare import run_compare

    spec = load_lab_spec(spec_path, "noise", KEYS, required=("downstream",))
    setup = _Setup(spec)
    if only_report:
        stage1 = {_level_name(p): json.loads((d / "noise.json").read_text())
                  for p, d in setup.checkpoints.items() if (d / "noise.json").is_file()}
    else:
        first, second, test = _stage_data(setup)
        _write_if_changed(setup.data_dir / "train.jsonl", second)
        _write_if_changed(setup.data_dir / "test.jsonl", test)
        stage1 = make_checkpoints(setup, first, say)
    for p, cspec in setup.compare_specs.items():
        say(f"noise: stage 2 {_level_name(p)} → {cspec.output_dir}")
        run_compare(cspec, only_summary=only_report, show_progress=show_progress, say=say)
    out = report(setup, stage1)
    say(f"noise: report in {spec.output_dir / 'README.md'}")
    return out
