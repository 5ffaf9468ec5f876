"""Reading records: JSONL / JSON / CSV / Parquet files, directories of ``{split}.<ext>`` files, ``asset:NAME``
and hub datasets, as ``Records`` that remember each record's file and line for error messages."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from balora.assets import resolve

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
# Canonical split name -> file stems / hub names that mean it.
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test",)}


class DataError(ValueError):
    """Malformed or unusable data; the message names the file, the line and the problem."""


class Records(list):
    """A ``list[dict]`` that remembers where each record came from, for error messages."""

    def __init__(self, rows: Iterable[dict] = (), source: str = "<records>",
                 lines: Sequence[int] | None = None) -> None:
        super().__init__(rows)
        self.source = source
        self.lines = list(lines) if lines is not None else None

    def where(self, i: int) -> str:
        """``file:line`` of record ``i`` (``source: record N`` when lines are unknown)."""
        if self.lines is not None and i < len(self.lines):
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}: record {i + 1}"

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):  # keep file positions through records[:limit]
            return subset(self, list(range(len(self)))[i])
        return super().__getitem__(i)


def subset(records: Sequence[dict], idx: list[int]) -> list[dict]:
    """The records at ``idx``; a ``Records`` keeps its file positions."""
    rows = [records[i] for i in idx]
    if not isinstance(records, Records):
        return rows
    return Records(rows, records.source, [records.lines[i] for i in idx] if records.lines else None)


def record_where(records: Sequence[dict], i: int, source_name: str | None) -> str:
    """Where record ``i`` came from (``file:line``, or ``name: record N``), for error messages."""
    if isinstance(records, Records):
        return records.where(i)
    return f"{source_name or '<records>'}: record {i + 1}"


def source_label(records: Sequence[dict], source_name: str | None) -> str:
    """The name to put in front of messages about ``records`` as a whole."""
    return source_name or getattr(records, "source", "<records>")


def field_value(rec: dict, field: str, where: str, setting: str | None = None) -> Any:
    """``rec[field]``; a missing or null field is a ``DataError`` naming the record and the
    ``data.<setting>`` option that chose the field."""
    if field not in rec:
        hint = f"; set data.{setting}" if setting else ""
        raise DataError(f"{where}: missing field {field!r} (fields present: "
                        f"{', '.join(map(str, rec))}){hint}")
    if rec[field] is None:
        raise DataError(f"{where}: field {field!r} is null")
    return rec[field]


def text_value(rec: dict, field: str, where: str, setting: str, *, allow_empty: bool = False) -> str:
    """``rec[field]`` as a text: a (non-empty, unless ``allow_empty``) string, else a ``DataError``
    naming the record, the field and the ``data.<setting>`` option that chose it. Numbers, lists and
    objects are refused rather than turned into their ``str()``."""
    value = field_value(rec, field, where, setting)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__} "
                        f"{_short(value)} (data.{setting} names the text field)")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; remove the record or fill it in "
                        f"(data.{setting} names the text field)")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


LABEL_KINDS = {bool: "bool", int: "number", float: "number", str: "string"}


def label_kind(value: Any) -> str:
    """The kind of a label: "string", "number" (int or float: floats among ints mean regression),
    "bool", or the type's name for anything else (lists, objects: never a label)."""
    return LABEL_KINDS.get(type(value), type(value).__name__)


def check_label_kinds(records: Sequence[dict], labels: Sequence[Any], source_name: str | None,
                      label_field: str, *, mixed_numbers: bool = True) -> None:
    """Every label of ``records`` (one per record) is a string, a number or a bool, all of one kind;
    else a ``DataError`` at the first record whose kind differs from most labels' (``file:line``).
    ``mixed_numbers=False``: integers and floats count as two kinds (a float among integer classes is
    most likely a typo)."""
    kinds = []
    for i, lab in enumerate(labels):
        kind = label_kind(lab)
        if kind not in ("string", "number", "bool"):
            raise DataError(f"{record_where(records, i, source_name)}: label {_short(lab)} is a "
                            f"{type(lab).__name__}; labels (field {label_field!r}, data.label_field) "
                            "must be strings, numbers or booleans")
        if not mixed_numbers and kind == "number":
            kind = "float" if isinstance(lab, float) else "integer"
        kinds.append(kind)
    counts: dict[str, int] = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    if len(counts) < 2:
        return
    usual = max(counts, key=lambda k: (counts[k], -kinds.index(k)))
    i = next(j for j, kind in enumerate(kinds) if kind != usual)
    hint = (" (regression: write every label as a float, e.g. 1.0)" if {kinds[i], usual} == {"integer", "float"}
            else "")
    raise DataError(f"{record_where(records, i, source_name)}: label {_short(labels[i])} is a {kinds[i]}, but "
                    f"{counts[usual]} of the {len(kinds)} labels are {usual}s; every label of field "
                    f"{label_field!r} (data.label_field) must be of one type{hint}")


# ---------------------------------------------------------------- file readers

def _canon(split: str) -> str:
    return next((c for c, names in _SPLIT_ALIASES.items() if split.lower() in names), split)


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt not in _READERS:
        raise DataError(f"{path}: unknown data format {fmt or path.suffix!r}; data.source must be a .jsonl, "
                        ".ndjson, .json, .csv, .parquet or .pq file, or a directory of them (from Python: "
                        "load_records(..., fmt='jsonl' | 'json' | 'csv' | 'parquet'))")
    return fmt


# Not balora.utils.iter_jsonl: training data may start with a BOM (utf-8-sig), and its messages give the
# decoder's line/column and name the file as the user wrote it, which users and tests rely on.
def _read_jsonl(path: Path, name: str) -> Records:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue  # blank lines (often a trailing one) carry no record
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg}: line {e.lineno} "
                                f"column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}:{lineno}: expected a JSON object, got "
                                f"{type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    return Records(rows, name, lines)


def _read_json(path: Path, name: str) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}: line {e.lineno} "
                        f"column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{name}: expected a list of objects or {{\"data\": [...]}}")
    return Records(data, name)


def _read_csv(path: Path, name: str) -> Records:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        for cells in reader:
            if cells:  # csv yields [] for blank lines
                if len(cells) != len(header):  # a ragged row would shift columns
                    raise DataError(f"{name}:{start}: {len(cells)} values but the header has "
                                    f"{len(header)} columns")
                rows.append(dict(zip(header, cells)))
                lines.append(start)
            start = reader.line_num + 1
    return Records(rows, name, lines)


def _first_bad_utf8_line(path: Path) -> int:
    """The 1-based line of ``path`` holding its first byte sequence that is not UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return 1


def _read_parquet(path: Path, name: str) -> Records:
    import pyarrow.parquet as pq  # why: optional and heavy; only Parquet sources need it

    try:
        return Records(pq.read_table(path).to_pylist(), name)
    except ValueError as e:  # pyarrow.ArrowInvalid: not a Parquet file
        raise DataError(f"{name}: cannot read Parquet ({e})") from e


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "parquet": _read_parquet}


# ---------------------------------------------------------------- sources

def _split_files(directory: Path) -> dict[str, Path]:
    """Canonical split name ('train', 'validation', 'test' or the file stem) -> data file."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _FORMATS)
    return {_canon(p.stem): p for p in files}


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or any(
        x.lower() in _FORMATS for x in Path(s).suffixes)


def load_records(source: str, *, split: str | None = None, fmt: str | None = None) -> Records:
    """Records from a JSONL/JSON/CSV/Parquet file, a directory of ``{split}.<ext>`` files,
    ``asset:NAME`` or (when ``source`` is not an existing path) a hub dataset id.

    ``split`` picks the file in a directory or the hub split (default ``"train"``; ``dev``,
    ``val`` and ``valid`` files answer to ``"validation"``).  Raises ``DataError``.
    """
    path = Path(resolve(source)).expanduser()
    if path.is_dir():
        files = _split_files(path)
        want = split or "train"
        if _canon(want) not in files:
            raise DataError(f"{path}: no file for split {want!r} (found: "
                            f"{', '.join(sorted(files)) or 'no data files'})")
        path = files[_canon(want)]
    elif not path.exists():
        if _looks_like_path(source):
            raise DataError(f"{source}: no such file")
        return _load_hub(source, split or "train")
    # Name the file as the user wrote it, unless it was found through an asset or a directory.
    name = source if Path(source).expanduser() == path else str(path)
    reader = _READERS[_format_of(path, fmt)]
    try:
        records = reader(path, name)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{_first_bad_utf8_line(path)}: not valid UTF-8 ({e.reason}, byte "
                        f"{e.object[e.start:e.start + 1]!r}); re-save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{name}: invalid CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e})") from e
    if not records:
        raise DataError(f"{name}: no records (the file is empty)")
    return records


def _load_hub(source: str, split: str) -> Records:
    import datasets  # why: heavy (pyarrow, fsspec); only hub sources need it

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # any hub/network failure: say what was tried, keep the cause
        raise DataError(f"{source!r} is not a local file or directory, and loading it as a "
                        f"hub dataset (split {split!r}) failed: {e}") from e
    return Records(ds.to_list(), f"{source}[{split}]")


def available_splits(source: str) -> dict[str, str]:
    """Named splits of a source, canonical name -> name to pass as ``split``; ``{}`` for a
    single file."""
    path = Path(resolve(source)).expanduser()
    if path.is_dir():
        return {c: p.stem for c, p in _split_files(path).items()}
    if path.exists() or _looks_like_path(source):
        return {}
    import datasets  # why: heavy (pyarrow, fsspec); only hub sources need it

    try:
        names = datasets.get_dataset_split_names(source)
    except Exception as e:  # any hub/network failure: say what was tried, keep the cause
        raise DataError(f"{source!r} is not a local file or directory, and reading its "
                        f"splits from the hub failed: {e}") from e
    return {_canon(n): n for n in names}
