"""What the lab reports share: mean ± std cells, Markdown tables (a table of pairwise differences with
the seed-spread rule among them), the README's head and tail, and matplotlib figures (Agg canvas, no
pyplot)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balora.experiments.spec import CompareSpec, LabSpec
from balora.experiments.stats import separation, spread_label


def compare_paired(cspec: CompareSpec) -> list[dict[str, Any]]:
    """The paired differences (per seed, t and item-bootstrap intervals, verdict) of a lab task's compare
    run, from its summary.json; [] before it has one."""
    path = cspec.output_dir / "summary.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("paired") or [])


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


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def difference_table(named: dict[str, dict[str, Any]], digits: int = 3) -> list[str]:
    """Every pair of ``named`` mean ± std entries (later − earlier, in the given order): the difference
    of the means, the larger std and the seed-spread rule (`balora.experiments.stats`)."""
    names = [n for n, s in named.items() if s.get("n", 0)]
    rows = []
    for i, first in enumerate(names):
        for later in names[i + 1:]:
            a, b = named[later], named[first]
            sep = separation(a, b)
            rows.append([f"{later} − {first}", f"{a['mean'] - b['mean']:+.{digits}f}",
                         "–" if sep["spread"] is None else f"{sep['spread']:.{digits}f}", spread_label(sep["beyond"])])
    return md_table(["difference", "Δ mean", "larger std", "seed spread"], rows)


DIFFERENCE_RULE = ("Seed spread: *beyond* when |Δ mean| exceeds the larger of the two sample stds, *within* "
                   "otherwise, undetermined below 2 seeds a side (a heuristic, not a significance test).")


def head_lines(spec: LabSpec, title: str, what: str) -> list[str]:
    """The README's title, one sentence of what the experiment measures, and the spec's ``paper:``."""
    lines = [f"# {title}", "", what, ""]
    if spec.paper:
        lines += [f"Reference (the spec's `paper:`): {spec.paper}", ""]
    return lines


def regenerate_lines(experiment: str, spec_path: Path) -> list[str]:
    """The README's last section: the commands that rebuild it."""
    return ["## Regenerate", "", "```",
            f"balora lab {experiment} {spec_path} --threads 1",
            f"balora lab {experiment} {spec_path} --only-report   # tables and plots from the stored results",
            "```", ""]


def figure(panels: int, width: float = 4.6, height: float = 3.5, rows: int = 1) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on the Agg canvas (no pyplot, no global backend) and its axes."""
    # matplotlib is the optional `report` extra: imported only when a report draws
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
    """Write ``fig`` as a PNG (the directory is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
