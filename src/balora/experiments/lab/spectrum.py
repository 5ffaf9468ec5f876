"""``balora lab spectrum``: representation collapse, measured (the paper's spectra and t-SNE figures).

Each method × seed is a `balora compare` cell trained with a `SpectrumCallback`: at the given
optimiser steps (0 = before the first update) it runs the model, in eval mode and without
gradients, over a fixed subset of the test split and records the singular values and effective
rank (`balora.experiments.lab.spectral`) of the pooled features that feed the classification head and of the
logits. The final step's features are kept for t-SNE. The callback restores train mode and the
RNG state, so training is exactly as without it (tested).

Spec::

    experiment: spectrum
    output_dir: runs/lab-spectrum
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
from pathlib import Path
from typing import Any

import numpy as np

from balora.experiments.grid import build_cells, short_label
from balora.experiments.lab.common import (
    DIFFERENCE_RULE,
    difference_table,
    figure,
    fmt,
    head_lines,
    md_table,
    regenerate_lines,
    save_figure,
)
from balora.experiments.lab.snapshots import KINDS, SpectrumCallback
from balora.experiments.report import Say, say_print
from balora.experiments.runner import run_compare
from balora.experiments.spec import LabSpec, load_lab_spec
from balora.experiments.stats import stats
from balora.experiments.store import load_result
from balora.training.run_config import RunConfig
from balora.utils import now_iso, write_json, write_text_atomic

KEYS = ("compare", "snapshot_steps", "n_examples", "center", "batch_size", "tsne")
COMPARE_KEYS = ("base", "base_config", "grid", "variants", "overrides", "metrics")


class _Setup:
    """Everything the spec decides, checked before anything runs."""

    def __init__(self, spec: LabSpec) -> None:
        self.spec = spec
        self.steps = spec.list_of("snapshot_steps", int)
        if any(s < 0 for s in self.steps):
            raise spec.error("snapshot_steps", f"steps must be >= 0, got {self.steps}")
        self.n_examples = spec.value("n_examples", int, 512)
        if self.n_examples < 2:
            raise spec.error("n_examples", f"must be >= 2, got {self.n_examples}")
        self.center = spec.value("center", bool, False)
        self.batch_size = spec.value("batch_size", int, 64)
        tsne = spec.section("tsne", ("perplexity", "seed"), {})
        self.perplexity = float(tsne.value("perplexity", (int, float), 30))
        self.tsne_seed = tsne.value("seed", int, 0)
        mapping = spec.section("compare", COMPARE_KEYS).data
        self.compare = spec.compare_spec("compare", mapping, name="spectrum", output_dir=spec.output_dir,
                                         metrics=["test.accuracy", "test.macro_f1"])
        tasks = sorted({cell.config.model.task for cell in build_cells(self.compare)} - {"nlu"})
        if tasks:
            raise spec.error("compare", f"spectrum snapshots need a classification run (model.task: nlu), "
                                        f"not {tasks[0]!r}")

    def callbacks(self, cfg: RunConfig) -> list[SpectrumCallback]:
        """The snapshot callback for one cell's training."""
        return [SpectrumCallback(cfg, self.steps, self.n_examples, center=self.center, batch_size=self.batch_size)]


def _cells(setup: _Setup) -> list[dict[str, Any]]:
    rows = []
    for cell in build_cells(setup.compare):
        result = load_result(cell)
        path = cell.run_dir / "spectrum.json"
        if result is None or result.get("status") != "ok" or not path.is_file():
            continue
        rows.append({"cell_id": cell.id, "group": cell.group, "seed": result.get("seed"),
                     "accuracy": result.get("metrics", {}).get("test", {}).get("accuracy"),
                     "spectrum": json.loads(path.read_text()), "final": cell.run_dir / "spectrum_final.npz"})
    return rows


def report(setup: _Setup) -> dict[str, Any]:
    """results.json, README.md and plots from the cells' spectrum.json and spectrum_final.npz files."""
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
           "finished_at": now_iso()}
    plots_dir = setup.spec.output_dir / "plots"
    plots = [_plot_spectra(summary, plots_dir / "spectra.png"), _plot_rank(summary, plots_dir / "effective_rank.png")]
    tsne = _plot_tsne(setup, groups, plots_dir / "tsne.png")
    if tsne is not None:
        plots.append(tsne)
    out["plots"] = [str(p.relative_to(setup.spec.output_dir)) for p in plots]
    write_json(setup.spec.output_dir / "results.json", out)
    write_text_atomic(setup.spec.output_dir / "README.md", render(setup, out))
    return out


def _plot_spectra(summary: dict[str, Any], path: Path) -> Path:
    fig, axes = figure(2)
    for ax, kind in zip(axes, KINDS):
        for group, entry in summary.items():
            sv = entry[f"{kind}_final_spectrum"]
            ax.plot(range(1, len(sv) + 1), sv, marker="." if len(sv) < 20 else None, label=short_label(group))
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
                        marker="o", capsize=3, label=short_label(group))
        ax.set(xlabel="optimiser step", ylabel="effective rank", title=f"{kind}: effective rank")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def _plot_tsne(setup: _Setup, groups: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """t-SNE of the final features of each group's first seed (in spec order), coloured by class."""
    from sklearn.manifold import TSNE  # scikit-learn: only the report's t-SNE needs it

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
        ax.set_title(f"{short_label(group)} (seed {member['seed']})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, markerscale=2)
    return save_figure(fig, path)


def render(setup: _Setup, out: dict[str, Any]) -> str:
    """README.md: the setup, the effective rank per group at the first and final step, and the
    differences of the final feature effective rank between groups."""
    groups = out["groups"]
    lines = head_lines(setup.spec, "Spectrum: representation collapse and effective rank",
                       "Singular-value spectra and effective rank of the last-layer features and of the logits "
                       "during fine-tuning, per method.")
    lines += ["## Setup", "",
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
        first_last.append([short_label(group), str(len(entry["seeds"])), fmt(entry["accuracy"]),
                           fmt(entry["features_effective_rank"][lo], 2), fmt(entry["features_effective_rank"][hi], 2),
                           fmt(entry["logits_effective_rank"][lo], 3), fmt(entry["logits_effective_rank"][hi], 3)])
    lines += md_table(["method", "seeds", "test accuracy", "features erank (first)", "features erank (final)",
                       "logits erank (first)", "logits erank (final)"], first_last)
    lines += ["", "First = the first snapshot step (0: before training), final = the last step trained.", "",
              "![spectra](plots/spectra.png)", "", "![effective rank](plots/effective_rank.png)", "",
              "![t-SNE](plots/tsne.png)", "", "## Final feature effective rank, differences between methods", ""]
    finals = {short_label(g): e["features_effective_rank"][str(e["steps"][-1])]
              for g, e in groups.items() if e["steps"]}
    lines += [*difference_table(finals, digits=2), "", DIFFERENCE_RULE, ""]
    lines += regenerate_lines("spectrum", setup.spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Train every cell with snapshots (resumable through compare), then write the report."""
    spec = load_lab_spec(spec_path, "spectrum", KEYS, required=("compare", "snapshot_steps"))
    setup = _Setup(spec)
    run_compare(setup.compare, only_summary=only_report, show_progress=show_progress, callbacks=setup.callbacks,
                say=say)
    out = report(setup)
    say(f"spectrum: report in {spec.output_dir / 'README.md'}")
    return out
