"""Print the headline tables of the offline reproduction (Markdown) from the comparisons' summary.json.

    python experiments/headline.py

Every number comes from a `balora compare` summary under results/<name>/summary.json; nothing
is typed in by hand. A missing comparison prints as "not run".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent / "results"
METHODS = ["lora", "pissa", "dora", "lora-reg", "ba-lora"]


def load(name: str) -> dict[str, Any] | None:
    path = HERE / name / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def group(summary: dict[str, Any] | None, **grid: Any) -> dict[str, Any] | None:
    if summary is None:
        return None
    for g in summary["groups"]:
        if all(g["grid"].get(k) == v for k, v in grid.items()):
            return g
    return None


def restricted(name: str, seeds: list[int], **grid: Any) -> dict[str, Any] | None:
    """A group of comparison ``name`` re-summarised over the cells of ``seeds`` only (from result.json),
    so that points run with fewer seeds are set against the same seeds."""
    import statistics

    values: dict[str, list[float]] = {}
    for path in sorted((HERE / name / "cells").glob("*/result.json")):
        result = json.loads(path.read_text())
        if result["status"] != "ok" or result["seed"] not in seeds:
            continue
        if any(result["grid"].get(k) != v for k, v in grid.items()):
            continue
        for metric in ("accuracy", "mcc"):
            values.setdefault(f"test.{metric}", []).append(result["metrics"]["test"][metric])
    if not values:
        return None
    stats = {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)}
             for k, v in values.items()}
    return {"metrics": stats, "cost": {}, "ok": [None] * len(next(iter(values.values())))}


def cell(g: dict[str, Any] | None, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    if g is None:
        return "–"
    stats = g["metrics"].get(metric) or g["cost"].get(metric)
    if not stats or stats["mean"] is None:
        return "–"
    mean = stats["mean"] * scale
    if stats["std"] is None:
        return f"{mean:.{digits}f} (n={stats['n']})"
    return f"{mean:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def separated(a: dict[str, Any] | None, b: dict[str, Any] | None, metric: str) -> str:
    """'>' / '<' when the means differ by more than the larger std (compare's rule), else '≈'."""
    if a is None or b is None:
        return "?"
    sa, sb = a["metrics"].get(metric), b["metrics"].get(metric)
    if not sa or not sb or sa["std"] is None or sb["std"] is None:
        return "?"
    diff = sa["mean"] - sb["mean"]
    if abs(diff) > max(sa["std"], sb["std"]):
        return ">" if diff > 0 else "<"
    return "≈"


def ordering(summary: dict[str, Any] | None, metric: str) -> str:
    ba, pissa, lora = (group(summary, method=m) for m in ("ba-lora", "pissa", "lora"))
    return (f"BA-LoRA {separated(ba, pissa, metric)} PiSSA {separated(pissa, lora, metric)} LoRA "
            f"(paper: BA-LoRA > PiSSA > LoRA)")


def hours(summaries: list[dict[str, Any] | None]) -> str:
    seconds = sum(s["compute_seconds"] or 0 for s in summaries if s is not None)
    return f"{seconds / 3600:.2f} h"


def main() -> int:
    rt, boolq = load("nlu-rotten-tomatoes"), load("nlu-boolq")
    ablation, sensitivity, nlg = load("nlu-ablation"), load("nlu-sensitivity"), load("nlg-asdiv")
    out = sys.stdout.write

    out("### NLU: MiniLM-L6, r = 8, test accuracy / MCC (%, mean ± std over 3 seeds)\n\n")
    out("| method | Rotten Tomatoes acc | RT MCC | BoolQ acc | BoolQ MCC | train s (RT / BoolQ) |\n")
    out("|---|---|---|---|---|---|\n")
    for m in METHODS:
        a, b = group(rt, method=m), group(boolq, method=m)
        out(f"| {m} | {cell(a, 'test.accuracy')} | {cell(a, 'test.mcc')} | {cell(b, 'test.accuracy')} | "
            f"{cell(b, 'test.mcc')} | {cell(a, 'train_seconds', 1, 0)} / {cell(b, 'train_seconds', 1, 0)} |\n")
    out(f"\nOrdering by accuracy (> / <: means differ by more than the larger std; ≈: within it): "
        f"Rotten Tomatoes {ordering(rt, 'test.accuracy')}; BoolQ {ordering(boolq, 'test.accuracy')}.\n\n")

    out("### NLG: SmolLM2-135M-Instruct on ASDiv (1 seed)\n\n")
    out("| method | ASDiv held-out acc (first 100) | GSM8K acc (first 100) | forgetting (Δ CE, nats) | "
        "held-out response loss | train s |\n|---|---|---|---|---|---|\n")
    for m in ("lora", "pissa", "ba-lora"):
        g = group(nlg, method=m)
        out(f"| {m} | {cell(g, 'eval.asdiv.accuracy')} | {cell(g, 'eval.gsm8k.accuracy')} | "
            f"{cell(g, 'forgetting', 1, 4)} | {cell(g, 'test.loss', 1, 4)} | {cell(g, 'train_seconds', 1, 0)} |\n")

    out("\n### Ablation on Rotten Tomatoes (accuracy / MCC %, 3 seeds)\n\n")
    out("| regularisers on PiSSA | accuracy | MCC |\n|---|---|---|\n")
    rows = [("none (PiSSA)", group(rt, method="pissa")), ("consistency only", group(ablation, variant="cr-only")),
            ("diversity only", group(ablation, variant="dr-only")), ("SVD only", group(ablation, variant="svd-only")),
            ("all three (BA-LoRA)", group(rt, method="ba-lora"))]
    for label, g in rows:
        out(f"| {label} | {cell(g, 'test.accuracy')} | {cell(g, 'test.mcc')} |\n")

    out("\n### Sensitivity on Rotten Tomatoes (BA-LoRA; accuracy / MCC %)\n\n")
    out("| setting | seeds | accuracy | MCC |\n|---|---|---|---|\n")
    rows = [("λ1 × 0.3 (0.045)", group(sensitivity, variant="lambda1-x0.3")),
            ("λ1 × 1 (0.15), k = 5: default, the same 2 seeds", restricted("nlu-rotten-tomatoes", [1, 2],
                                                                         method="ba-lora")),
            ("λ1 × 3 (0.45)", group(sensitivity, variant="lambda1-x3")),
            ("k = 1", group(sensitivity, variant="k-1")), ("k = 10", group(sensitivity, variant="k-10"))]
    for label, g in rows:
        n = len(g["ok"]) if g else 0
        out(f"| {label} | {n} | {cell(g, 'test.accuracy')} | {cell(g, 'test.mcc')} |\n")

    out(f"\nCompute (sum of the cells' wall time, training + evaluation, one CPU thread each): "
        f"NLU main {hours([rt, boolq])}, ablation {hours([ablation])}, sensitivity {hours([sensitivity])}, "
        f"NLG {hours([nlg])}; total {hours([rt, boolq, ablation, sensitivity, nlg])}.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
