"""``balora lab spectrum``: representation collapse, measured (the paper's spectra and t-SNE figures).

Each method × seed is a `balora compare` cell trained with a `SpectrumCallback`: at the given
optimiser steps (0 = before the first update) it runs the model, in eval mode and without
gradients, over a fixed subset of the test split and records the singular values and effective
rank (`balora.experiments.lab.spectral`) of the pooled features that feed the classification head and of the
logits. The final step's features are kept for t-SNE. The callback restores train mode and the
RNG state, so training is exactly as without it (tested).

Spec::

    experiment: spectrum
    output_dir: docs/results/lab/spectrum
    compare: {base: nlu-rotten-tomatoes-minilm.yaml, grid: {method: [...], training.seed: [1, 2, 3]},
              overrides: [...]}
    snapshot_steps: [0, 25, 50, 75, 100]
    n_examples: 512         # seeded sample of the test split (data.split_seed), the same for every cell
    center: false           # subtract the feature means before the SVD
    batch_size: 64
    tsne: {perplexity: 30, seed: 0}

Per cell: ``cells/<id>/run/spectrum.json`` and ``spectrum_final.npz`` (features, logits, labels).
Outputs: ``results.json``, ``README.md``, ``plots/{spectra,effective_rank,tsne}.png``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from transformers import TrainerCallback

from balora.experiments.lab.common import (LabSpec, Say, check_keys, compare_spec, figure, fmt, get_list, get_mapping, get_value, group_name,
                     load_lab_spec, md_table, now, regenerate_lines, save_figure, say_print, spread_words, stats,
                     write_json)
from balora.experiments.lab.spectral import effective_rank, singular_values

KEYS = ("compare", "snapshot_steps", "n_examples", "center", "batch_size", "tsne")
COMPARE_KEYS = ("base", "base_config", "grid", "variants", "overrides", "metrics")
KINDS = ("features", "logits")

def snapshot_rows(cfg: Any, n_examples: int) -> list[dict]:
    """A seeded sample of ``n_examples`` test records (original order), the same for every method and
    seed: it depends only on the data settings."""
    from balora.training.run import raw_splits

    test = list(raw_splits(cfg)["test"])
    if not test:
        raise ValueError(f"{cfg.data.source}: no test split to take spectrum snapshots on")
    if n_examples >= len(test):
        return test
    keep = sorted(random.Random(f"{cfg.data.split_seed}/spectrum").sample(range(len(test)), n_examples))
    return [test[i] for i in keep]


def _head_input(store: list[Any]) -> Any:
    x = store[0]
    # BERT-style heads take the pooled (batch, hidden) vector; RoBERTa-style heads take the sequence
    # and use its first token
    return x[:, 0] if x.dim() == 3 else x


class SpectrumCallback(TrainerCallback):
    """Snapshots of the head's input features and the logits at ``steps`` (see the module doc).

    Writes ``<run_dir>/spectrum.json`` after each snapshot (merging with an existing file, so a resumed
    run keeps its earlier snapshots) and ``spectrum_final.npz`` at the end of training."""

    def __init__(self, cfg: Any, steps: Sequence[int], n_examples: int, *, center: bool = False,
                 batch_size: int = 64) -> None:
        self.cfg = cfg
        self.steps = sorted(set(int(s) for s in steps))
        self.n_examples = n_examples
        self.center = center
        self.batch_size = batch_size
        self.run_dir = Path(cfg.output_dir)
        self.path = self.run_dir / "spectrum.json"
        self._batches: list[dict[str, Any]] | None = None
        self._labels: list[int] = []

    # -- data, built lazily: label_map.json is written by train_run before training starts
    def _prepare(self) -> None:
        from balora.training.data import ClassificationDataConfig, build_classification_dataset, classification_collator
        from balora.training.run import load_tokenizer

        label_map = json.loads((self.run_dir / "label_map.json").read_text())
        d = self.cfg.data
        tokenizer = load_tokenizer(self.cfg)
        rows = snapshot_rows(self.cfg, self.n_examples)
        ccfg = ClassificationDataConfig(text_field=d.text_field, text_pair_field=d.text_pair_field,
                                        label_field=d.label_field, max_length=d.max_length)
        examples, _ = build_classification_dataset(rows, tokenizer, ccfg, label_map, f"{d.source}[test]")
        collate = classification_collator(tokenizer)
        self._labels = [int(e["labels"]) for e in examples]
        self._batches = [collate(examples[i:i + self.batch_size]) for i in range(0, len(examples), self.batch_size)]

    def _outputs(self, model: Any) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from balora.training.trainer import BALoraTrainerMixin

        if self._batches is None:
            self._prepare()
        device = next(model.parameters()).device
        was_training = model.training
        devices = [device] if device.type == "cuda" else []
        features, logits = [], []
        model.eval()
        try:  # no dropout, no gradients, and the RNG streams (dropout, sampler) exactly as they were
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for batch in self._batches:
                    store: list[Any] = []
                    hook = BALoraTrainerMixin._capture_head_input(model, store)
                    try:
                        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                        out = model(**inputs)
                    finally:
                        hook.remove()
                    features.append(_head_input(store).float().cpu())
                    logits.append(out.logits.float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(features).numpy(), torch.cat(logits).numpy()

    def _load(self) -> dict[str, Any]:
        if self.path.is_file():
            return json.loads(self.path.read_text())
        return {"n_examples": None, "center": self.center, "snapshots": []}

    def snapshot(self, model: Any, step: int) -> tuple[np.ndarray, np.ndarray]:
        features, logits = self._outputs(model)
        entry: dict[str, Any] = {"step": step}
        for kind, matrix in zip(KINDS, (features, logits)):
            sv = singular_values(matrix, center=self.center)
            entry[kind] = {"shape": list(matrix.shape), "singular_values": sv.tolist(),
                           "effective_rank": effective_rank(sv) if sv.sum() > 0 else None}
        data = self._load()
        data.update(n_examples=len(self._labels), center=self.center)
        data["snapshots"] = sorted([s for s in data["snapshots"] if s["step"] != step] + [entry],
                                   key=lambda s: s["step"])
        write_json(self.path, data)
        return features, logits

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps:  # 0 on a fresh run: the model before any update
            self.snapshot(model, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.steps and state.global_step > 0:
            self.snapshot(model, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        done = {s["step"] for s in self._load()["snapshots"]}
        if state.global_step in done:
            features, logits = self._outputs(model)
        else:  # the last step was not in `steps`: record it too, t-SNE uses the final features
            features, logits = self.snapshot(model, state.global_step)
        np.savez_compressed(self.run_dir / "spectrum_final.npz", features=features, logits=logits,
                            labels=np.asarray(self._labels), step=state.global_step)


# ---------------------------------------------------------------------------- the lab
class _Setup:
    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.steps = get_list(spec, "snapshot_steps", int)
        if any(s < 0 for s in self.steps):
            raise spec.error("snapshot_steps", f"steps must be >= 0, got {self.steps}")
        self.n_examples = get_value(spec, spec.data, "n_examples", int, 512, "n_examples")
        if self.n_examples < 2:
            raise spec.error("n_examples", f"must be >= 2, got {self.n_examples}")
        self.center = get_value(spec, spec.data, "center", bool, False, "center")
        self.batch_size = get_value(spec, spec.data, "batch_size", int, 64, "batch_size")
        tsne = get_mapping(spec, "tsne", {})
        check_keys(spec, tsne, ("perplexity", "seed"), "tsne")
        self.perplexity = float(get_value(spec, tsne, "perplexity", (int, float), 30, "tsne.perplexity"))
        self.tsne_seed = get_value(spec, tsne, "seed", int, 0, "tsne.seed")
        mapping = get_mapping(spec, "compare")
        check_keys(spec, mapping, COMPARE_KEYS, "compare")
        self.compare = compare_spec(spec, mapping, "compare", name="spectrum", output_dir=spec.output_dir,
                                    metrics=["test.accuracy", "test.macro_f1"])

    def train_fn(self):
        from balora.training.run import train_run

        def train(cfg: Any, **kwargs: Any) -> dict[str, Any]:
            if cfg.model.task != "nlu":
                raise ValueError(f"{self.spec.path}: compare: spectrum snapshots need a classification run "
                                 f"(model.task: nlu), not {cfg.model.task!r}")
            callback = SpectrumCallback(cfg, self.steps, self.n_examples, center=self.center,
                                        batch_size=self.batch_size)
            return train_run(cfg, callbacks=[callback], **kwargs)
        return train


def _cells(setup: _Setup) -> list[dict[str, Any]]:
    from balora.experiments.compare import build_cells

    rows = []
    for cell in build_cells(setup.compare):
        result = json.loads(cell.result_path.read_text()) if cell.result_path.is_file() else None
        path = cell.run_dir / "spectrum.json"
        if result is None or result.get("status") != "ok" or not path.is_file():
            continue
        rows.append({"cell_id": cell.id, "group": cell.group, "seed": result.get("seed"),
                     "accuracy": result.get("metrics", {}).get("test", {}).get("accuracy"),
                     "spectrum": json.loads(path.read_text()), "final": cell.run_dir / "spectrum_final.npz"})
    return rows


def _label(group: str) -> str:
    return group_name(group)


def report(setup: _Setup) -> dict[str, Any]:
    rows = _cells(setup)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    summary: dict[str, Any] = {}
    for group, members in groups.items():
        steps = sorted({s["step"] for m in members for s in m["spectrum"]["snapshots"]})
        entry: dict[str, Any] = {"seeds": [m["seed"] for m in members],
                                 "accuracy": stats([m["accuracy"] for m in members]), "steps": steps}
        for kind in KINDS:
            entry[f"{kind}_effective_rank"] = {
                str(step): stats([s[kind]["effective_rank"] for m in members for s in m["spectrum"]["snapshots"]
                                  if s["step"] == step and s[kind]["effective_rank"] is not None])
                for step in steps}
            finals = [m["spectrum"]["snapshots"][-1][kind]["singular_values"] for m in members]
            width = min(len(f) for f in finals)
            normed = np.array([np.asarray(f[:width]) / max(sum(f), 1e-30) for f in finals])
            entry[f"{kind}_final_spectrum"] = normed.mean(axis=0).tolist()
        summary[group] = entry
    out = {"experiment": "spectrum", "spec": str(setup.spec.path), "snapshot_steps": setup.steps,
           "n_examples": setup.n_examples, "center": setup.center, "groups": summary,
           "cells": [{k: v for k, v in r.items() if k not in ("spectrum", "final")} for r in rows],
           "finished_at": now()}
    plots_dir = setup.spec.output_dir / "plots"
    plots = [_plot_spectra(summary, plots_dir / "spectra.png"), _plot_rank(summary, plots_dir / "effective_rank.png")]
    tsne = _plot_tsne(setup, groups, plots_dir / "tsne.png")
    if tsne is not None:
        plots.append(tsne)
    out["plots"] = [str(p.relative_to(setup.spec.output_dir)) for p in plots]
    write_json(setup.spec.output_dir / "results.json", out)
    (setup.spec.output_dir / "README.md").write_text(render(setup, out))
    return out


def _plot_spectra(summary: dict[str, Any], path: Path) -> Path:
    fig, axes = figure(2)
    for ax, kind in zip(axes, KINDS):
        for group, entry in summary.items():
            sv = entry[f"{kind}_final_spectrum"]
            ax.plot(range(1, len(sv) + 1), sv, marker="." if len(sv) < 20 else None, label=_label(group))
        ax.set_yscale("log")
        ax.set(xlabel="index i", ylabel="σ_i / Σσ (final step, mean over seeds)", title=f"{kind}: spectrum")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _plot_rank(summary: dict[str, Any], path: Path) -> Path:
    fig, axes = figure(2)
    for ax, kind in zip(axes, KINDS):
        for group, entry in summary.items():
            cells = [(int(step), s) for step, s in entry[f"{kind}_effective_rank"].items() if s["n"]]
            ax.errorbar([c[0] for c in cells], [c[1]["mean"] for c in cells], yerr=[c[1]["std"] or 0 for c in cells],
                        marker="o", capsize=3, label=_label(group))
        ax.set(xlabel="optimiser step", ylabel="effective rank", title=f"{kind}: effective rank")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _plot_tsne(setup: _Setup, groups: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """t-SNE of the final features of each group's first seed (in spec order), coloured by class."""
    from sklearn.manifold import TSNE

    firsts = {g: next((m for m in members if m["final"].is_file()), None) for g, members in groups.items()}
    firsts = {g: m for g, m in firsts.items() if m is not None}
    if not firsts:
        return None
    fig, axes = figure(len(firsts), width=3.8, height=3.6)
    for ax, (group, member) in zip(axes, firsts.items()):
        with np.load(member["final"]) as data:
            features, labels = data["features"], data["labels"]
        # perplexity must stay below the number of points; small test runs have few
        perplexity = min(setup.perplexity, max(1.0, (len(features) - 1) / 3))
        points = TSNE(n_components=2, perplexity=perplexity, random_state=setup.tsne_seed,
                      init="pca").fit_transform(features.astype(np.float64))
        for cls in sorted(set(labels.tolist())):
            mask = labels == cls
            ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.7, label=f"class {cls}")
        ax.set_title(f"{_label(group)} (seed {member['seed']})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=2)
    return save_figure(fig, path)


def render(setup: _Setup, out: dict[str, Any]) -> str:
    groups = out["groups"]
    lines = ["# Spectrum: representation collapse and effective rank", "",
             "Question (the paper's \"representation collapse\" and t-SNE figures): does fine-tuning concentrate "
             "the last-layer features and the logits in fewer directions, and does BA-LoRA's SVD term keep "
             "more of them?", "",
             "## Setup", "",
             f"- Spec: `{setup.spec.path}`; compare run: `{setup.compare.output_dir}` (its summary.md has the "
             "accuracy and cost per method).",
             f"- Snapshots at steps {', '.join(map(str, setup.steps))} (and the final step) over a fixed seeded "
             f"sample of {out['n_examples']} test examples, in eval mode: the pooled features that feed the "
             "classification head and the logits"
             + (", both centred (column means removed)" if setup.center else " (not centred)") + ".",
             "- Effective rank (Roy & Vetterli 2007): exp of the entropy of the singular values normalised to sum "
             "to 1; between 1 (one direction) and the matrix rank (all directions equally used).", "",
             "## Effective rank", "", "Mean ± sample std over seeds.", ""]
    first_last = []
    for group, entry in groups.items():
        steps = entry["steps"]
        if not steps:
            continue
        lo, hi = str(steps[0]), str(steps[-1])
        first_last.append([_label(group), str(len(entry["seeds"])), fmt(entry["accuracy"]),
                           fmt(entry["features_effective_rank"][lo], 2), fmt(entry["features_effective_rank"][hi], 2),
                           fmt(entry["logits_effective_rank"][lo], 3), fmt(entry["logits_effective_rank"][hi], 3)])
    lines += md_table(["method", "seeds", "test accuracy", "features erank (first)", "features erank (final)",
                       "logits erank (first)", "logits erank (final)"], first_last)
    lines += ["", "First = the first snapshot step (0: before training), final = the last step trained.", "",
              "![spectra](plots/spectra.png)", "", "![effective rank](plots/effective_rank.png)", "",
              "![t-SNE](plots/tsne.png)", "", "## What reproduced", ""]
    finals = {_label(g): e["features_effective_rank"][str(e["steps"][-1])] for g, e in groups.items() if e["steps"]}
    if finals:
        ranked = sorted((g for g in finals if finals[g]["n"]), key=lambda g: -finals[g]["mean"])
        lines.append("- Final feature effective rank, highest first: "
                     + " > ".join(f"{g} ({fmt(finals[g], 2)})" for g in ranked) + ".")
        if "ba-lora" in finals and "pissa" in finals and finals["ba-lora"]["n"] and finals["pissa"]["n"]:
            a, b = finals["ba-lora"], finals["pissa"]
            lines.append(f"- The paper's claim (BA-LoRA keeps a richer, less collapsed representation): ba-lora − "
                         f"pissa = {a['mean'] - b['mean']:+.2f}, {spread_words(a, b)}.")
    else:
        lines.append("- No finished cell yet.")
    lines += [""] + regenerate_lines("spectrum", setup.spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Train every cell with snapshots (resumable through compare), then write the report."""
    from balora.experiments.compare import run_compare

    spec = load_lab_spec(spec_path, "spectrum", KEYS, required=("compare", "snapshot_steps"))
    setup = _Setup(spec)
    run_compare(setup.compare, only_summary=only_report, show_progress=show_progress, train_fn=setup.train_fn(),
                say=say)
    out = report(setup)
    say(f"spectrum: report in {spec.output_dir / 'README.md'}")
    return out
