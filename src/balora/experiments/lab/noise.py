"""``balora lab noise``: the gain of one method over another (``gain``, e.g. BA-LoRA over PiSSA) as a
function of the label noise of pre-training.

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
    output_dir: runs/lab-noise
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

import json
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.grid import build_cells
from balora.experiments.lab.common import (
    DIFFERENCE_RULE,
    compare_paired,
    difference_table,
    figure,
    fmt,
    head_lines,
    md_table,
    regenerate_lines,
    save_figure,
)
from balora.experiments.lab.pretrain import level_name, make_checkpoints, split_halves
from balora.experiments.report import Say, paired_section, say_print
from balora.experiments.runner import run_compare
from balora.experiments.spec import CompareSpec, LabSpec, load_lab_spec
from balora.experiments.stats import stats
from balora.experiments.store import load_result
from balora.training.run_config import RunConfig, run_config_from_dict
from balora.utils import now_iso, set_path, write_json, write_text_atomic

KEYS = ("base_model", "data", "noise_levels", "pretrain", "downstream", "methods", "seeds", "gain")
DATA_KEYS = ("source", "splits", "split_seed", "text_field", "text_pair_field", "label_field", "train_limit",
             "test_limit", "test_fraction", "validation_fraction")
PRETRAIN_DEFAULTS: dict[str, Any] = {"steps": 100, "learning_rate": 5e-5, "batch_size": 16, "max_length": 64,
                                     "seed": 0, "noise_seed": 0, "weight_decay": 0.0, "warmup_steps": 0,
                                     "examples": None, "log_every": 10}
PRETRAIN_KINDS: dict[str, Any] = {"steps": int, "learning_rate": (int, float), "batch_size": int,
                                  "max_length": int, "seed": int, "noise_seed": int, "weight_decay": (int, float),
                                  "warmup_steps": int, "examples": int, "log_every": int}
DOWNSTREAM_KEYS = ("base", "base_config", "overrides", "grid", "per_method")


def _write_if_changed(path: Path, rows: list[dict]) -> None:
    # unchanged data keeps its mtime: nothing downstream looks rewritten
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text_atomic(path, text)


# ---------------------------------------------------------------------------- the spec
class _Setup:
    """Everything the spec decides, checked before anything runs."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.base_model = spec.value("base_model", str, "asset:minilm")
        data = spec.section("data", DATA_KEYS, {"source": "asset:rotten-tomatoes", "splits": "rotten-tomatoes"}).data
        try:
            self.data_cfg = run_config_from_dict({"model": {"name": self.base_model, "task": "nlu"},
                                                  "data": data}).data
        except ConfigError as error:
            raise ConfigError(f"{spec.path}: {error}") from None
        self.levels = [float(p) for p in spec.list_of("noise_levels", (int, float), default=[0.0, 0.2, 0.4])]
        for i, p in enumerate(self.levels):
            if not 0 <= p < 1:
                raise spec.error(f"noise_levels[{i}]", f"a fraction of flipped labels in [0, 1), got {p}")
        if len({level_name(p) for p in self.levels}) != len(self.levels):
            raise spec.error("noise_levels", f"repeated level in {self.levels}")
        pre = spec.section("pretrain", tuple(PRETRAIN_DEFAULTS), {})
        self.pretrain = {k: pre.value(k, PRETRAIN_KINDS[k], d) for k, d in PRETRAIN_DEFAULTS.items()}
        for key in ("steps", "batch_size", "max_length"):
            if self.pretrain[key] < 1:
                raise spec.error(f"pretrain.{key}", f"must be >= 1, got {self.pretrain[key]}")
        self.methods = spec.list_of("methods", str, default=["lora", "pissa", "ba-lora"])
        self.seeds = spec.list_of("seeds", int, default=[1, 2, 3])
        self.gain = spec.list_of("gain", str, default=["ba-lora", "pissa"])
        if len(self.gain) != 2 or any(m not in self.methods for m in self.gain):
            raise spec.error("gain", f"expected two of the methods {self.methods} (gain = first − second), "
                                     f"got {self.gain}")
        downstream = spec.section("downstream", DOWNSTREAM_KEYS).data
        out = spec.output_dir
        self.checkpoints = {p: out / "checkpoints" / level_name(p) for p in self.levels}
        self.data_dir = out / "data" / "downstream"
        self.compare_specs: dict[float, CompareSpec] = {}
        for p in self.levels:
            cspec = spec.compare_spec("downstream", downstream, name=level_name(p),
                                      output_dir=out / "downstream" / level_name(p),
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
    from balora.training.run import raw_splits  # torch and transformers: only when stage 1 runs

    cfg = RunConfig(model=RunConfig().model, data=setup.data_cfg)
    parts = raw_splits(cfg)
    first, second = split_halves(parts["train"], setup.data_cfg.split_seed)
    if setup.pretrain["examples"] is not None:
        first = first[:setup.pretrain["examples"]]
    if not first or not second or not parts["test"]:
        raise setup.spec.error("data", f"too little data: {len(first)} stage-1, {len(second)} stage-2 and "
                                       f"{len(parts['test'])} test examples")
    return first, second, list(parts["test"])


def _results(setup: _Setup) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for p, cspec in setup.compare_specs.items():
        rows[level_name(p)] = []
        for cell in build_cells(cspec):
            if (r := load_result(cell)) is not None:
                test = r.get("metrics", {}).get("test", {})
                rows[level_name(p)].append({"cell_id": r["cell_id"], "status": r.get("status"),
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
    """results.json, README.md and the plot from stage 1's records and the compare cells."""
    rows = _results(setup)
    a, b = setup.gain
    levels = [level_name(p) for p in setup.levels]
    table = {lvl: {m: stats([r["accuracy"] for r in rows[lvl] if r["method"] == m and r["status"] == "ok"])
                   for m in setup.methods} for lvl in levels}
    gains = {lvl: paired_gain(rows[lvl], a, b) for lvl in levels}
    out = {"experiment": "noise", "spec": str(setup.spec.path), "noise_levels": setup.levels,
           "methods": setup.methods, "seeds": setup.seeds, "gain": {"a": a, "b": b, "by_level": gains},
           "pretrain": setup.pretrain, "base_model": setup.base_model,
           "stage1": {k: {kk: v for kk, v in rec.items() if kk != "losses"} for k, rec in stage1.items()},
           "accuracy": table, "cells": rows,
           "paired": {level_name(p): compare_paired(cspec) for p, cspec in setup.compare_specs.items()},
           "finished_at": now_iso()}
    plot = _plot(setup, table, gains, setup.spec.output_dir / "plots" / "noise.png")
    out["plots"] = [str(plot.relative_to(setup.spec.output_dir))]
    write_json(setup.spec.output_dir / "results.json", out)
    write_text_atomic(setup.spec.output_dir / "README.md", render(setup, out))
    return out


def _plot(setup: _Setup, table: dict[str, Any], gains: dict[str, Any], path: Path) -> Path:
    fig, (ax1, ax2) = figure(2)
    xs = [100 * p for p in setup.levels]
    levels = [level_name(p) for p in setup.levels]
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
    """README.md: the design, the accuracy and gain per noise level, and the gain's differences between levels."""
    spec, pre, a, b = setup.spec, setup.pretrain, *setup.gain
    levels = [level_name(p) for p in setup.levels]
    lines = head_lines(spec, "Noise: pre-training label noise and the gain of one method over another",
                       f"Downstream accuracy of each method, and the gain of {a} over {b}, on checkpoints that "
                       "differ only in the label noise of their (continued) pre-training.")
    lines += ["## Design", "",
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
    gains = out["gain"]["by_level"]
    lines += md_table(header, rows) + ["", "![noise](plots/noise.png)", "",
                                       f"**gain {a} − {b}, differences between noise levels**", "",
                                       *difference_table({f"{100 * p:g} %": gains[lvl]
                                                          for p, lvl in zip(setup.levels, levels)}),
                                       "", DIFFERENCE_RULE, ""]
    # the verdicts: per noise level, paired by seed, from each level's compare summary
    paired = [(f"{100 * p:g} % flipped", e) for p, lvl in zip(setup.levels, levels)
              for e in (out.get("paired") or {}).get(lvl, [])]
    if paired:
        lines += [*paired_section([e for _, e in paired], where=[w for w, _ in paired])[1:], ""]
    lines += regenerate_lines("noise", spec.path)
    return "\n".join(lines)


def _stored_stage1(setup: _Setup) -> dict[str, Any]:
    """Stage 1's records without running it: each checkpoint's noise.json, else (checkpoints are
    large and often deleted) what the last report kept of it."""
    previous = setup.spec.output_dir / "results.json"
    kept = json.loads(previous.read_text()).get("stage1", {}) if previous.is_file() else {}
    stage1 = {}
    for p, directory in setup.checkpoints.items():
        marker = directory / "noise.json"
        if marker.is_file():
            stage1[level_name(p)] = json.loads(marker.read_text())
        elif level_name(p) in kept:
            stage1[level_name(p)] = kept[level_name(p)]
    return stage1


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Stage 1 (missing checkpoints), stage 2 (compare grids, resumable), then the report."""
    spec = load_lab_spec(spec_path, "noise", KEYS, required=("downstream",))
    setup = _Setup(spec)
    if only_report:
        stage1 = _stored_stage1(setup)
    else:
        first, second, test = _stage_data(setup)
        _write_if_changed(setup.data_dir / "train.jsonl", second)
        _write_if_changed(setup.data_dir / "test.jsonl", test)
        stage1 = make_checkpoints(setup.checkpoints, first, setup.data_cfg, base_model=setup.base_model,
                                  pretrain=setup.pretrain, data_keys=DATA_KEYS, source=str(spec.path), say=say)
    for p, cspec in setup.compare_specs.items():
        say(f"noise: stage 2 {level_name(p)} → {cspec.output_dir}")
        run_compare(cspec, only_summary=only_report, show_progress=show_progress, say=say)
    out = report(setup, stage1)
    say(f"noise: report in {spec.output_dir / 'README.md'}")
    return out
