"""The numbers of every experiment report: mean ± sample std over seeds, the "beyond the seed spread"
rule, and a metric path looked up in a cell's result.

The rule: two means are separated *beyond the seed spread* when the difference of the means is
larger than the larger of the two sample standard deviations; with fewer than 2 values on either side
it is undetermined. A heuristic that flags differences the seeds alone do not explain, not a
significance test.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any

__all__ = ["lookup", "separation", "spread_label", "stats"]


def stats(values: Iterable[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``: the sample std (n − 1) is None below 2 values; None and
    non-finite values are left out."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "n": len(vals), "values": vals}


def separation(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``{"delta": |mean_a − mean_b|, "spread": max(std_a, std_b), "beyond": delta > spread}``; spread and
    beyond are None when either side has fewer than 2 values."""
    delta = abs(a["mean"] - b["mean"])
    if a["n"] < 2 or b["n"] < 2:
        return {"delta": delta, "spread": None, "beyond": None}
    spread = max(a["std"], b["std"])
    return {"delta": delta, "spread": spread, "beyond": delta > spread}


def spread_label(beyond: bool | None) -> str:
    """How a table cell reads `separation`'s ``beyond``."""
    return {True: "beyond", False: "within", None: "undetermined (n < 2)"}[beyond]


def lookup(result: dict[str, Any], path: str) -> float | None:
    """A metric path in a cell result: under ``metrics`` first, then at the top level; numbers only."""
    for root in (result.get("metrics", {}), result):
        node: Any = root
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool) and math.isfinite(node):
            return float(node)
    return None
