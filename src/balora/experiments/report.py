"""A comparison's summary: summary.json (per group mean ± std of each metric and of the cost, each
group ranked against the best or the runner-up), summary.md and plots/ (summary rule:
`balora.experiments.compare`). Also `say_print`, where every experiment's progress lines go by default."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balora.experiments.grid import Cell, is_seed_key, paired_groups, short_label
from balora.experiments.paired import LOWER_IS_BETTER_NOTE, VERDICT_RULE, compare_pair
from balora.experiments.selection import plot_selection, render_selection
from balora.experiments.spec import CompareSpec
from balora.experiments.stats import lookup, separation, stats
from balora.experiments.store import SCHEMA_VERSION, load_result
from balora.utils import now_iso, write_json, write_text_atomic

__all__ = ["Say", "paired_section", "render_markdown", "say_print", "summarize", "write_summary"]

Say = Callable[[str], None]
COST = ("train_seconds", "memory_mb", "adapter_bytes", "trainable_parameters")


def say_print(message: str) -> None:
    """Print a progress line at once (flushed: long runs are often followed through a pipe)."""
    print(message, flush=True)


# ---------------------------------------------------------------------------- numbers
def _default_metrics(results: list[dict[str, Any]]) -> list[str]:
    for result in results:
        test = result.get("metrics", {}).get("test", {})
        found = [f"test.{k}" for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if found:
            return found
    return []


def _cost(result: dict[str, Any], name: str) -> float | None:
    if name == "memory_mb":  # this cell's own peak when measurable, else the process's
        name = "cell_peak_rss_mb" if result.get("cell_peak_rss_mb") is not None else "peak_rss_mb"
    value = result.get(name)
    return float(value) if isinstance(value, (int, float)) else None


def _rankings(groups: list[dict[str, Any]], metrics: list[str], spec: CompareSpec) -> dict[str, Any]:
    """Per metric: groups ranked best first; best vs runner-up, every other group vs the best."""
    out: dict[str, Any] = {}
    for metric in metrics:
        ranked = [g for g in groups if g["metrics"][metric]["n"] > 0]
        ranked.sort(key=lambda g: g["metrics"][metric]["mean"], reverse=not spec.lower_better(metric))
        entries = []
        for rank, group in enumerate(ranked):
            other = ranked[0] if rank else (ranked[1] if len(ranked) > 1 else None)
            entry = {"group": group["label"], "rank": rank + 1, "against": None}
            if other is not None:
                entry["against"] = other["label"]
                entry.update(separation(group["metrics"][metric], other["metrics"][metric]))
            entries.append(entry)
        out[metric] = {"best": ranked[0]["label"] if ranked else None, "ranking": entries}
    return out


def _seed_label(cell: Cell, result: dict[str, Any]) -> str:
    """What pairs a cell with its counterpart in another group: its seed keys' values."""
    keys = [k for k in cell.grid if is_seed_key(k)]
    if not keys:
        return str(result.get("seed"))
    return str(cell.grid[keys[0]]) if len(keys) == 1 else ",".join(f"{k}={cell.grid[k]}" for k in keys)


def _paired(spec: CompareSpec, cells: list[Cell], results: dict[str, dict[str, Any]],
            metrics: list[str]) -> list[dict[str, Any]]:
    """One entry per pair of the ``paired:`` block: per-seed differences, t and item-bootstrap intervals,
    verdict (`balora.experiments.paired`)."""
    pairs = paired_groups(spec, cells)
    entries: list[dict[str, Any]] = []
    for metric in spec.paired.metrics(metrics) if pairs else []:
        entries += _paired_metric(spec, cells, results, pairs, metric)
    return entries


def _paired_metric(spec: CompareSpec, cells: list[Cell], results: dict[str, dict[str, Any]],
                   pairs: list[tuple[str, str]], metric: str) -> list[dict[str, Any]]:
    by_group: dict[str, dict[str, tuple[float | None, Path]]] = {}
    for cell in cells:
        result = results.get(cell.id)
        if result is not None and result.get("status") == "ok":
            by_group.setdefault(cell.group, {})[_seed_label(cell, result)] = (lookup(result, metric), cell.run_dir)
    entries = []
    for a, b in pairs:
        sa, sb = by_group.get(a, {}), by_group.get(b, {})
        entry = compare_pair({s: v for s, (v, _) in sa.items()}, {s: v for s, (v, _) in sb.items()}, metric=metric,
                             a_dirs={s: d for s, (_, d) in sa.items()}, b_dirs={s: d for s, (_, d) in sb.items()},
                             samples=spec.paired.bootstrap, lower_is_better=spec.lower_better(metric))
        if entry["bootstrap_note"]:  # paths relative to output_dir, like result.json's run_dir
            entry["bootstrap_note"] = entry["bootstrap_note"].replace(f"{spec.output_dir}{os.sep}", "")
        entries.append({"a": a, "b": b, **entry})
    return entries


def summarize(spec: CompareSpec, cells: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The numbers of summary.json from the cells' results (``results``: cell id -> result.json)."""
    metrics = spec.metrics or _default_metrics([r for r in results.values() if r.get("status") == "ok"])
    groups: dict[str, dict[str, Any]] = {}
    for cell in cells:
        group = groups.setdefault(cell.group, {"label": cell.group, "grid": {k: v for k, v in cell.grid.items()
                                                                             if not is_seed_key(k)},
                                               "cells": [], "ok": [], "failed": [], "pending": []})
        group["cells"].append(cell.id)
        result = results.get(cell.id)
        state = "pending" if result is None else ("ok" if result.get("status") == "ok" else "failed")
        group[state].append(cell.id)
    for group in groups.values():
        ok = [results[c] for c in group["ok"]]
        group["metrics"] = {m: stats([lookup(r, m) for r in ok]) for m in metrics}
        group["cost"] = {name: stats([_cost(r, name) for r in ok]) for name in COST}
    ordered = list(groups.values())
    done = list(results.values())
    failed = [{"cell_id": r["cell_id"], "group": r.get("group"), "attempts": r.get("attempts"),
               "error": f"{(r.get('error') or {}).get('type')}: {(r.get('error') or {}).get('message')}"}
              for r in done if r.get("status") != "ok"]
    return {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "spec": spec.to_dict(),
        "metrics": metrics, "lower_is_better": [m for m in metrics if spec.lower_better(m)],
        "seed_keys": [k for k in spec.grid if is_seed_key(k)],
        "cells": {"total": len(cells), "ok": sum(len(g["ok"]) for g in ordered), "failed": len(failed),
                  "pending": sum(len(g["pending"]) for g in ordered)},
        "groups": ordered, "verdicts": _rankings(ordered, metrics, spec), "failed_cells": failed,
        "compute_seconds": sum(r.get("wall_seconds") or 0.0 for r in done),
        "train_seconds": sum(r.get("train_seconds") or 0.0 for r in done),
        "paired": _paired(spec, cells, results, metrics),
        "finished_at": now_iso(),
    }


# ---------------------------------------------------------------------------- Markdown
def _num(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4f}"


def _mean_std(s: dict[str, Any], n_ok: int, bold: bool = False, digits: Callable[[float], str] = _num) -> str:
    if s["n"] == 0:
        return "–"
    text = digits(s["mean"]) + (f" ± {digits(s['std'])}" if s["std"] is not None else "")
    if bold:
        text = f"**{text}**"
    return text + (f" (n={s['n']})" if s["n"] != n_ok else "")


def _group_line(label: str, summary: dict[str, Any]) -> str:
    clauses = []
    for metric, ranking in summary["verdicts"].items():
        entry = next((e for e in ranking["ranking"] if e["group"] == label), None)
        if entry is None:
            clauses.append(f"{metric}: no value")
            continue
        if entry["against"] is None:
            clauses.append(f"{metric}: the only group with a value")
            continue
        where = ("within" if entry["beyond"] is False else "beyond") + " the seed spread"
        if entry["beyond"] is None:
            where = "undetermined (fewer than 2 seeds)"
        spread = f" {'>' if entry['beyond'] else '≤'} {_num(entry['spread'])}" if entry["spread"] is not None else ""
        if entry["delta"] == 0:
            clauses.append(f"{metric}: tied with {entry['against']}")
        elif entry["rank"] == 1:
            clauses.append(f"{metric}: best; vs runner-up {entry['against']}: "
                           f"Δ {_num(entry['delta'])}{spread}, {where}")
        else:
            clauses.append(f"{metric}: #{entry['rank']}, {_num(entry['delta'])} behind {entry['against']}"
                           f"{spread}, {where}")
    return f"- **{label}**: " + "; ".join(clauses)


def _best_labels(summary: dict[str, Any], metric: str) -> set[str]:
    """The best group of a column and any group tied with it (every one of them is bold)."""
    ranking = summary["verdicts"][metric]["ranking"]
    return {e["group"] for e in ranking if e["rank"] == 1 or (e["rank"] > 1 and e["delta"] == 0)}


def _signed(x: float, scale: int) -> str:
    return f"{x * 100:+.2f}" if scale == 100 else (f"{x:+.1f}" if abs(x) >= 100 else f"{x:+.4f}")


def _interval(interval: list[float] | None, scale: int) -> str:
    return "–" if interval is None else f"[{_signed(interval[0], scale)}, {_signed(interval[1], scale)}]"


def paired_section(entries: list[dict[str, Any]], where: list[str] | None = None, level: str = "##") -> list[str]:
    """"Paired differences (per seed)": the rule, then a row per pair; nothing without pairs.
    ``where``: a first column naming each entry's comparison (the lab's noise levels, say)."""
    if not entries:
        return []
    lines = ["", f"{level} Paired differences (per seed)", "", f"Rule: {VERDICT_RULE} {LOWER_IS_BETTER_NOTE}", "",
             "Δ = A − B on the same seed; mean Δ and intervals in points (×100) for accuracy-like metrics in "
             "[0, 1]. t interval: mean ± t(0.975, n − 1) · sd / √n over the seeds; bootstrap: the test items "
             "resampled, one draw for every seed, 2.5 / 97.5 percentiles.", ""]
    header = ["pair", "metric", "seeds", "mean Δ", "95 % t interval", "95 % bootstrap interval", "seeds +/−",
              "verdict"]
    if where is not None:
        header.insert(0, "where")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for i, e in enumerate(entries):
        a, b, scale = short_label(e["a"]), short_label(e["b"]), e["scale"]
        unit = " pts" if scale == 100 else ""
        mean = "–" if e["mean"] is None else _signed(e["mean"], scale) + unit
        boot = _interval(e["bootstrap"], scale)
        if e["bootstrap"] is not None:
            boot += f" ({e['bootstrap_samples']} × {e['bootstrap_items']} items)"
        elif e["bootstrap_note"]:
            notes.append(f"- {a} vs {b}: no bootstrap ({e['bootstrap_note']})")
        said = {"beats": f"**{a} beats {b}**", "is beaten by": f"**{a} is beaten by {b}**"}
        row = [f"{a} vs {b}", f"{e['metric']} {'↓' if e['lower_is_better'] else '↑'}", str(e["n"]), mean,
               _interval(e["t_interval"], scale), boot, f"{e['positive']}/{e['negative']}",
               said.get(e["verdict"], e["verdict"])]
        if where is not None:
            row.insert(0, where[i])
        lines.append("| " + " | ".join(row) + " |")
    return lines + ([""] + notes if notes else [])


def render_markdown(summary: dict[str, Any], plots: list[str]) -> str:
    """summary.md: the table, a line per group against the best or the runner-up, failed and pending
    cells, compute time."""
    metrics, groups, c = summary["metrics"], summary["groups"], summary["cells"]
    arrow = {m: "↓" if m in summary["lower_is_better"] else "↑" for m in metrics}
    best = {m: _best_labels(summary, m) for m in metrics}
    seeds = ", ".join(summary["seed_keys"]) or "none"
    lines = [f"# {summary['name']}", "",
             f"{c['total']} cells: {c['ok']} ok, {c['failed']} failed, {c['pending']} pending. "
             f"Groups: every grid key except the seed keys ({seeds}).",
             "Each entry: mean ± sample std (n − 1) over the group's ok cells; (n=k) where fewer cells have "
             "the metric; **bold**: best mean of the column (↑ higher / ↓ lower is better).", ""]
    header = ["group", "n ok"] + [f"{m} {arrow[m]}" for m in metrics] + ["train s", "peak RSS MB", "adapter MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        n_ok = len(g["ok"])
        row = [g["label"], f"{n_ok}/{len(g['cells'])}"]
        row += [_mean_std(g["metrics"][m], n_ok, bold=g["label"] in best[m]) for m in metrics]
        row += [_mean_std(g["cost"]["train_seconds"], n_ok, digits=lambda x: f"{x:.1f}"),
                _mean_std(g["cost"]["memory_mb"], n_ok, digits=lambda x: f"{x:.0f}"),
                _mean_std(g["cost"]["adapter_bytes"], n_ok, digits=lambda x: f"{x / 1e6:.2f}")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Does it beat the runner-up beyond the seed spread?", "",
              "Rule: two group means are separated when the difference of the means exceeds the larger of "
              "their two sample stds (needs n ≥ 2 on both sides); a heuristic, not a significance test. "
              "The best group is compared with the runner-up, every other group with the best.", ""]
    lines += [_group_line(g["label"], summary) for g in groups]
    lines += paired_section(summary.get("paired") or [])
    if summary["failed_cells"]:
        lines += ["", "## Failed cells", ""]
        lines += [f"- {f['cell_id']} ({f['attempts']} attempts): {f['error']} — cells/{f['cell_id']}/result.json"
                  for f in summary["failed_cells"]]
    pending = [cid for g in groups for cid in g["pending"]]
    if pending:
        lines += ["", "## Pending cells (no result.json yet)", "", *(f"- {cid}" for cid in pending)]
    if summary.get("selection"):
        plot = next((p for p in plots if Path(p).name == "selection.png"), None)
        lines += ["", render_selection(summary["selection"], plot).rstrip()]
    search = (summary.get("selection") or {}).get("compute_seconds")
    lines += ["", f"Total compute: {summary['compute_seconds']:.0f} s of cell wall time "
                  f"({summary['train_seconds']:.0f} s training)"
                  + (f", plus {search:.0f} s for the model selection." if search is not None else ".")]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{Path(p).name}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- files
def _group_histories(cells: list[Cell], results: dict[str, dict[str, Any]]) -> dict[str, list[list[dict]]]:
    histories: dict[str, list[list[dict]]] = {}
    for cell in cells:
        path = cell.run_dir / "log_history.json"
        if results.get(cell.id, {}).get("status") == "ok" and path.is_file():
            histories.setdefault(cell.group, []).append(json.loads(path.read_text()))
    return histories


def write_summary(spec: CompareSpec, cells: list[Cell], say: Say = say_print,
                  selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """summary.json, summary.md and plots/ from the cells' result.json files (and the model selection
    that chose the cells' settings, if any: `balora.experiments.selection.choose`)."""
    results = {c.id: r for c in cells if (r := load_result(c)) is not None}
    summary = summarize(spec, cells, results)
    if selection is not None:
        summary["selection"] = selection
    plots: list[str] = []
    try:  # matplotlib is the optional `report` extra: the tables do not need it
        from balora.experiments.plots import make_plots
    except ImportError as error:
        say(f"plots skipped: {error} (pip install 'balora[report]')")
    else:
        written = make_plots(summary, _group_histories(cells, results), spec.output_dir / "plots")
        if selection is not None:
            written.append(plot_selection(selection, spec.output_dir / "plots" / "selection.png"))
        plots = [str(p.relative_to(spec.output_dir)) for p in written if p is not None]
    summary["plots"] = plots
    write_json(spec.output_dir / "summary.json", summary)
    write_text_atomic(spec.output_dir / "summary.md", render_markdown(summary, plots))
    return summary
