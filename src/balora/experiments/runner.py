"""Running a comparison: one cell (train, resume, evaluate, measure, retry, write result.json), the
cells in grid order shared between processes, and `run_compare`, which ends with the summary.

Training goes through `balora.training.run.train_run`, looked up when a cell starts (so a test can
replace it with ``monkeypatch.setattr``)."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.grid import Cell, build_cells
from balora.experiments.report import Say, say_print, write_summary
from balora.experiments.reuse import adopt_training, trained_in, with_runs_of
from balora.experiments.selection import (
    choose,
    search_cells,
    selection_complete,
    with_search_training,
    write_selection,
)
from balora.experiments.spec import CompareSpec, load_spec
from balora.experiments.store import SCHEMA_VERSION, cell_state, check_stale, claim, quarantine_result, release
from balora.training.faults import maybe_fail
from balora.training.run_config import RunConfig
from balora.utils import current_peak_rss_mb, now_iso, reset_peak_rss, versions, write_json

__all__ = ["CallbackFactory", "run_cell", "run_compare"]

logger = logging.getLogger(__name__)

# a cell's configuration -> extra transformers.TrainerCallback objects for its training
CallbackFactory = Callable[[RunConfig], Sequence[Any]]


# ---------------------------------------------------------------------------- one cell
def _reset_peak_memory() -> None:
    if not reset_peak_rss():
        logger.debug("cannot reset the peak RSS; cell_peak_rss_mb will include earlier cells' peak")
    import torch  # heavy; a dry run or a summary never gets here

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gpu_mb() -> float | None:
    import torch  # heavy; see _reset_peak_memory

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _train(cell: Cell, callbacks: CallbackFactory | None, show_progress: bool, say: Say) -> dict[str, Any]:
    """Train the cell, resuming a killed run from its checkpoint; reuse a finished run's metrics."""
    from balora.training import run as run_module  # torch and transformers: only when a cell trains

    metrics = run_module.finished_metrics(cell.run_dir)
    if metrics is None:
        adopt_training(cell, say)
    if metrics is not None:  # status.json says finished: only what follows training failed
        say(f"  training already finished in {cell.run_dir}; reusing its metrics.json")
        return metrics
    if (cell.run_dir / "metrics.json").is_file():
        say(f"  {cell.run_dir / 'metrics.json'} is from an unfinished run or does not parse; "
            "resuming the run instead")
    checkpoint = run_module.latest_checkpoint(cell.run_dir / "checkpoints")
    if checkpoint is not None:
        say(f"  resuming from {checkpoint}")
    resume = (cell.run_dir / "config.yaml").is_file() or (cell.run_dir / "checkpoints").is_dir()
    extra: dict[str, Any] = {"callbacks": list(callbacks(cell.config))} if callbacks is not None else {}
    if cell.config.reference_cache == "auto":  # one cache per model and data, shared by the cells
        extra["reference_cache_root"] = cell.reference_cache_root
    return run_module.train_run(cell.config, resume=resume, show_progress=show_progress, **extra)


def _evaluate(cell: Cell, say: Say) -> dict[str, Any]:
    """The NLG evaluation harness on the run directory, when the config asks for tasks."""
    ev = cell.config.eval
    if not ev.tasks:
        return {}
    # the evaluation stack: only for cells with tasks; the same code as `balora train`'s eval.tasks
    from balora.evaluation.run_tasks import evaluate_run_tasks

    return evaluate_run_tasks(cell.run_dir, ev, untuned=False, progress=lambda m: say(f"  {m}"))["tuned"]


def _dir_bytes(path: Path) -> int | None:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else None


def _train_tokens(data_stats: dict[str, Any]) -> int | None:
    tokens = data_stats.get("train_tokens")
    if not isinstance(tokens, dict):
        return None
    return int(tokens.get("prompt_tokens", 0)) + int(tokens.get("response_tokens", 0))


def _base_result(cell: Cell) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "cell_id": cell.id, "grid": cell.grid, "group": cell.group,
            "seed": cell.config.seed, "method": cell.config.method,
            "status": "failed", "error": None, "attempts": 0, "metrics": {}, "forgetting": None,
            "trainable_parameters": None, "total_parameters": None, "adapter_bytes": None,
            "peak_rss_mb": None, "cell_peak_rss_mb": None, "peak_gpu_mb": None, "train_seconds": None,
            "wall_seconds": None, "global_step": None, "train_tokens": None, "data": {},
            "run_dir": str(Path("cells") / cell.id / "run"), "trained_in": None, "config": cell.config.to_dict(),
            "versions": {},
            "finished_at": None}


def _fill_ok(result: dict[str, Any], cell: Cell, metrics: dict[str, Any], evaluation: dict[str, Any]) -> None:
    result["metrics"] = {k: metrics[k] for k in ("validation", "test", "untuned") if k in metrics}
    if evaluation:
        result["metrics"]["eval"] = evaluation
    result["forgetting"] = evaluation.get("forgetting", {}).get("forgetting")
    result.update(status="ok", error=None, trainable_parameters=metrics.get("trainable_parameters"),
                  total_parameters=metrics.get("total_parameters"), adapter_bytes=_dir_bytes(cell.run_dir / "adapter"),
                  peak_rss_mb=metrics.get("peak_rss_mb"), train_seconds=metrics.get("train_seconds"),
                  global_step=metrics.get("global_step"), data=metrics.get("data", {}),
                  train_tokens=_train_tokens(metrics.get("data", {})), versions=metrics.get("versions", {}))


def run_cell(cell: Cell, *, retries: int = 1, show_progress: bool = True, callbacks: CallbackFactory | None = None,
             say: Say = say_print) -> dict[str, Any]:
    """Train (+ evaluate) one cell, retrying a crash ``retries`` times; writes and returns result.json.

    ``callbacks``: extra Trainer callbacks for the cell's training, made from its configuration."""
    result = _base_result(cell)
    started = time.perf_counter()
    for attempt in range(1, retries + 2):
        result["attempts"] = attempt
        _reset_peak_memory()
        try:
            metrics = _train(cell, callbacks, show_progress, say)
            maybe_fail("cell")  # testing hook (balora.training.faults): a kill between training and evaluation
            evaluation = _evaluate(cell, say)
        except Exception as error:  # any crash: retried, then recorded as failed, never dropped
            result["error"] = {"type": type(error).__name__, "message": str(error),
                               "traceback": traceback.format_exc()}
            logger.debug("cell %s attempt %d failed", cell.id, attempt, exc_info=True)
            say(f"  attempt {attempt} failed: {type(error).__name__}: {error}")
            continue
        _fill_ok(result, cell, metrics, evaluation)
        result["trained_in"] = trained_in(cell)
        break
    result["cell_peak_rss_mb"] = current_peak_rss_mb()
    result["peak_gpu_mb"] = _peak_gpu_mb()
    result["wall_seconds"] = time.perf_counter() - started
    result["finished_at"] = now_iso()
    if not result["versions"]:
        result["versions"] = versions()
    write_json(cell.result_path, result)
    return result


# ---------------------------------------------------------------------------- the schedule
def _skip(state: str, retry_failed: bool) -> bool:
    return state == "ok" or (state == "failed" and not retry_failed)


def _run_cells(cells: list[Cell], *, retries: int, retry_failed: bool, show_progress: bool,
               callbacks: CallbackFactory | None, say: Say) -> None:
    for i, cell in enumerate(cells, 1):
        state = cell_state(cell)
        if _skip(state, retry_failed):
            say(f"[{i}/{len(cells)}] {cell.id}: {state} (result.json exists), skipped")
            continue
        owner = claim(cell)
        if owner is not None:
            say(f"[{i}/{len(cells)}] {cell.id}: being run by process {owner}, skipped")
            continue
        state = cell_state(cell)  # again: another process may have finished it since the first look
        if _skip(state, retry_failed):
            release(cell)
            say(f"[{i}/{len(cells)}] {cell.id}: {state} (finished meanwhile), skipped")
            continue
        moved = quarantine_result(cell)
        if moved is not None:
            say(f"[{i}/{len(cells)}] {cell.id}: {cell.result_path} does not parse; moved to {moved.name}, "
                "running the cell again")
        say(f"[{i}/{len(cells)}] {cell.id} → {cell.run_dir}")
        try:
            result = run_cell(cell, retries=retries, show_progress=show_progress, callbacks=callbacks, say=say)
        finally:
            release(cell)
        say(f"[{i}/{len(cells)}] {cell.id}: {result['status']} in {result['wall_seconds']:.0f} s")


def _shard(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    return cells if shard is None else cells[shard[0] - 1::shard[1]]


def _text(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "(nothing searched)"


def _finish_selection(cells: list[Cell], poll_seconds: float, **run: Any) -> None:
    """Wait until every search cell is finished: run those nobody runs, poll those other processes
    hold (a shard that is done early waits for the others, then builds the same choice)."""
    while not selection_complete(cells):
        _run_cells([c for c in cells if cell_state(c) not in ("ok", "failed")], **run)
        if not selection_complete(cells):
            time.sleep(poll_seconds)


def _list_cells(spec: CompareSpec, cells: list[Cell], say: Say, what: str = "cells") -> list[dict[str, Any]]:
    rows = [{"cell_id": c.id, "group": c.group, "state": cell_state(c), "run_dir": str(c.run_dir)} for c in cells]
    where = cells[0].dir.parent.parent if cells else spec.output_dir
    say(f"{spec.name}: {len(cells)} {what} → {where}")
    for i, row in enumerate(rows, 1):
        say(f"  [{i}/{len(rows)}] {row['state']:<8} {row['cell_id']}")
    return rows


def run_compare(spec: CompareSpec | str | Path, *, retries: int = 1, dry_run: bool = False,
                only_summary: bool = False, retry_failed: bool = False, show_progress: bool = True,
                shard: tuple[int, int] | None = None, callbacks: CallbackFactory | None = None,
                say: Say = say_print, poll_seconds: float = 15.0) -> dict[str, Any]:
    """Run the missing cells of a spec, then write the summary; returns summary.json's content.

    ``shard=(i, n)`` runs only the cells at positions i, i + n, i + 2n, ... (1-based): n processes
    (one per GPU or CPU core) share a grid without ever running the same cell; each writes a
    summary of what is finished so far, and ``only_summary`` after the last one gives the whole.
    ``dry_run``: list the cells and their state, run nothing (returns ``{"cells": [...]}``).
    ``only_summary``: rebuild summary and plots from the existing result.json files.
    ``callbacks``: extra Trainer callbacks for each cell, made from its configuration.
    With a ``selection`` block, the search cells run first (sharded the same way); every process
    then waits for the whole search (``poll_seconds``), picks the same settings, and runs its shard
    of the grid with them (`balora.experiments.selection`).
    """
    if retries < 0:
        raise ConfigError(f"retries: must be >= 0, got {retries}")
    if shard is not None and not 1 <= shard[0] <= shard[1]:
        raise ConfigError(f"--shard {shard[0]}/{shard[1]}: expected 1 <= I <= N")
    spec = spec if isinstance(spec, CompareSpec) else load_spec(spec)
    run = {"retries": retries, "retry_failed": retry_failed, "show_progress": show_progress,
           "callbacks": callbacks, "say": say}
    selection = None
    if spec.selection is not None:
        searches = search_cells(spec)
        if dry_run:
            rows = _list_cells(spec, searches, say, "model-selection cells")
            if not selection_complete(searches):
                say(f"{spec.name}: the grid's cells are built once the selection is complete")
                return {"cells": rows}
            return {"cells": rows + _list_cells(spec, build_cells(spec, choose(spec, searches)["choices"]), say)}
        check_stale(searches)
        if only_summary and not selection_complete(searches):
            done = sum(cell_state(c) in ("ok", "failed") for c in searches)
            raise ConfigError(f"{spec.source}: the model selection is not complete ({done} of {len(searches)} "
                              f"search cells finished), so no choice can be summarised yet; run `balora compare "
                              f"{spec.source}` to finish it")
        if not only_summary:
            _run_cells(_shard(searches, shard), **run)
            _finish_selection(searches, poll_seconds, **run)
        selection = choose(spec, searches)
        write_selection(spec, selection)
        say(f"{spec.name}: selected " + "; ".join(f"{g}: {_text(e['choice'])}" for g, e in selection["groups"].items()))
    cells = build_cells(spec, selection["choices"] if selection else None)
    if selection is not None:
        cells = with_search_training(spec, cells, searches, selection["choices"])
    if spec.reuse:
        cells = with_runs_of(cells, spec.reuse)
    if dry_run:
        return {"cells": _list_cells(spec, cells, say)}
    check_stale(cells)
    if not only_summary:
        _run_cells(_shard(cells, shard), **run)
    summary = write_summary(spec, cells, say, selection)
    c = summary["cells"]
    say(f"{spec.name}: {c['ok']} ok, {c['failed']} failed, {c['pending']} pending of {c['total']} cells; "
        f"summary: {spec.output_dir / 'summary.md'}")
    return summary
