"""Small helpers shared by every layer: atomic file writes, JSONL reading, library versions, peak
memory, and dotted key paths. Nothing here knows about BA-LoRA; nothing here imports torch at module
level, so that light commands stay light.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import re
import resource
import socket
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml

# JSON leaves these unescaped, but str.splitlines() and some readers treat them as line ends.
_LINE_SEPS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


# ---------------------------------------------------------------------------- writing
def json_safe(obj: Any) -> Any:
    """NaN and inf become null and numpy scalars Python numbers, so the output stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write through a temporary file and rename: a kill mid-write never leaves a truncated file
    that a later run would take for a finished one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())  # the data is on disk before the name points at it (power loss, not only a kill)
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Indented strict JSON (see `json_safe`), written atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=2, default=str) + "\n")


def write_yaml(path: str | Path, data: Any) -> Path:
    """YAML in the key order given, written atomically."""
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False))


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """One JSON object per line (UTF-8, Unicode line separators escaped), written atomically; returns
    the number of rows."""
    lines = [json.dumps(row, ensure_ascii=False, default=str).translate(_LINE_SEPS) + "\n" for row in rows]
    write_text_atomic(path, "".join(lines))
    return len(lines)


# ---------------------------------------------------------------------------- reading
def open_text(path: str | Path) -> IO[str]:
    """A text handle on a plain or gzip-compressed (``.gz``) UTF-8 file."""
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL(.gz) file; a malformed line raises
    ValueError naming the file and the line."""
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL(.gz) file (see `iter_jsonl`)."""
    return [obj for _, obj in iter_jsonl(path)]


# ---------------------------------------------------------------------------- key paths
def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_path(d, "a.b", v)`` sets ``d["a"]["b"] = v``, creating (copies of) the sections on the way,
    so that a caller's nested mappings are never changed in place."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parts[: depth + 1])} is not a section (cannot set {key})")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------- provenance
def versions() -> dict[str, str]:
    """Versions of balora and the libraries that decide its numbers."""
    # here, not at the top: this module stays light for commands that never touch a model
    import accelerate
    import peft
    import torch
    import transformers

    from balora import __version__

    return {"balora": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- memory
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0). False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def current_peak_rss_mb() -> float | None:
    """The peak RSS since the last `reset_peak_rss` (VmHWM), or None where /proc is unavailable."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


# ---------------------------------------------------------------------------- reading JSON state
class CorruptFileError(ValueError):
    """A JSON file that exists but does not parse (truncated by a kill, or edited by hand)."""


def read_json(path: str | Path) -> Any:
    """A JSON file's content; a file that does not parse raises `CorruptFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: truncated or not valid JSON ({exc})") from None


def quarantine(path: str | Path) -> Path:
    """Move a corrupt file aside to ``<name>.corrupt-<UTC time>`` (never deleted); returns the new path."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, target)
    return target


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``["a.b: 1 -> 2", ...]``: the key paths where two nested mappings differ, old value first."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += config_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


# ---------------------------------------------------------------------------- processes and locks
def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def process_start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux /proc), or None: with the pid
    it names one process, so a pid reused by an unrelated process is not taken for the old one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked from here, so it counts as alive
    if not pid_alive(pid):
        return False
    started = holder.get("pid_start")
    return started is None or process_start_ticks(pid) in (None, started)


class LockedError(FileExistsError):
    """The lock is held by another live process (``holder``: its pid, host and start time)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


class FileLock:
    """An exclusive lock file holding ``{"pid", "host", "started_at", "pid_start"}``, created with
    O_EXCL. A lock left by a dead process on this host (killed, crashed) is taken over with a warning;
    one held by a live process, or by a process on another host, raises `LockedError`. Release with
    `release()` (or use it as a context manager)."""

    def __init__(self, path: str | Path, what: str = "this directory") -> None:
        self.path = Path(path)
        self.what = what
        self.held = False
        self.took_over: dict[str, Any] | None = None  # the dead holder's record, when taken over

    def _read(self) -> tuple[dict[str, Any] | None, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        return (data if isinstance(data, dict) else None), text

    def acquire(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started_at": now_iso(),
              "pid_start": process_start_ticks(os.getpid())}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, text = self._read()
                if holder is None:  # being written right now, or garbage left behind
                    try:
                        age = datetime.now().timestamp() - self.path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age < 10:
                        raise LockedError(f"{self.what} is being locked by another process ({self.path})",
                                          {}) from None
                elif _holder_alive(holder):
                    raise LockedError(
                        f"{self.what} is in use by process {holder.get('pid')} on {holder.get('host')} "
                        f"(since {holder.get('started_at')}; lock file {self.path}). Wait for it to finish; if that "
                        "process is gone (another machine), delete the lock file.", holder) from None
                self.took_over = holder or {}
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(me))
            self.held = True
            return self
        raise LockedError(f"{self.path}: could not take the lock (another process keeps re-creating it)", {})

    def release(self) -> None:
        if not self.held:
            return
        holder, _ = self._read()
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ---------------------------------------------------------------------------- a run directory's state
STATUS_FILE = "status.json"
LOCK_FILE = ".lock"


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """``<run_dir>/status.json`` (``state``: running / finished / failed, ``phase``, ``reason``,
    timestamps), or None when there is none or it does not parse."""
    try:
        data = read_json(Path(run_dir) / STATUS_FILE)
    except (FileNotFoundError, CorruptFileError):
        return None
    return data if isinstance(data, dict) else None


def write_status(run_dir: str | Path, state: str, **fields: Any) -> dict[str, Any]:
    """Update ``<run_dir>/status.json`` atomically: the previous fields, then ``state``, ``updated_at``
    and ``fields``; returns the new content."""
    status = read_status(run_dir) or {}
    status.update(state=state, updated_at=now_iso(), **fields)
    write_json(Path(run_dir) / STATUS_FILE, status)
    return status


def describe_incomplete(run_dir: str | Path) -> str | None:
    """A sentence for a run that did not finish ("incomplete: killed or failed during training ..."),
    "running ..." while its process lives, or None for a finished run / a directory without status."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status is None or status.get("state") == "finished":
        return None
    phase = status.get("phase") or "an unknown phase"
    if status.get("state") == "failed":
        return f"incomplete: failed during {phase} ({status.get('reason')}) at {status.get('updated_at')}"
    lock = run_dir / LOCK_FILE
    holder, _ = FileLock(lock)._read() if lock.exists() else (None, "")
    if holder is not None and _holder_alive(holder):
        return (f"running: {phase} (process {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started_at')})")
    return (f"incomplete: killed or failed during {phase} (last update {status.get('updated_at')}); "
            "`balora train CONFIG --resume` continues it")
