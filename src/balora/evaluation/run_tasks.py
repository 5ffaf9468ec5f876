"""A run configuration's ``eval.tasks`` on its finished run directory: what ``balora train`` does after
training, and ``balora compare`` for each cell (one code path for both)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["evaluate_run_tasks"]

logger = logging.getLogger(__name__)


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    return {task: entry.get("metrics", {}) for task, entry in report.get("tasks", {}).items()}


def evaluate_run_tasks(run_dir: str | Path, eval_cfg: Any, *, untuned: bool | None = None,
                       progress: Callable[[str], None] | None = None, device: str | None = None
                       ) -> dict[str, dict[str, Any]]:
    """Run ``eval_cfg.tasks`` (with ``eval.limit``, ``eval.batch_size``, ``eval.max_new_tokens``) on
    the run directory through :func:`balora.evaluation.harness.evaluate`: ``<run>/eval/eval.json`` +
    ``<run>/eval/records/``. With ``untuned`` (default: ``eval.before_training``) the untouched base
    model is evaluated on the same tasks too, into ``<run>/eval/untuned/``.

    Returns ``{"tuned": {task: metrics}}`` plus ``"untuned": {task: metrics}`` when asked; empty
    when the configuration names no tasks.
    """
    # looked up at call time, so that a test can replace the harness module
    from balora.evaluation import harness
    from balora.evaluation.generation import load_run_base

    result: dict[str, dict[str, Any]] = {"tuned": {}}
    if not eval_cfg.tasks:
        return result
    untuned = eval_cfg.before_training if untuned is None else untuned
    say = progress or (lambda msg: logger.info("%s", msg))
    kw: dict[str, Any] = {"limit": eval_cfg.limit, "batch_size": eval_cfg.batch_size,
                          "max_new_tokens": eval_cfg.max_new_tokens, "progress": say, "device": device}
    run = Path(run_dir)
    result["tuned"] = _metrics(harness.evaluate(str(run), list(eval_cfg.tasks), out_dir=run / "eval", **kw))
    if untuned:
        say("untuned base model")
        base = load_run_base(run, device=device)
        result["untuned"] = _metrics(harness.evaluate(base, list(eval_cfg.tasks), out_dir=run / "eval" / "untuned",
                                                      **kw))
    return result
