"""Not training the same model twice. A cell whose exact training another finished run already did —
the winning search cell on a selection seed, or a cell of another comparison that the spec's ``reuse:``
names — starts from that run's final checkpoint and runs only its own evaluation.

With a fixed seed, training here is deterministic: the privacy-policy PiSSA seed-1 search cell and final
cell, trained separately, logged identical losses and validation losses at all 600 steps, and a test
trains a cell both ways and finds bit-identical adapters. So an adopted cell holds the model a second
training would give. A candidate is adopted only when the two configurations differ in nothing but
where the run lives and what it logs, saves and evaluates (`balora.training.run.RESUME_MAY_CHANGE`;
"train for longer" excluded), and it kept a complete checkpoint at its last step; otherwise the cell
trains as usual.

Candidates are paired with cells cheaply (same method and seed, from result.json); the configuration
check runs when the cell starts (`adopt_training`), so a dry run never imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from balora.experiments.grid import Cell
from balora.experiments.report import Say
from balora.utils import now_iso, read_json, read_status, write_json

__all__ = ["TRAINED_IN_FILE", "adopt_training", "trained_in", "with_runs_of"]

TRAINED_IN_FILE = "trained_in.json"  # in a cell's run directory: the run whose training it took over


def _finished_runs(output_dir: Path) -> list[tuple[str, int, Path]]:
    """(method, seed, run directory) of every finished cell of the comparison in ``output_dir``."""
    out = []
    for path in sorted((output_dir / "cells").glob("*/result.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a cell being rewritten, or a broken one: its own comparison reports it
        if result.get("status") == "ok" and (path.parent / "run" / "config.yaml").is_file():
            out.append((str(result.get("method")), int(result.get("seed") or 0), path.parent / "run"))
    return out


def with_runs_of(cells: list[Cell], output_dirs: list[Path]) -> list[Cell]:
    """``cells`` with the finished runs of the comparisons in ``output_dirs`` (the spec's ``reuse:``) of
    the same method and seed added to `Cell.trained_by`, after any already there."""
    runs = [run for d in output_dirs for run in _finished_runs(Path(d))]
    out = []
    for cell in cells:
        found = tuple(r for m, s, r in runs if m == cell.config.method and s == cell.config.seed)
        out.append(dataclasses.replace(cell, trained_by=cell.trained_by + found) if found else cell)
    return out


def _final_checkpoint(cell: Cell, source: Path) -> tuple[Path | None, str | None]:
    """``source``'s final checkpoint when it trained ``cell``'s configuration, else (None, why not)."""
    from balora.training import run as run_module  # torch and transformers: only when a cell trains
    from balora.training.trainer import checkpoint_step, latest_complete_checkpoint

    refused, allowed = run_module.resume_differences(cell.config, source)
    grows = [t for t in allowed if t.split(":")[0] in run_module.RESUME_MAY_GROW]
    if refused or grows:
        return None, "it trained another configuration (" + "; ".join((refused + grows)[:3]) + ")"
    status = read_status(source) or {}
    trained = status.get("trained") if status.get("state") == "finished" else None
    found, _ = latest_complete_checkpoint(source / "checkpoints")
    if found is None:
        return None, "it kept no complete checkpoint"
    if not trained or trained.get("global_step") != checkpoint_step(found):
        return None, "its last checkpoint is not its final step"
    return found, None


def adopt_training(cell: Cell, say: Say) -> bool:
    """Start a fresh cell from the final checkpoint of the first of `Cell.trained_by` that trained its
    configuration: the checkpoint, the configuration and the training record (time, final log) are
    copied into the cell's run directory, whose resume then only evaluates. False (nothing written) when
    the cell has started already or no candidate qualifies."""
    if not cell.trained_by or (cell.run_dir.is_dir() and any(cell.run_dir.iterdir())):
        return False
    reasons = []
    for source in cell.trained_by:
        found, why = _final_checkpoint(cell, source)
        if found is not None:
            break
        reasons.append(f"{source.parent.name}: {why}")
    else:
        say(f"  no finished run trained this configuration, training ({'; '.join(reasons[:2])})")
        return False
    cell.run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(found, cell.run_dir / "checkpoints" / found.name)
    shutil.copy2(source / "config.yaml", cell.run_dir / "config.yaml")
    # the training record carries the source's training time and final log into this run's metrics.json
    write_json(cell.run_dir / "status.json", {"state": "adopted", "phase": "preparing",
                                             "trained": read_status(source)["trained"],
                                             "adopted_from": str(source), "updated_at": now_iso()})
    where = os.path.relpath(source.parent, cell.dir.parent.parent)
    write_json(cell.run_dir / TRAINED_IN_FILE, {"trained_in": where, "checkpoint": found.name})
    say(f"  {where} trained this configuration: starting from its {found.name}, evaluating only")
    return True


def trained_in(cell: Cell) -> str | None:
    """Where the cell's training was done (relative to its comparison), when it adopted another run's."""
    path = cell.run_dir / TRAINED_IN_FILE
    return read_json(path).get("trained_in") if path.is_file() else None
