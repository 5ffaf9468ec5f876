"""What the lab experiments share: reading and checking a lab spec, mean ± std, the seed-spread rule,
JSON and Markdown output, and matplotlib figures (Agg canvas, no pyplot)."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from balora.core.config import ConfigError

Say = Callable[[str], None]

DEFAULT_OUTPUT_ROOT = Path("docs/results/lab")


def say_print(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- the spec
@dataclass
class LabSpec:
    """A checked lab spec: its mapping, where it came from and where its outputs go."""

    experiment: str
    data: dict[str, Any]
    path: Path
    output_dir: Path

    @property
    def source(self) -> str:
        return str(self.path)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError that names the spec file and the key."""
        return ConfigError(f"{self.path}: {key}: {message}")


def load_lab_spec(path: str | Path, experiment: str, known: Sequence[str],
                  required: Sequence[str] = ()) -> LabSpec:
    """Read a lab spec; unknown or missing keys and an ``experiment:`` naming another lab are errors."""
    from balora.experiments.compare import _read_yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such spec file")
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the spec must be a mapping, got {type(data).__name__}")
    named = data.get("experiment", experiment)  # first: a wrong spec has "unknown" keys too
    if named != experiment:
        raise ConfigError(f"{path}: experiment: this spec is for {named!r}; run it with `balora lab {named} {path}`")
    keys = ("experiment", "name", "output_dir", *known)
    for key in data:
        if key not in keys:
            raise ConfigError(f"{path}: {key}: unknown key for `balora lab {experiment}`; known: {', '.join(keys)}")
    for key in required:
        if data.get(key) is None:
            raise ConfigError(f"{path}: {key}: required")
    output_dir = data.get("output_dir", str(DEFAULT_OUTPUT_ROOT / experiment))
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{path}: output_dir: expected a path, got {output_dir!r}")
    return LabSpec(experiment, data, path, Path(output_dir))


def get_list(spec: LabSpec, key: str, kind: type | tuple[type, ...], default: list[Any] | None = None,
             nonempty: bool = True) -> list[Any]:
    """``spec[key]`` as a list whose items are ``kind`` (bool is never an int here)."""
    value = spec.data.get(key, default)
    if value is None:
        raise spec.error(key, "required")
    if not isinstance(value, list) or (nonempty and not value):
        raise spec.error(key, f"expected a {'non-empty ' if nonempty else ''}list, got {value!r}")
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, kind):
            raise spec.error(f"{key}[{i}]", f"expected {_kind_name(kind)}, got {item!r}")
    return list(value)


def get_mapping(spec: LabSpec, key: str, default: dict[str, Any] | None = None) -> dict[str, Any]:
    value = spec.data.get(key, default)
    if value is None:
        raise spec.error(key, "required")
    if not isinstance(value, dict):
        raise spec.error(key, f"expected a mapping, got {value!r}")
    return dict(value)


def get_value(spec: LabSpec, mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any,
              where: str) -> Any:
    """``mapping[key]`` checked against ``kind`` (``where``: the key's path, for the message)."""
    value = mapping.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind is not bool and (not isinstance(kind, tuple) or bool not in kind):
        raise spec.error(where, f"expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise spec.error(where, f"expected {_kind_name(kind)}, got {value!r}")
    return value


def check_keys(spec: LabSpec, mapping: dict[str, Any], known: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise spec.error(f"{where}.{key}", f"unknown key; known: {', '.join(known)}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false",
                        dict: "a mapping", list: "a list"}.get(k, k.__name__) for k in kinds)


def compare_spec(spec: LabSpec, mapping: dict[str, Any], where: str, *, name: str, output_dir: Path,
                 grid: dict[str, list[Any]] | None = None, overrides: Sequence[str] = (),
                 metrics: Sequence[str] = ()) -> Any:
    """A `balora compare` spec from a lab spec's sub-mapping (base/base_config, overrides, grid...);
    the lab sets name and output_dir and adds its own grid keys and overrides."""
    from balora.experiments.compare import spec_from_dict

    if not isinstance(mapping, dict):
        raise spec.error(where, f"expected a mapping (a compare spec: base or base_config, overrides...), "
                                f"got {mapping!r}")
    for key in ("name", "output_dir"):
        if key in mapping:
            raise spec.error(f"{where}.{key}", "set by the lab (the spec's output_dir); remove it")
    data = dict(mapping)
    if grid:
        clash = [k for k in grid if k in (data.get("grid") or {})]
        if clash:
            raise spec.error(f"{where}.grid.{clash[0]}", "set by the lab spec's own keys; remove it here")
        data["grid"] = {**grid, **(data.get("grid") or {})}
    data["overrides"] = list(overrides) + list(data.get("overrides") or [])
    if metrics and "metrics" not in data:
        data["metrics"] = list(metrics)
    data.update(name=name, output_dir=str(output_dir))
    try:
        return spec_from_dict(data, spec_dir=spec.path.parent, source=f"{spec.path}: {where}", default_name=name)
    except ConfigError as error:
        message = str(error)
        raise ConfigError(message if message.startswith(str(spec.path)) else f"{spec.path}: {where}: {message}") \
            from None


def group_name(label: str) -> str:
    """A compare group label for a table row: "method=pissa" -> "pissa", "variant=x" -> "x"."""
    for prefix in ("method=", "variant="):
        if label.startswith(prefix) and ", " not in label:
            return label[len(prefix):]
    return label


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key = "a.b"``, creating sections (copies, never aliases)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        node[part] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------- numbers
def stats(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample std (n − 1; None below 2 values), as in `balora compare`'s summary."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "n": len(vals), "values": vals}


def fmt(s: dict[str, Any], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """``0.812 ± 0.014`` (``–`` without values; no std for one value, with its n)."""
    if not s or s.get("n", 0) == 0:
        return "–"
    spec = f"{'+' if sign else ''}.{digits}f"
    text = format(s["mean"] * scale, spec)
    if s.get("std") is not None:
        text += f" ± {s['std'] * scale:.{digits}f}"
    elif s["n"] == 1:
        text += " (n=1)"
    return text


def separated(a: dict[str, Any], b: dict[str, Any]) -> bool | None:
    """The compare summary's rule: |mean_a − mean_b| > max(std_a, std_b); None below 2 values a side."""
    if a.get("n", 0) < 2 or b.get("n", 0) < 2:
        return None
    return abs(a["mean"] - b["mean"]) > max(a["std"], b["std"])


def spread_words(a: dict[str, Any], b: dict[str, Any]) -> str:
    verdict = separated(a, b)
    return {True: "beyond the seed spread", False: "within the seed spread",
            None: "spread undetermined (fewer than 2 seeds)"}[verdict]


# ---------------------------------------------------------------------------- files
def json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalars
        return json_safe(obj.item())
    return obj


def write_json(path: Path, data: Any) -> None:
    """Atomic: an interrupted write never leaves a truncated file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(data), indent=2, default=str) + "\n")
    os.replace(tmp, path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def regenerate_lines(experiment: str, spec_path: Path) -> list[str]:
    return ["## Regenerate", "", "```",
            f"balora lab {experiment} {spec_path} --threads 1",
            f"balora lab {experiment} {spec_path} --only-report   # tables and plots from the stored results",
            "```", ""]


# ---------------------------------------------------------------------------- plots
def figure(panels: int, width: float = 4.6, height: float = 3.5, rows: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = math.ceil(panels / rows)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def save_figure(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
