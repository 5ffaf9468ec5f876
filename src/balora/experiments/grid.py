"""The cells of a comparison: the grid expanded (variants first, then the grid keys in spec order),
each cell's configuration resolved and checked, its id, its group and its directory."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.paired import resolve_pairs
from balora.experiments.spec import VARIANT_KEY, CompareSpec
from balora.training.run_config import RunConfig, apply_overrides, coerce_numbers, run_config_from_dict
from balora.utils import set_path

__all__ = ["Cell", "base_options", "build_cells", "cell_id", "expanded_grid", "group_label", "group_values",
           "is_seed_key", "paired_groups", "reference_cache_root", "resolve_cell", "short_label"]

CELL_ID_MAX = 100


@dataclass
class Cell:
    """One run of the grid."""

    id: str
    grid: dict[str, Any]
    group: str
    config: RunConfig
    dir: Path
    # where cells with `reference_cache: auto` keep their caches, one per identity (model, data, ...), so
    # that every cell with the same base model and data reads one (docs/design/reference-cache.md)
    reference_cache_root: Path | None = None
    # run directories of finished runs that may have trained this cell's exact configuration (the search
    # cell of a selection seed; cells of the comparisons in the spec's `reuse:`): the cell starts from the
    # final checkpoint of the first that did (`balora.experiments.reuse`) instead of training it again
    trained_by: tuple[Path, ...] = ()

    @property
    def run_dir(self) -> Path:
        """Where the cell trains (`balora train`'s run directory)."""
        return self.dir / "run"

    @property
    def result_path(self) -> Path:
        """The cell's result.json: present once the cell finished (ok or failed)."""
        return self.dir / "result.json"


def reference_cache_root(spec: Any) -> Path:
    """The comparison's shared reference caches: ``<output_dir>/reference-caches``."""
    return spec.output_dir / "reference-caches"


def is_seed_key(key: str) -> bool:
    """Seed keys are averaged over, not grouped by: ``training.seed`` and any key ending in ``seed``."""
    return key == "training.seed" or key.endswith("seed")


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))  # true/null/numbers/lists as YAML would read them back


def cell_id(values: dict[str, Any]) -> str:
    """``key=value,...`` of a cell's grid values, safe as a directory name."""
    raw = ",".join(f"{k}={_value_text(v)}" for k, v in values.items()) or "base"
    safe = re.sub(r"[^A-Za-z0-9._+=,-]", "_", raw)
    if safe != raw or len(safe) > CELL_ID_MAX:
        # sanitising or truncating can merge two ids: the hash of the raw text keeps them apart
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:CELL_ID_MAX - 9]}-{digest}"
    return safe


def group_label(values: dict[str, Any]) -> str:
    """The grid values except the seed keys: ``method=pissa``, or ``all`` without any."""
    shown = [f"{k}={_value_text(v)}" for k, v in values.items() if not is_seed_key(k)]
    return ", ".join(shown) or "all"


def group_values(cells: list[Cell]) -> dict[str, dict[str, str]]:
    """Each group's label -> its grid values except the seed keys, as text (the names of ``paired:``)."""
    return {c.group: {k: _value_text(v) for k, v in c.grid.items() if not is_seed_key(k)} for c in cells}


def paired_groups(spec: CompareSpec, cells: list[Cell]) -> list[tuple[str, str]]:
    """The (A, B) group labels the spec's ``paired:`` block compares (`balora.experiments.paired`)."""
    try:
        return resolve_pairs(spec.paired.pairs, group_values(cells), reference=spec.paired.reference,
                             variant_axis=VARIANT_KEY)
    except ValueError as error:
        raise ConfigError(f"{spec.source}: paired.{error}") from None


def short_label(label: str) -> str:
    """A group label for a table row: "method=pissa" -> "pissa", "variant=x" -> "x"."""
    for prefix in ("method=", "variant="):
        if label.startswith(prefix) and ", " not in label:
            return label[len(prefix):]
    return label


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    if any(not part for part in key.split(".")):
        raise ConfigError(f"empty key part in {key!r}")
    try:
        set_path(data, key, value)
    except ValueError as error:
        raise ConfigError(str(error).split(" (")[0]) from None


def _resolve(raw: dict[str, Any], values: dict[str, Any], run_dir: Path,
             variants: dict[str, dict[str, Any]] | None = None,
             per_method: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    data = copy.deepcopy(raw)
    for key, value in values.items():
        if key == VARIANT_KEY and variants is not None:
            for path, option in variants[value].items():
                _set(data, path, option)
        else:
            _set(data, key, value)
    for path, option in (per_method or {}).get(data.get("method"), {}).items():  # after the method is known
        _set(data, path, coerce_numbers(option))
    data["output_dir"] = str(run_dir)
    return run_config_from_dict(data)


def base_options(spec: CompareSpec) -> dict[str, Any]:
    """The spec's base configuration with its overrides applied, checked (not yet a cell)."""
    try:
        raw = apply_overrides(copy.deepcopy(spec.base), spec.overrides)
        _resolve(raw, {}, spec.output_dir)
    except ConfigError as error:
        raise ConfigError(f"{spec.source}: base + overrides: {error}") from None
    return raw


def expanded_grid(spec: CompareSpec) -> tuple[dict[str, list[Any]], dict[str, dict[str, Any]]]:
    """The grid axes (the variants axis first, if any) and the variants' options, numbers coerced."""
    grid = {k: [coerce_numbers(v) for v in values] for k, values in spec.grid.items()}
    variants = {name: {k: coerce_numbers(v) for k, v in opts.items()} for name, opts in spec.variants.items()}
    if variants:
        grid = {VARIANT_KEY: list(variants), **grid}
    return grid, variants


def resolve_cell(spec: CompareSpec, raw: dict[str, Any], values: dict[str, Any], cell_dir: Path,
                 extra: dict[str, Any] | None = None) -> RunConfig:
    """A cell's configuration: base → overrides → variant → grid values → ``extra`` (a selected value)."""
    _, variants = expanded_grid(spec)
    return _resolve(raw, {**values, **(extra or {})}, cell_dir / "run", variants, spec.per_method)


def build_cells(spec: CompareSpec, choices: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
    """Expand the grid and check every cell's configuration; nothing runs or is written.

    ``choices`` maps a group label to option values picked by model selection (`balora.experiments.
    selection`); they are applied after the grid values and do not change the cell ids."""
    raw = base_options(spec)
    grid, variants = expanded_grid(spec)
    # each grid value alone first: a typo is reported against its own key, not a whole cell
    for key, values in grid.items():
        for value in values:
            try:
                _resolve(raw, {key: value}, spec.output_dir, variants)
            except ConfigError as error:
                where = f"variants.{value}" if key == VARIANT_KEY else f"grid key {key!r} = {value!r}"
                raise ConfigError(f"{spec.source}: {where}: {error}") from None
    cells: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        cid = cell_id(values)
        if cid in seen:
            raise ConfigError(f"{spec.source}: grid: cells {seen[cid]} and {values} get the same id {cid!r}")
        seen[cid] = values
        cell_dir = spec.output_dir / "cells" / cid
        choice = (choices or {}).get(group_label(values), {})
        try:
            cfg = _resolve(raw, {**values, **choice}, cell_dir / "run", variants, spec.per_method)
        except ConfigError as error:
            raise ConfigError(f"{spec.source}: cell {cid}: {error}") from None
        cells.append(Cell(cid, values, group_label(values), cfg, cell_dir, reference_cache_root(spec)))
    unused = sorted(set(spec.per_method) - {c.config.method for c in cells})
    if unused:
        raise ConfigError(f"{spec.source}: per_method.{unused[0]}: no cell trains method {unused[0]!r}; "
                          f"the cells' methods: {', '.join(sorted({c.config.method for c in cells}))}")
    _check_eval_tasks(cells, spec.source)
    paired_groups(spec, cells)  # a pair naming no group fails here, before anything runs
    return cells


def _check_eval_tasks(cells: list[Cell], source: str) -> None:
    wanted = sorted({t for c in cells for t in c.config.eval.tasks})
    if not wanted:
        return
    try:  # the harness pulls in the evaluation stack: only imported when a cell asks for tasks
        from balora.evaluation import harness
    except ImportError as error:
        raise ConfigError(f"{source}: eval.tasks {wanted} need balora.evaluation.harness ({error})") from None
    unknown = [t for t in wanted if t not in harness.TASKS]
    if unknown:
        raise ConfigError(f"{source}: eval.tasks: unknown task(s) {unknown}; known: {', '.join(harness.TASKS)}")
