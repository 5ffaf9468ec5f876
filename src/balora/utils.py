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
    tmp.write_text(text, encoding="utf-8")
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
