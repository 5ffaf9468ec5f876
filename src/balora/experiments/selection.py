"""Model selection in `balora compare`: each group of the grid (each method, say) gets its own
hyper-parameters, chosen on the validation split before any final cell runs.

For every group of the grid (its non-seed values) and every combination of the candidate values that
``selection.search`` lists for the group's method, a *search cell* trains on the selection seeds with
``eval.validation: true`` and ``eval.test: false``: it reads the validation split (carved from the
training data, seeded by ``data.split_seed``), never the test split. The combination with the best
mean validation metric over the selection seeds wins (ties: the one listed first); the final cells
of that group then run with it, over all the grid's seeds.

Search cells live in ``<output_dir>/selection/cells/<id>/``, run resumably and in shards like the
grid's cells, and the choice is written to ``<output_dir>/selection/selection.json``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.grid import (
    Cell,
    base_options,
    build_cells,
    cell_id,
    expanded_grid,
    group_label,
    is_seed_key,
    reference_cache_root,
    resolve_cell,
)
from balora.experiments.spec import CompareSpec
from balora.experiments.stats import lookup
from balora.experiments.store import cell_state, load_result
from balora.utils import write_json

__all__ = ["SELECTION_DIR", "choose", "render_selection", "search_cells", "selection_complete", "with_search_training"]

SELECTION_DIR = "selection"
# what a search cell evaluates: the validation split only
SEARCH_EVAL = {"eval.test": False, "eval.validation": True, "eval.before_training": False, "eval.tasks": []}


def _seeds(spec: CompareSpec) -> list[int]:
    assert spec.selection is not None
    if spec.selection.seeds is not None:
        return list(spec.selection.seeds)
    grid_seeds = spec.grid.get("training.seed")
    if grid_seeds:
        return [grid_seeds[0]]
    return [build_cells(spec)[0].config.seed]


def _candidate_text(candidate: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in candidate.items())


def search_cells(spec: CompareSpec) -> list[Cell]:
    """The search cells of ``spec`` (empty without a selection block); every config is checked."""
    if spec.selection is None:
        return []
    raw = base_options(spec)
    grid, _ = expanded_grid(spec)
    group_axes = {k: v for k, v in grid.items() if not is_seed_key(k)}
    seeds = _seeds(spec)
    cells: list[Cell] = []
    for combo in itertools.product(*group_axes.values()):
        group_values = dict(zip(group_axes, combo))
        group = group_label(group_values)
        method = resolve_cell(spec, raw, group_values, spec.output_dir).method
        space = spec.selection.space(method)
        for values in itertools.product(*space.values()):
            candidate = dict(zip(space, values))
            for seed in seeds:
                grid_values = {**group_values, **candidate, "training.seed": seed}
                cid = cell_id(grid_values)
                cell_dir = spec.output_dir / SELECTION_DIR / "cells" / cid
                try:
                    cfg = resolve_cell(spec, raw, {**group_values, "training.seed": seed}, cell_dir,
                                       {**candidate, **SEARCH_EVAL})
                except ConfigError as error:
                    raise ConfigError(f"{spec.source}: selection cell {cid}: {error}") from None
                cells.append(Cell(cid, grid_values, group, cfg, cell_dir, reference_cache_root(spec)))
    return cells


def with_search_training(spec: CompareSpec, cells: list[Cell], searches: list[Cell],
                         choices: dict[str, dict[str, Any]]) -> list[Cell]:
    """``cells`` with `Cell.trained_by` set where a finished search cell trained the same group on the
    same seed with the chosen values: the final cell of a selection seed repeats that training exactly.
    Whether the two configurations really train the same model is checked when the cell starts
    (`balora.experiments.reuse`)."""
    finished = {}
    for search in searches:
        if cell_state(search) == "ok":
            key = (search.group, search.config.seed, json.dumps(_candidates(spec, search), sort_keys=True, default=str))
            finished[key] = search.run_dir
    out = []
    for cell in cells:
        choice = json.dumps(choices.get(cell.group, {}), sort_keys=True, default=str)
        source = finished.get((cell.group, cell.config.seed, choice))
        out.append(dataclasses.replace(cell, trained_by=(source,)) if source is not None else cell)
    return out


def _candidates(spec: CompareSpec, cell: Cell) -> dict[str, Any]:
    assert spec.selection is not None
    space = spec.selection.space(cell.config.method)
    return {k: cell.grid[k] for k in space}


def selection_complete(cells: list[Cell]) -> bool:
    """Whether every search cell has finished (ok or failed)."""
    return all(cell_state(c) in ("ok", "failed") for c in cells)


def choose(spec: CompareSpec, cells: list[Cell]) -> dict[str, Any]:
    """Pick each group's best candidate from the finished search cells.

    Returns ``{"metric", "lower_is_better", "seeds", "groups": {group: {"choice", "candidates": [...]}},
    "choices": {group: choice}}``;
    raises ConfigError if a group has no candidate with the metric (every search cell failed)."""
    assert spec.selection is not None
    metric = spec.selection.metric
    lower = spec.lower_better(metric)
    groups: dict[str, dict[str, Any]] = {}
    compute = 0.0
    for cell in cells:
        candidate = _candidates(spec, cell)
        key = json.dumps(candidate, sort_keys=True, default=str)
        entry = groups.setdefault(cell.group, {"candidates": {}})
        row = entry["candidates"].setdefault(key, {"values": candidate, "scores": [], "failed": 0})
        result = load_result(cell)
        compute += (result or {}).get("wall_seconds") or 0.0
        value = lookup(result, metric) if result and result.get("status") == "ok" else None
        if value is None:
            row["failed"] += 1
        else:
            row["scores"].append(value)
    out: dict[str, Any] = {"metric": metric, "lower_is_better": lower, "seeds": _seeds(spec), "groups": {}}
    for group, entry in groups.items():
        rows = []
        for row in entry["candidates"].values():
            mean = statistics.fmean(row["scores"]) if row["scores"] else None
            rows.append({"values": row["values"], "mean": mean, "n": len(row["scores"]), "failed": row["failed"]})
        scored = [r for r in rows if r["mean"] is not None]
        if not scored:
            raise ConfigError(f"{spec.source}: selection: every search cell of {group} failed or lacks {metric}; "
                              f"see {spec.output_dir / SELECTION_DIR / 'cells'}")
        best = (min if lower else max)(scored, key=lambda r: r["mean"])  # the first listed wins a tie
        out["groups"][group] = {"choice": best["values"], "candidates": rows}
    out["choices"] = {group: entry["choice"] for group, entry in out["groups"].items()}
    out["compute_seconds"] = compute  # the search cells' wall time: the selection's share of the compute
    return out


def render_selection(selection: dict[str, Any], plot: str | None = None) -> str:
    """The selection as Markdown: one table row per group and candidate, the chosen one in bold."""
    lines = [f"## Model selection ({selection['metric']} on the validation split, mean over seeds "
             f"{', '.join(map(str, selection['seeds']))}; {'lower' if selection['lower_is_better'] else 'higher'}"
             " is better)", "", "| group | candidate | validation | seeds | chosen |", "|---|---|---|---|---|"]
    for group, entry in selection["groups"].items():
        for row in entry["candidates"]:
            chosen = row["values"] == entry["choice"]
            mean = "failed" if row["mean"] is None else f"{row['mean']:.4f}"
            if chosen:
                mean = f"**{mean}**"
            lines.append(f"| {group} | {_candidate_text(row['values'])} | {mean} | {row['n']} | "
                         f"{'yes' if chosen else ''} |")
    if plot:
        lines += ["", f"![selection]({plot})"]
    return "\n".join(lines) + "\n"


def write_selection(spec: CompareSpec, selection: dict[str, Any]) -> Path:
    """``<output_dir>/selection/selection.json``."""
    return write_json(spec.output_dir / SELECTION_DIR / "selection.json", selection)


def plot_selection(selection: dict[str, Any], path: Path) -> Path | None:
    """Validation metric against each searched value, one line per group (None without matplotlib)."""
    try:  # matplotlib is the optional `report` extra
        from balora.experiments.lab.common import figure, save_figure
    except ImportError:
        return None
    keys = sorted({k for e in selection["groups"].values() for r in e["candidates"] for k in r["values"]})
    if not keys:
        return None
    fig, axes = figure(len(keys))
    for ax, key in zip(axes, keys):
        for group, entry in selection["groups"].items():
            points = sorted((r["values"][key], r["mean"]) for r in entry["candidates"]
                            if key in r["values"] and r["mean"] is not None)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=group)
        numeric = all(isinstance(r["values"].get(key), (int, float)) for e in selection["groups"].values()
                      for r in e["candidates"] if key in r["values"])
        if numeric:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(selection["metric"])
        ax.legend(fontsize=7)
    return save_figure(fig, path)
