"""``balora compare SPEC.yaml``: a grid of runs (methods × seeds × any option), run resumably, then
a summary table of mean ± std per group, a verdict per group, and plots.

SPEC format
-----------
::

    name: rt-methods                               # default: the spec file's stem
    base: configs/nlu-rotten-tomatoes-minilm.yaml  # run config: relative to the spec file, then the
                                                   # cwd, then a packaged preset of that name
    # base_config: {method: lora, model: {...}}    # ... or the run config inline (exactly one of the two)
    output_dir: docs/results/nlu-rotten-tomatoes   # relative to the cwd; default runs/compare-<name>
    grid:                                          # cartesian product, in this order; any key path
      method: [lora, pissa, dora, lora-reg, ba-lora]
      training.seed: [1, 2, 3]
    overrides: [training.max_steps=150]            # KEY=VALUE, applied to every cell before the grid
    metrics: [test.accuracy, test.mcc]             # summary columns; default: every number in `test`
    variants:                                      # optional: named sets of options, one grid axis
      cr-only: {balora.lambda_diversity: 0, balora.lambda_svd: 0}
      dr-only: {balora.lambda_consistency: 0, balora.lambda_svd: 0}

``variants`` is for rows that are not a cartesian product (an ablation: each term alone). It adds a
grid axis named ``variant``, placed first, whose values are the variant names; a cell applies its
variant's options after the overrides and before the other grid keys. An empty mapping (``{}``) is
the base configuration.
    lower_is_better: [forgetting]                  # default: loss, perplexity, cross_entropy, forgetting, *_seconds

A metric path is looked up in a cell's ``metrics`` first, then at the top of its ``result.json``:
``test.accuracy``, ``eval.asdiv.accuracy`` (evaluation harness), ``forgetting``, ``train_seconds``.
A ``lower_is_better`` entry matches a path equal to it or ending in ``.<entry>``.

Every cell's configuration (base → overrides → grid values) is checked before anything runs; an
error names the spec, the grid key and the option's path. ``output_dir`` cannot be set by the grid or
the overrides: a cell always trains into ``<output_dir>/cells/<id>/run``.

Layout and resumption
---------------------
::

    <output_dir>/cells/<id>/result.json   one per finished cell (ok or failed), written atomically
    <output_dir>/cells/<id>/run/          the run directory of `balora train`
    <output_dir>/summary.md, summary.json, plots/{metrics,curves,cost}.png

Several processes may share one spec (one per GPU or core; or ``--shard I/N``): a process claims a
cell by creating ``cells/<id>/running.pid`` atomically and skips cells claimed by a live process.
Cells run sequentially in grid order. A cell with a ``result.json`` is skipped (``--retry-failed``
re-runs the failed ones). A cell killed mid-training has no ``result.json``: the next invocation
*resumes* it from its latest checkpoint in ``run/checkpoints`` (steps already done are not redone);
a cell whose ``run/metrics.json`` exists finished training and only its evaluation is redone. An
exception in a cell is retried ``retries`` times (default 1; a retry resumes the same way) and then
recorded as failed, with the error, in ``result.json`` and in the summary. If the spec changed so
that a cell's stored configuration differs from the new one, compare stops and names the differing
keys instead of mixing results of two configurations.

``result.json`` (``schema_version`` 1)
--------------------------------------
::

    schema_version        1
    cell_id               "method=pissa,training.seed=2" (sanitised to a directory name)
    grid                  {"method": "pissa", "training.seed": 2}: this cell's grid values
    group                 "method=pissa": the grid values except the seed keys
    seed                  training.seed as trained (the Trainer's default when unset)
    method                adapter method
    status                "ok" | "failed"
    error                 null | {"type", "message", "traceback"} of the last attempt
    attempts              attempts made by the invocation that wrote this file
    metrics               {"test": {...}, "untuned": {...} (eval.before_training), "eval": {task: {...}}}
    forgetting            eval.forgetting.forgetting = CE(tuned) - CE(base), or null
    trainable_parameters  int | null;  total_parameters: int | null
    adapter_bytes         bytes under run/adapter/, or null
    peak_rss_mb           metrics.json's peak_rss_mb: this *process's* peak, so with several cells in
                          one process it never decreases from cell to cell
    cell_peak_rss_mb      the process's peak RSS during this cell (Linux: VmHWM, reset through
                          /proc/self/clear_refs when the cell starts; what earlier cells left resident
                          is included), or null where that is unavailable; the summary uses it
    peak_gpu_mb           torch.cuda.max_memory_allocated during the cell, or null without CUDA
    train_seconds         metrics.json's train time (a resumed run counts its last leg only)
    wall_seconds          the cell's wall time in this invocation, all attempts and evaluation included
    global_step           int | null
    train_tokens          prompt + response tokens of the training split (NLG data statistics) or null
    data                  metrics.json's data statistics
    run_dir               "cells/<id>/run", relative to output_dir
    config                the full resolved run configuration
    versions              library versions
    finished_at           ISO 8601 UTC

Summary rule
------------
Cells are grouped by all grid keys except the seed keys (``training.seed`` and any key ending in
``seed``). Each column is the mean ± the sample standard deviation (n − 1) over the group's ok cells
that have the metric. The best mean of each metric column is in bold. Each group gets one line: the
best group of a metric is compared with the runner-up, every other group with the best. Two means are
separated *beyond the seed spread* when the difference of the means is larger than the larger of the
two standard deviations; with fewer than 2 values on either side the comparison is undetermined. This
is a heuristic that flags differences the seeds alone do not explain, not a significance test.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import math
import os
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from balora.core.config import ConfigError
from balora.training.run_config import RunConfig, apply_overrides, parse_override, run_config_from_dict

__all__ = ["SCHEMA_VERSION", "Cell", "CompareSpec", "add_compare_parser", "build_cells", "load_spec", "run_cell",
           "run_compare", "spec_from_dict", "summarize", "write_summary"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPEC_KEYS = ("name", "base", "base_config", "output_dir", "grid", "variants", "overrides", "metrics",
             "lower_is_better")
VARIANT_KEY = "variant"
DEFAULT_LOWER_IS_BETTER = ["loss", "perplexity", "cross_entropy", "forgetting", "train_seconds",
                           "wall_seconds"]
CELL_ID_MAX = 100

TrainFn = Callable[..., dict[str, Any]]
Say = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- the spec
@dataclass
class CompareSpec:
    """A parsed, not yet expanded, comparison spec (see the module doc)."""

    name: str
    base: dict[str, Any]
    output_dir: Path
    grid: dict[str, list[Any]]
    overrides: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    lower_is_better: list[str] = field(default_factory=lambda: list(DEFAULT_LOWER_IS_BETTER))
    source: str = "<spec>"  # for error messages
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def lower_better(self, metric: str) -> bool:
        return any(metric == e or metric.endswith("." + e) for e in self.lower_is_better)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "output_dir": str(self.output_dir), "grid": self.grid,
                "variants": self.variants, "overrides": self.overrides, "metrics": self.metrics, "lower_is_better": self.lower_is_better,
                "base_config": self.base, "source": self.source}


def _read_yaml(path: Path) -> Any:
    from balora.training.run_config import _numbers  # YAML 1.1 reads "1e-3" as a string; the run configs treat it as a number

    try:
        return _numbers(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(error, 'problem', error)})") from None


def _find_base(name: str, spec_dir: Path | None) -> Path:
    candidates = [spec_dir / name] if spec_dir is not None else []
    candidates.append(Path(name))
    from balora.cli.demo import preset_path

    candidates.append(preset_path(Path(name).name))
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"base: {name!r} not found (tried {', '.join(str(p) for p in candidates)})")


def _str_list(data: dict[str, Any], key: str, source: str) -> list[str] | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{source}: {key}: expected a list of strings, got {value!r}")
    return list(value)


def spec_from_dict(data: Any, *, spec_dir: Path | None = None, source: str = "<spec>",
                   default_name: str = "compare") -> CompareSpec:
    """Check a spec mapping (unknown keys, types, the base config) and return a `CompareSpec`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the spec must be a mapping, got {type(data).__name__}")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown spec key; known: {', '.join(SPEC_KEYS)}")
    if ("base" in data) == ("base_config" in data):
        raise ConfigError(f"{source}: give exactly one of base (a run config file) and base_config (inline)")
    if "base" in data:
        if not isinstance(data["base"], str):
            raise ConfigError(f"{source}: base: expected a file path, got {data['base']!r}")
        base_path = _find_base(data["base"], spec_dir)
        base = _read_yaml(base_path) or {}
        if not isinstance(base, dict):
            raise ConfigError(f"{base_path}: the run configuration must be a mapping")
    else:
        base = data["base_config"]
        if not isinstance(base, dict):
            raise ConfigError(f"{source}: base_config: expected a mapping, got {type(base).__name__}")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: expected a non-empty string, got {name!r}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: grid: expected a mapping of key path -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{key}: expected a non-empty list of values, got {values!r}")
        if key == "output_dir":
            raise ConfigError(f"{source}: grid.output_dir: not allowed; each cell trains into "
                              "<output_dir>/cells/<id>/run")
    variants = data.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"{source}: variants: expected a mapping of name -> {{key.path: value}}")
    for vname, options in variants.items():
        if not isinstance(options, dict):
            raise ConfigError(f"{source}: variants.{vname}: expected a mapping of key.path: value, got {options!r}")
        if "output_dir" in options:
            raise ConfigError(f"{source}: variants.{vname}.output_dir: not allowed")
    if variants and VARIANT_KEY in grid:
        raise ConfigError(f"{source}: grid.{VARIANT_KEY}: reserved for the variants axis; name the variants "
                          "under `variants:` instead")
    overrides = _str_list(data, "overrides", source) or []
    for text in overrides:
        if parse_override(text)[0] == ["output_dir"]:
            raise ConfigError(f"{source}: overrides: {text!r}: set the spec's output_dir instead")
    output_dir = data.get("output_dir", f"runs/compare-{name}")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{source}: output_dir: expected a path, got {output_dir!r}")
    lower = _str_list(data, "lower_is_better", source)
    return CompareSpec(name=name, base=base, output_dir=Path(output_dir), grid=dict(grid), overrides=overrides,
                       metrics=_str_list(data, "metrics", source) or [],
                       lower_is_better=DEFAULT_LOWER_IS_BETTER.copy() if lower is None else lower,
                       source=source, variants={str(k): dict(v) for k, v in variants.items()})


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a spec file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    return spec_from_dict(_read_yaml(path), spec_dir=path.parent, source=str(path), default_name=path.stem)


# ---------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One run of the grid."""

    id: str
    grid: dict[str, Any]
    group: str
    config: RunConfig
    dir: Path

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"


def is_seed_key(key: str) -> bool:
    return key == "training.seed" or key.endswith("seed")


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))  # true/null/numbers/lists as YAML would read them back


def _cell_id(values: dict[str, Any]) -> str:
    raw = ",".join(f"{k}={_value_text(v)}" for k, v in values.items()) or "base"
    safe = re.sub(r"[^A-Za-z0-9._+=,-]", "_", raw)
    if safe != raw or len(safe) > CELL_ID_MAX:
        # sanitising or truncating can merge two ids: the hash of the raw text keeps them apart
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:CELL_ID_MAX - 9]}-{digest}"
    return safe


def group_label(values: dict[str, Any]) -> str:
    shown = [f"{k}={_value_text(v)}" for k, v in values.items() if not is_seed_key(k)]
    return ", ".join(shown) or "all"


def _set_path(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"empty key part in {key!r}")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _resolve(raw: dict[str, Any], values: dict[str, Any], run_dir: Path,
             variants: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    data = copy.deepcopy(raw)
    for key, value in values.items():
        if key == VARIANT_KEY and variants is not None:
            for path, option in variants[value].items():
                _set_path(data, path, option)
        else:
            _set_path(data, key, value)
    data["output_dir"] = str(run_dir)
    return run_config_from_dict(data)


def build_cells(spec: CompareSpec) -> list[Cell]:
    """Expand the grid and check every cell's configuration; nothing runs or is written."""
    from balora.training.run_config import _numbers

    try:
        raw = apply_overrides(copy.deepcopy(spec.base), spec.overrides)
        _resolve(raw, {}, spec.output_dir)
    except ConfigError as error:
        raise ConfigError(f"{spec.source}: base + overrides: {error}") from None
    grid = {k: [_numbers(v) for v in values] for k, values in spec.grid.items()}
    variants = {name: {k: _numbers(v) for k, v in opts.items()} for name, opts in spec.variants.items()}
    if variants:
        grid = {VARIANT_KEY: list(variants), **grid}
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
        cid = _cell_id(values)
        if cid in seen:
            raise ConfigError(f"{spec.source}: grid: cells {seen[cid]} and {values} get the same id {cid!r}")
        seen[cid] = values
        cell_dir = spec.output_dir / "cells" / cid
        try:
            cfg = _resolve(raw, values, cell_dir / "run", variants)
        except ConfigError as error:
            raise ConfigError(f"{spec.source}: cell {cid}: {error}") from None
        cells.append(Cell(cid, values, group_label(values), cfg, cell_dir))
    _check_eval_tasks(cells, spec.source)
    return cells


def _check_eval_tasks(cells: list[Cell], source: str) -> None:
    wanted = sorted({t for c in cells for t in c.config.eval.tasks})
    if not wanted:
        return
    try:
        from balora.evaluation import harness
    except ImportError as error:
        raise ConfigError(f"{source}: eval.tasks {wanted} need balora.evaluation.harness ({error})") from None
    unknown = [t for t in wanted if t not in harness.TASKS]
    if unknown:
        raise ConfigError(f"{source}: eval.tasks: unknown task(s) {unknown}; known: {', '.join(harness.TASKS)}")


# ---------------------------------------------------------------------------- stored state
def _json_safe(obj: Any) -> Any:
    """NaN and inf become null: result.json and summary.json stay strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a kill while writing never leaves a truncated result.json that would count as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # output_dir is where the cell lives, not what it trained; JSON round trip: tuples vs lists
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "output_dir"}, default=str))


def _diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _diff_paths(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def _stored_config(cell: Cell) -> dict[str, Any] | None:
    if cell.result_path.is_file():
        return json.loads(cell.result_path.read_text()).get("config")
    if (cell.run_dir / "config.yaml").is_file():
        return yaml.safe_load((cell.run_dir / "config.yaml").read_text())
    return None


def _with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration read by the current code: an option added since then (with its default
    value) is not a difference. One that no longer parses is compared as stored."""
    try:
        return run_config_from_dict(copy.deepcopy(stored)).to_dict()
    except ConfigError:
        return stored


def check_stale(cells: list[Cell]) -> None:
    """Refuse to mix results: a stored cell made with another configuration is an error."""
    for cell in cells:
        stored = _stored_config(cell)
        if stored is None:
            continue
        diffs = _diff_paths(_comparable(_with_defaults(stored)), _comparable(cell.config.to_dict()))
        if diffs:
            raise ConfigError(f"cell {cell.id}: {cell.dir} was made with another configuration "
                              f"({'; '.join(diffs[:5])}); delete that directory to redo the cell, or "
                              "choose another output_dir")


def cell_state(cell: Cell) -> str:
    """``ok`` / ``failed`` (result.json), ``partial`` (a run directory, no result), ``pending``."""
    if cell.result_path.is_file():
        return str(json.loads(cell.result_path.read_text()).get("status", "failed"))
    return "partial" if cell.run_dir.exists() else "pending"


def _load_result(cell: Cell) -> dict[str, Any] | None:
    return json.loads(cell.result_path.read_text()) if cell.result_path.is_file() else None


# ---------------------------------------------------------------------------- one cell
def _reset_peak_memory() -> None:
    try:  # Linux ≥ 4.0: "5" resets this process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as error:
        logger.debug("cannot reset the peak RSS (%s); cell_peak_rss_mb will be null", error)
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _cell_peak_rss_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def _peak_gpu_mb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _train(cell: Cell, train_fn: TrainFn, show_progress: bool, say: Say) -> dict[str, Any]:
    """Train the cell, resuming a killed run from its checkpoint; reuse a finished run's metrics."""
    from balora.training.run import latest_checkpoint

    metrics_path = cell.run_dir / "metrics.json"
    if metrics_path.is_file():  # written last by train_run: training finished, only what follows failed
        say(f"  training already finished in {cell.run_dir}; reusing its metrics.json")
        return json.loads(metrics_path.read_text())
    resume = latest_checkpoint(cell.run_dir / "checkpoints") is not None
    if resume:
        say(f"  resuming from {latest_checkpoint(cell.run_dir / 'checkpoints')}")
    return train_fn(cell.config, resume=resume, show_progress=show_progress)


def _evaluate(cell: Cell, say: Say) -> dict[str, Any]:
    """The NLG evaluation harness on the run directory, when the config asks for tasks."""
    ev = cell.config.eval
    if not ev.tasks:
        return {}
    from balora.evaluation.harness import evaluate

    report = evaluate(str(cell.run_dir), list(ev.tasks), limit=ev.limit, batch_size=ev.batch_size,
                      max_new_tokens=ev.max_new_tokens, progress=lambda m: say(f"  {m}"))
    return {task: entry.get("metrics", {}) for task, entry in report.get("tasks", {}).items()}


def _dir_bytes(path: Path) -> int | None:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None


def _train_tokens(data_stats: dict[str, Any]) -> int | None:
    stats = data_stats.get("train_tokens")
    if not isinstance(stats, dict):
        return None
    return int(stats.get("prompt_tokens", 0)) + int(stats.get("response_tokens", 0))


def _base_result(cell: Cell) -> dict[str, Any]:
    from balora.training.run import TRAINING_DEFAULTS

    return {"schema_version": SCHEMA_VERSION, "cell_id": cell.id, "grid": cell.grid, "group": cell.group,
            "seed": cell.config.training.get("seed", TRAINING_DEFAULTS["seed"]), "method": cell.config.method,
            "status": "failed", "error": None, "attempts": 0, "metrics": {}, "forgetting": None,
            "trainable_parameters": None, "total_parameters": None, "adapter_bytes": None,
            "peak_rss_mb": None, "cell_peak_rss_mb": None, "peak_gpu_mb": None, "train_seconds": None,
            "wall_seconds": None, "global_step": None, "train_tokens": None, "data": {},
            "run_dir": str(Path("cells") / cell.id / "run"), "config": cell.config.to_dict(), "versions": {},
            "finished_at": None}


def _fill_ok(result: dict[str, Any], cell: Cell, metrics: dict[str, Any], evaluation: dict[str, Any]) -> None:
    result["metrics"] = {k: metrics[k] for k in ("test", "untuned") if k in metrics}
    if evaluation:
        result["metrics"]["eval"] = evaluation
    result["forgetting"] = evaluation.get("forgetting", {}).get("forgetting")
    result.update(status="ok", error=None, trainable_parameters=metrics.get("trainable_parameters"),
                  total_parameters=metrics.get("total_parameters"), adapter_bytes=_dir_bytes(cell.run_dir / "adapter"),
                  peak_rss_mb=metrics.get("peak_rss_mb"), train_seconds=metrics.get("train_seconds"),
                  global_step=metrics.get("global_step"), data=metrics.get("data", {}),
                  train_tokens=_train_tokens(metrics.get("data", {})), versions=metrics.get("versions", {}))


def run_cell(cell: Cell, *, retries: int = 1, train_fn: TrainFn | None = None, show_progress: bool = True,
             say: Say = _print) -> dict[str, Any]:
    """Train (+ evaluate) one cell, retrying a crash ``retries`` times; writes and returns result.json."""
    from balora.training import run as run_module

    train = train_fn or run_module.train_run  # looked up now: tests may monkeypatch balora.training.run.train_run
    result = _base_result(cell)
    started = time.perf_counter()
    for attempt in range(1, retries + 2):
        result["attempts"] = attempt
        _reset_peak_memory()
        try:
            metrics = _train(cell, train, show_progress, say)
            evaluation = _evaluate(cell, say)
        except Exception as error:  # any crash: retried, then recorded as failed, never dropped
            result["error"] = {"type": type(error).__name__, "message": str(error),
                               "traceback": traceback.format_exc()}
            logger.debug("cell %s attempt %d failed", cell.id, attempt, exc_info=True)
            say(f"  attempt {attempt} failed: {type(error).__name__}: {error}")
            continue
        _fill_ok(result, cell, metrics, evaluation)
        break
    result["cell_peak_rss_mb"] = _cell_peak_rss_mb()
    result["peak_gpu_mb"] = _peak_gpu_mb()
    result["wall_seconds"] = time.perf_counter() - started
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if not result["versions"]:
        result["versions"] = run_module.versions()
    _write_json(cell.result_path, result)
    return result


# ---------------------------------------------------------------------------- summary
def lookup(result: dict[str, Any], path: str) -> float | None:
    """A metric path in a cell result: under ``metrics`` first, then at the top level; numbers only."""
    for root in (result.get("metrics", {}), result):
        node: Any = root
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            return float(node)
    return None


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) >= 2 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def _default_metrics(results: list[dict[str, Any]]) -> list[str]:
    for result in results:
        test = result.get("metrics", {}).get("test", {})
        found = [f"test.{k}" for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if found:
            return found
    return []


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    delta = abs(a["mean"] - b["mean"])
    if a["n"] < 2 or b["n"] < 2:
        return {"delta": delta, "spread": None, "beyond": None}
    spread = max(a["std"], b["std"])
    return {"delta": delta, "spread": spread, "beyond": delta > spread}


def _verdicts(groups: list[dict[str, Any]], metrics: list[str], spec: CompareSpec) -> dict[str, Any]:
    """Per metric: groups ranked best first; best vs runner-up, every other group vs the best."""
    out: dict[str, Any] = {}
    for metric in metrics:
        ranked = [g for g in groups if g["metrics"][metric]["n"] > 0]
        ranked.sort(key=lambda g: g["metrics"][metric]["mean"], reverse=not spec.lower_better(metric))
        entries = []
        for rank, group in enumerate(ranked):
            other = ranked[0] if rank else (ranked[1] if len(ranked) > 1 else None)
            entry = {"group": group["label"], "rank": rank + 1, "against": None}
            if other is not None:
                entry["against"] = other["label"]
                entry.update(_compare(group["metrics"][metric], other["metrics"][metric]))
            entries.append(entry)
        out[metric] = {"best": ranked[0]["label"] if ranked else None, "ranking": entries}
    return out


def summarize(spec: CompareSpec, cells: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers of summary.json from the cells' results (``results``: cell id -> result.json)."""
    metrics = spec.metrics or _default_metrics([r for r in results.values() if r.get("status") == "ok"])
    groups: dict[str, dict[str, Any]] = {}
    for cell in cells:
        group = groups.setdefault(cell.group, {"label": cell.group, "grid": {k: v for k, v in cell.grid.items()
                                                                             if not is_seed_key(k)},
                                               "cells": [], "ok": [], "failed": [], "pending": []})
        group["cells"].append(cell.id)
        result = results.get(cell.id)
        state = "pending" if result is None else ("ok" if result.get("status") == "ok" else "failed")
        group[state].append(cell.id)
    for group in groups.values():
        ok = [results[c] for c in group["ok"]]
        group["metrics"] = {m: _stats([v for r in ok if (v := lookup(r, m)) is not None]) for m in metrics}
        group["cost"] = {name: _stats([v for r in ok if (v := _cost(r, name)) is not None])
                         for name in ("train_seconds", "memory_mb", "adapter_bytes", "trainable_parameters")}
    ordered = list(groups.values())
    verdicts = _verdicts(ordered, metrics, spec)
    done = list(results.values())
    failed = [{"cell_id": r["cell_id"], "group": r.get("group"), "attempts": r.get("attempts"),
               "error": f"{(r.get('error') or {}).get('type')}: {(r.get('error') or {}).get('message')}"}
              for r in done if r.get("status") != "ok"]
    return {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "spec": spec.to_dict(),
        "metrics": metrics, "lower_is_better": [m for m in metrics if spec.lower_better(m)],
        "seed_keys": [k for k in spec.grid if is_seed_key(k)],
        "cells": {"total": len(cells), "ok": sum(len(g["ok"]) for g in ordered), "failed": len(failed),
                  "pending": sum(len(g["pending"]) for g in ordered)},
        "groups": ordered, "verdicts": verdicts, "failed_cells": failed,
        "compute_seconds": sum(r.get("wall_seconds") or 0.0 for r in done),
        "train_seconds": sum(r.get("train_seconds") or 0.0 for r in done),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cost(result: dict[str, Any], name: str) -> float | None:
    if name == "memory_mb":  # this cell's own peak when measurable, else the process's
        name = "cell_peak_rss_mb" if result.get("cell_peak_rss_mb") is not None else "peak_rss_mb"
    value = result.get(name)
    return float(value) if isinstance(value, (int, float)) else None


# ---------------------------------------------------------------------------- Markdown
def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4f}"


def _mean_std(stats: dict[str, Any], n_ok: int, bold: bool = False, digits: Callable[[float], str] = _num) -> str:
    if stats["n"] == 0:
        return "–"
    text = digits(stats["mean"]) + (f" ± {digits(stats['std'])}" if stats["std"] is not None else "")
    if bold:
        text = f"**{text}**"
    return text + (f" (n={stats['n']})" if stats["n"] != n_ok else "")


def _verdict_line(label: str, summary: dict[str, Any]) -> str:
    clauses = []
    for metric, verdict in summary["verdicts"].items():
        entry = next((e for e in verdict["ranking"] if e["group"] == label), None)
        if entry is None:
            clauses.append(f"{metric}: no value")
            continue
        if entry["against"] is None:
            clauses.append(f"{metric}: the only group with a value")
            continue
        where = ("within" if entry["beyond"] is False else "beyond") + " the seed spread"
        if entry["beyond"] is None:
            where = "undetermined (fewer than 2 seeds)"
        spread = f" {'>' if entry['beyond'] else '≤'} {_num(entry['spread'])}" if entry["spread"] is not None else ""
        if entry["delta"] == 0:
            clauses.append(f"{metric}: tied with {entry['against']}")
        elif entry["rank"] == 1:
            clauses.append(f"{metric}: best; vs runner-up {entry['against']}: "
                           f"Δ {_num(entry['delta'])}{spread}, {where}")
        else:
            clauses.append(f"{metric}: #{entry['rank']}, {_num(entry['delta'])} behind {entry['against']}"
                           f"{spread}, {where}")
    return f"- **{label}**: " + "; ".join(clauses)


def _best_labels(summary: dict[str, Any], metric: str) -> set[str]:
    """The best group of a column and any group tied with it (every one of them is bold)."""
    ranking = summary["verdicts"][metric]["ranking"]
    return {e["group"] for e in ranking if e["rank"] == 1 or (e["rank"] > 1 and e["delta"] == 0)}


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    """summary.md: the table, a verdict line per group, failed and pending cells, compute time."""
    metrics, groups, c = summary["metrics"], summary["groups"], summary["cells"]
    arrow = {m: "↓" if m in summary["lower_is_better"] else "↑" for m in metrics}
    best = {m: _best_labels(summary, m) for m in metrics}
    seeds = ", ".join(summary["seed_keys"]) or "none"
    lines = [f"# {summary['name']}", "",
             f"{c['total']} cells: {c['ok']} ok, {c['failed']} failed, {c['pending']} pending. "
             f"Groups: every grid key except the seed keys ({seeds}).",
             "Each entry: mean ± sample std (n − 1) over the group's ok cells; (n=k) where fewer cells have "
             "the metric; **bold**: best mean of the column (↑ higher / ↓ lower is better).", ""]
    header = ["group", "n ok"] + [f"{m} {arrow[m]}" for m in metrics] + ["train s", "peak RSS MB", "adapter MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        n_ok = len(g["ok"])
        row = [g["label"], f"{n_ok}/{len(g['cells'])}"]
        row += [_mean_std(g["metrics"][m], n_ok, bold=g["label"] in best[m]) for m in metrics]
        row += [_mean_std(g["cost"]["train_seconds"], n_ok, digits=lambda x: f"{x:.1f}"),
                _mean_std(g["cost"]["memory_mb"], n_ok, digits=lambda x: f"{x:.0f}"),
                _mean_std(g["cost"]["adapter_bytes"], n_ok, digits=lambda x: f"{x / 1e6:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Does it beat the runner-up beyond the seed spread?", "",
              "Rule: two group means are separated when the difference of the means exceeds the larger of "
              "their two sample stds (needs n ≥ 2 on both sides); a heuristic, not a significance test. "
              "The best group is compared with the runner-up, every other group with the best.", ""]
    lines += [_verdict_line(g["label"], summary) for g in groups]
    if summary["failed_cells"]:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {f['cell_id']} ({f['attempts']} attempts): {f['error']} — cells/{f['cell_id']}/result.json"
                  for f in summary["failed_cells"]]
    pending = [cid for g in groups for cid in g["pending"]]
    if pending:
        lines += ["", "## Pending cells (no result.json yet)", "", *(f"- {cid}" for cid in pending)]
    lines += ["", f"Total compute: {summary['compute_seconds']:.0f} s of cell wall time "
                  f"({summary['train_seconds']:.0f} s training)."]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def _group_histories(cells: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, list[list[dict]]]:
    histories: dict[str, list[list[dict]]] = {}
    for cell in cells:
        path = cell.run_dir / "log_history.json"
        if results.get(cell.id, {}).get("status") == "ok" and path.is_file():
            histories.setdefault(cell.group, []).append(json.loads(path.read_text()))
    return histories


def write_summary(spec: CompareSpec, cells: list[Cell], say: Say = _print) -> dict[str, Any]:
    """summary.json, summary.md and plots/ from the cells' result.json files."""
    results = {c.id: r for c in cells if (r := _load_result(c)) is not None}
    summary = summarize(spec, cells, results)
    plots: list[str] = []
    try:
        from balora.experiments.plots import make_plots
    except ImportError as error:  # matplotlib is the optional `report` extra: the tables do not need it
        say(f"plots skipped: {error} (pip install 'balora[report]')")
    else:
        written = make_plots(summary, _group_histories(cells, results), spec.output_dir / "plots")
        plots = [str(p.relative_to(spec.output_dir)) for p in written]
    summary["plots"] = plots
    _write_json(spec.output_dir / "summary.json", summary)
    (spec.output_dir / "summary.md").write_text(render_markdown(summary, plots))
    return summary


# ---------------------------------------------------------------------------- driver
def run_compare(spec: CompareSpec | str | Path, *, retries: int = 1, dry_run: bool = False,
                only_summary: bool = False, retry_failed: bool = False, show_progress: bool = True,
                train_fn: TrainFn | None = None, after_cell: Callable[[Cell, dict[str, Any]], None] | None = None,
                shard: tuple[int, int] | None = None, say: Say = _print) -> dict[str, Any]:
    """Run the missing cells of a spec, then write the summary; returns summary.json's content.

    ``shard=(i, n)`` runs only the cells at positions i, i + n, i + 2n, ... (1-based): n processes
    (one per GPU or CPU core) share a grid without ever running the same cell; each writes a
    summary of what is finished so far, and ``only_summary`` after the last one gives the whole.
    ``dry_run``: list the cells and their state, run nothing (returns ``{"cells": [...]}``).
    ``only_summary``: rebuild summary and plots from the existing result.json files.
    ``train_fn`` replaces `balora.training.run.train_run`; ``after_cell(cell, result)`` runs after each
    finished cell (tests use both).
    """
    if retries < 0:
        raise ConfigError(f"retries: must be >= 0, got {retries}")
    spec = spec if isinstance(spec, CompareSpec) else load_spec(spec)
    cells = build_cells(spec)
    if dry_run:
        return {"cells": _list_cells(spec, cells, say)}
    check_stale(cells)
    if not only_summary:
        if shard is not None:
            index, count = shard
            if not 1 <= index <= count:
                raise ConfigError(f"--shard {index}/{count}: expected 1 <= I <= N")
            cells_to_run = cells[index - 1::count]
        else:
            cells_to_run = cells
        _run_cells(cells_to_run, retries=retries, retry_failed=retry_failed, show_progress=show_progress,
                   train_fn=train_fn, after_cell=after_cell, say=say)
    summary = write_summary(spec, cells, say)
    c = summary["cells"]
    say(f"{spec.name}: {c['ok']} ok, {c['failed']} failed, {c['pending']} pending of {c['total']} cells; "
        f"summary: {spec.output_dir / 'summary.md'}")
    return summary


def _list_cells(spec: CompareSpec, cells: list[Cell], say: Say) -> list[dict[str, Any]]:
    rows = [{"cell_id": c.id, "group": c.group, "state": cell_state(c), "run_dir": str(c.run_dir)} for c in cells]
    say(f"{spec.name}: {len(cells)} cells → {spec.output_dir}")
    for i, row in enumerate(rows, 1):
        say(f"  [{i}/{len(rows)}] {row['state']:<8} {row['cell_id']}")
    return rows


def _run_cells(cells: list[Cell], *, retries: int, retry_failed: bool, show_progress: bool,
               train_fn: TrainFn | None, after_cell: Callable[[Cell, dict[str, Any]], None] | None,
               say: Say) -> None:
    for i, cell in enumerate(cells, 1):
        state = cell_state(cell)
        if state == "ok" or (state == "failed" and not retry_failed):
            say(f"[{i}/{len(cells)}] {cell.id}: {state} (result.json exists), skipped")
            continue
        owner = _claim(cell)
        if owner is not None:
            say(f"[{i}/{len(cells)}] {cell.id}: being run by process {owner}, skipped")
            continue
        state = cell_state(cell)  # again: another process may have finished it since the first look
        if state == "ok" or (state == "failed" and not retry_failed):
            _release(cell)
            say(f"[{i}/{len(cells)}] {cell.id}: {state} (finished meanwhile), skipped")
            continue
        say(f"[{i}/{len(cells)}] {cell.id} → {cell.run_dir}")
        try:
            result = run_cell(cell, retries=retries, train_fn=train_fn, show_progress=show_progress, say=say)
        finally:
            _release(cell)
        say(f"[{i}/{len(cells)}] {cell.id}: {result['status']} in {result['wall_seconds']:.0f} s")
        if after_cell is not None:
            after_cell(cell, result)


def _claim_path(cell: Cell) -> Path:
    return cell.dir / "running.pid"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _claim(cell: Cell) -> int | None:
    """Mark ``cell`` as run by this process; returns the pid of another live process that holds it.

    Several ``balora compare`` processes can then share one grid (one per GPU or core) and each cell
    runs once. The claim is a pid file created atomically (O_EXCL); one left by a dead process
    (killed, crashed machine) is taken over, so a kill never blocks a cell. Assumes the processes
    share one machine (pids are local).
    """
    path = _claim_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            owner = int(text) if text.isdigit() else None
            if owner is not None and owner != os.getpid() and _pid_alive(owner):
                return owner
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return None
    raise RuntimeError(f"{path}: could not claim the cell (another process keeps re-creating the claim)")


def _release(cell: Cell) -> None:
    path = _claim_path(cell)
    if path.exists() and path.read_text().strip() == str(os.getpid()):
        path.unlink()


# ---------------------------------------------------------------------------- command line
def _parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 1/2; got {text!r}")
    return int(match[1]), int(match[2])


def _cmd_compare(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    summary = run_compare(args.spec, retries=args.retries, dry_run=args.dry_run, only_summary=args.only_summary,
                          retry_failed=args.retry_failed, show_progress=not args.no_progress, shard=args.shard)
    if args.dry_run:
        return 0
    return 1 if summary["cells"]["failed"] else 0


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``balora compare SPEC.yaml`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("compare", help="run a grid of configurations (methods × seeds) and summarise it",
                              description="Run every cell of a comparison spec (resumably), then write "
                                          "summary.md, summary.json and plots/. Exit status 1 if a cell failed.")
    p.add_argument("spec", help="YAML comparison spec (base, grid, overrides, metrics; see balora.experiments.compare)")
    p.add_argument("--retries", type=int, default=1, help="retries of a crashed cell before it is recorded as "
                                                          "failed (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--only-summary", action="store_true", help="rebuild summary and plots from result.json files")
    p.add_argument("--retry-failed", action="store_true", help="run the cells recorded as failed again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during training")
    p.add_argument("--shard", type=_parse_shard, metavar="I/N",
                   help="run only every N-th cell starting at the I-th, so N processes can share the grid; "
                        "then --only-summary once all are done")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (on a shared or busy CPU, 1 per process is often fastest)")
    p.set_defaults(func=_cmd_compare)
    return p
