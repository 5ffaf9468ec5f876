"""What a comparison keeps on disk, read back: each cell's state and result.json, the check that a
stored cell was made with the configuration the spec asks for now, and the pid claims through which
several processes share one grid."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from balora.core.config import ConfigError
from balora.experiments.grid import Cell
from balora.training.run_config import run_config_from_dict
from balora.utils import CorruptFileError, config_differences, pid_alive, quarantine, read_json

__all__ = ["SCHEMA_VERSION", "cell_state", "check_stale", "claim", "claim_dir", "load_result", "quarantine_result",
           "release", "release_dir"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of result.json and summary.json


# ---------------------------------------------------------------------------- results
def _read_result(cell: Cell) -> dict[str, Any] | None:
    """result.json, or None when there is none or it does not parse (a warning names the file: the
    cell is redone, and `quarantine_result` moves the file aside first)."""
    if not cell.result_path.is_file():
        return None
    try:
        result = read_json(cell.result_path)
    except CorruptFileError as error:
        logger.warning("%s; the cell will be run again (the file is kept as result.json.corrupt-<time>)", error)
        return None
    if not isinstance(result, dict):
        logger.warning("%s: not a JSON object; the cell will be run again", cell.result_path)
        return None
    return result


def cell_state(cell: Cell) -> str:
    """``ok`` / ``failed`` (result.json), ``corrupt`` (a result.json that does not parse: to redo),
    ``partial`` (a run directory, no result), ``pending``."""
    if cell.result_path.is_file():
        result = _read_result(cell)
        return "corrupt" if result is None else str(result.get("status", "failed"))
    return "partial" if cell.run_dir.exists() else "pending"


def load_result(cell: Cell) -> dict[str, Any] | None:
    """The cell's result.json, or None before it finished (or when it does not parse)."""
    return _read_result(cell)


def quarantine_result(cell: Cell) -> Path | None:
    """Move a result.json that does not parse aside (``result.json.corrupt-<time>``, never deleted);
    returns where it went, or None when there was nothing to move."""
    if not cell.result_path.is_file() or _read_result(cell) is not None:
        return None
    return quarantine(cell.result_path)


# ---------------------------------------------------------------------------- stale check
def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # output_dir is where the cell lives, not what it trained; JSON round trip: tuples vs lists
    return json.loads(json.dumps({k: v for k, v in config.items() if k != "output_dir"}, default=str))


def _stored_config(cell: Cell) -> dict[str, Any] | None:
    result = _read_result(cell)
    if result is not None:
        return result.get("config")
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
        diffs = config_differences(_comparable(_with_defaults(stored)), _comparable(cell.config.to_dict()))
        if diffs:
            raise ConfigError(f"cell {cell.id}: {cell.dir} was made with another configuration "
                              f"({'; '.join(diffs[:5])}); delete that directory to redo the cell, or "
                              "choose another output_dir")


# ---------------------------------------------------------------------------- claims
CLAIM_FILE = "running.pid"


def claim(cell: Cell) -> int | None:
    """Mark ``cell`` as run by this process; returns the pid of another live process that holds it
    (`claim_dir` on the cell's directory).

    Several ``balora compare`` processes can then share one grid (one per GPU or core) and each cell
    runs once. The claim is a pid file created atomically (O_EXCL); one left by a dead process
    (killed, crashed machine) is taken over, so a kill never blocks a cell. Assumes the processes
    share one machine (pids are local).
    """
    return claim_dir(cell.dir)


def claim_dir(directory: Path) -> int | None:
    """Mark the work kept in ``directory`` (a cell, a model the bias lab evaluates) as done by this
    process: ``directory/running.pid`` (CLAIM_FILE), created atomically; returns the pid of another live process
    that holds it, else None (a claim left by a dead process is taken over)."""
    path = directory / CLAIM_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = path.read_text().strip() if path.exists() else ""
            owner = int(text) if text.isdigit() else None
            if owner is not None and owner != os.getpid() and pid_alive(owner):
                return owner
            path.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return None
    raise RuntimeError(f"{path}: could not claim the cell (another process keeps re-creating the claim)")


def release(cell: Cell) -> None:
    """Remove this process's claim on ``cell``."""
    release_dir(cell.dir)


def release_dir(directory: Path) -> None:
    """Remove this process's claim on ``directory`` (`claim_dir`)."""
    path = directory / CLAIM_FILE
    if path.exists() and path.read_text().strip() == str(os.getpid()):
        path.unlink()
