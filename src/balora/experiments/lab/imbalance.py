"""``balora lab imbalance``: the paper's imbalanced-data probe, controlled.

For each task, a `balora compare` grid over ``data.imbalance_ratio`` × method × ``training.seed``:
the training split is subsampled (seeded by ``data.split_seed``) to each minority:majority ratio,
everything else is the task's run configuration; test (and validation) are balanced
(``data.balance_test``), so accuracy and macro-F1 are not dominated by the majority class. The
minority recall is the test recall of the class that was made rare in training.

Spec (``docs/results/lab/imbalance/spec.yaml``)::

    experiment: imbalance
    output_dir: docs/results/lab/imbalance
    ratios: ["1:1", "1:9", "1:19", "1:49"]   # minority:majority (or numbers in (0, 1])
    methods: [lora, pissa, lora-reg, ba-lora]
    seeds: [1, 2, 3]
    tasks:                                   # name -> a compare spec without name/output_dir/grid
      rotten-tomatoes: {base: nlu-rotten-tomatoes-minilm.yaml, overrides: [training.max_steps=100]}

Outputs: ``<output_dir>/<task>/`` (the compare run: cells, summary.md, plots/), ``results.json``,
``README.md`` and ``plots/imbalance-<task>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from balora.training.data import parse_ratio
from balora.experiments.lab.common import (LabSpec, Say, check_keys, compare_spec, figure, fmt, get_list, get_mapping, load_lab_spec,
                     md_table, now, regenerate_lines, save_figure, say_print, separated, spread_words, stats,
                     write_json)

KEYS = ("ratios", "methods", "seeds", "tasks")
TASK_KEYS = ("base", "base_config", "overrides", "grid")
METRICS = {"minority_recall": "minority recall", "macro_f1": "macro-F1", "accuracy": "accuracy"}
RATIO_KEY = "data.imbalance_ratio"
PAPER = "the paper's imbalanced-MNLI probe: minority recall LoRA 5.8, PiSSA 26.4, BA-LoRA 61.7"


def _ratio_label(value: Any) -> str:
    """"1:9" stays "1:9"; a number r becomes "1:{1/r:g}"."""
    if isinstance(value, str):
        return value.replace(" ", "")
    return f"1:{1 / float(value):.3g}"


def _setup(spec: LabSpec) -> tuple[list[Any], list[str], list[int], dict[str, Any]]:
    ratios = get_list(spec, "ratios", (int, float, str), default=["1:1", "1:9", "1:19", "1:49"])
    for i, ratio in enumerate(ratios):
        try:
            parse_ratio(ratio)
        except ValueError as error:
            raise spec.error(f"ratios[{i}]", str(error)) from None
    methods = get_list(spec, "methods", str, default=["lora", "pissa", "lora-reg", "ba-lora"])
    seeds = get_list(spec, "seeds", int, default=[1, 2, 3])
    tasks = get_mapping(spec, "tasks")
    if not tasks:
        raise spec.error("tasks", "expected at least one task (name -> compare spec)")
    specs = {}
    for name, mapping in tasks.items():
        if not isinstance(mapping, dict):
            raise spec.error(f"tasks.{name}", f"expected a mapping (base or base_config, overrides), got {mapping!r}")
        check_keys(spec, mapping, TASK_KEYS, f"tasks.{name}")
        specs[name] = compare_spec(
            spec, mapping, f"tasks.{name}", name=f"imbalance-{name}", output_dir=spec.output_dir / name,
            grid={RATIO_KEY: ratios, "method": methods, "training.seed": seeds},
            overrides=["data.balance_test=true"], metrics=["test.accuracy", "test.macro_f1"])
    return ratios, methods, seeds, specs


def cell_row(result: dict[str, Any]) -> dict[str, Any]:
    """One finished cell: its grid values and the three metrics (minority = the class made rare)."""
    test = result.get("metrics", {}).get("test", {})
    imbalance = result.get("data", {}).get("imbalance", {})
    minority = imbalance.get("minority_label")
    recall = (test.get("per_class_recall") or {}).get(str(minority)) if minority is not None else None
    return {"cell_id": result["cell_id"], "status": result.get("status"), "method": result.get("method"),
            "ratio": _ratio_label(result["grid"][RATIO_KEY]), "seed": result.get("seed"),
            "minority_label": minority, "minority_recall": recall, "macro_f1": test.get("macro_f1"),
            "accuracy": test.get("accuracy"), "train_counts": imbalance.get("counts_after"),
            "test_counts": (result.get("data", {}).get("class_counts") or {}).get("test"),
            "train_seconds": result.get("train_seconds")}


def tabulate(rows: list[dict[str, Any]], methods: list[str], ratios: list[str]) -> dict[str, Any]:
    """metric -> method -> ratio -> mean ± std over the ok cells."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {metric: {m: {ratio: stats([r[metric] for r in ok if r["method"] == m and r["ratio"] == ratio])
                         for ratio in ratios} for m in methods} for metric in METRICS}


def _findings(task: str, table: dict[str, Any], methods: list[str], ratios: list[str]) -> list[str]:
    lines = []
    hardest = ratios[-1]
    recall = table["minority_recall"]
    ranked = sorted((m for m in methods if recall[m][hardest]["n"]), key=lambda m: -recall[m][hardest]["mean"])
    if not ranked:
        return [f"- {task}: no finished cells yet."]
    text = f"{ranked[0]} ({fmt(recall[ranked[0]][hardest])})"
    for prev, m in zip(ranked, ranked[1:]):
        tie = recall[prev][hardest]["mean"] == recall[m][hardest]["mean"]
        text += f" {'=' if tie else '>'} {m} ({fmt(recall[m][hardest])})"
    lines.append(f"- {task}, ratio {hardest}: minority recall ranking {text}.")
    for a, b in (("ba-lora", "pissa"), ("ba-lora", "lora"), ("pissa", "lora")):
        if a in methods and b in methods and recall[a][hardest]["n"] and recall[b][hardest]["n"]:
            diff = recall[a][hardest]["mean"] - recall[b][hardest]["mean"]
            spread = spread_words(recall[a][hardest], recall[b][hardest])
            lines.append(f"  - {a} − {b} at {hardest}: {diff:+.3f}, {spread}.")
    if {"ba-lora", "pissa", "lora"} <= set(methods):
        order = [recall[m][hardest] for m in ("ba-lora", "pissa", "lora")]
        if all(s["n"] for s in order):
            holds = order[0]["mean"] > order[1]["mean"] > order[2]["mean"]
            beyond = holds and all(separated(x, y) for x, y in zip(order, order[1:]))
            lines.append(f"  - The paper's ordering BA-LoRA > PiSSA > LoRA in minority recall at {hardest}: "
                         + ("reproduced beyond the seed spread." if beyond else
                            "holds in the means but not beyond the seed spread." if holds else "not reproduced."))
    return lines


def _plot(task: str, table: dict[str, Any], methods: list[str], ratios: list[str], path: Path) -> Path:
    fig, axes = figure(len(METRICS))
    xs = [1 / parse_ratio(r) for r in ratios]  # majority examples per minority example
    for ax, (metric, title) in zip(axes, METRICS.items()):
        for method in methods:
            cells = [table[metric][method][r] for r in ratios]
            pts = [(x, c["mean"], c["std"] or 0.0) for x, c in zip(xs, cells) if c["n"]]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                            capsize=3, label=method)
        ax.set_xscale("log")
        ax.set_xticks(xs, ratios)
        ax.minorticks_off()
        ax.set_xlabel("minority:majority in training")
        ax.set_title(f"{task}: {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return save_figure(fig, path)


def report(spec: LabSpec, ratios: list[Any], methods: list[str], seeds: list[int],
           specs: dict[str, Any]) -> dict[str, Any]:
    """results.json, README.md and plots from the cells' result.json files."""
    from balora.experiments.compare import build_cells

    labels = [_ratio_label(r) for r in ratios]
    out: dict[str, Any] = {"experiment": "imbalance", "spec": str(spec.path), "ratios": labels,
                           "methods": methods, "seeds": seeds, "tasks": {}, "finished_at": now()}
    plots = []
    for task, cspec in specs.items():
        rows = []
        for cell in build_cells(cspec):
            if cell.result_path.is_file():
                rows.append(cell_row(json.loads(cell.result_path.read_text())))
        table = tabulate(rows, methods, labels)
        out["tasks"][task] = {"compare_dir": str(cspec.output_dir), "cells": rows, "table": table,
                              "cells_expected": len(ratios) * len(methods) * len(seeds),
                              "cells_ok": sum(r["status"] == "ok" for r in rows)}
        plots.append(_plot(task, table, methods, labels, spec.output_dir / "plots" / f"imbalance-{task}.png"))
    out["plots"] = [str(p.relative_to(spec.output_dir)) for p in plots]
    write_json(spec.output_dir / "results.json", out)
    (spec.output_dir / "README.md").write_text(render(spec, out))
    return out


def render(spec: LabSpec, out: dict[str, Any]) -> str:
    lines = ["# Imbalance: minority recall under a controlled class imbalance", "",
             f"Question ({PAPER}): when the training split is imbalanced, does BA-LoRA keep recognising the "
             "minority class better than LoRA and PiSSA?", "",
             "## Setup", "",
             f"- Spec: `{spec.path}`; tasks: {', '.join(out['tasks'])}; methods: {', '.join(out['methods'])}; "
             f"seeds: {', '.join(map(str, out['seeds']))}.",
             f"- Training split subsampled (seeded by `data.split_seed`) to minority:majority "
             f"{', '.join(out['ratios'])}: the rare class is the least frequent training label unless "
             "`data.minority_label` says otherwise; the kept minority examples of a stronger imbalance are a "
             "subset of those of a milder one. Test and validation are balanced (`data.balance_test`).",
             "- Everything else (model, rank, steps, batch, learning rate, test set) is the task's run "
             "configuration, identical across cells. Minority recall = test recall of the class made rare.", ""]
    for task, entry in out["tasks"].items():
        lines += [f"## {task}", "",
                  f"{entry['cells_ok']} of {entry['cells_expected']} cells finished "
                  f"(compare run: `{entry['compare_dir']}`, its summary.md has cost and per-group details). "
                  "Mean ± sample std over seeds.", ""]
        counts = next((c for c in entry["cells"] if c["train_counts"]), None)
        if counts:
            per_ratio = {c["ratio"]: c["train_counts"] for c in entry["cells"] if c["train_counts"]}
            lines += ["Training class counts: " + "; ".join(f"{r}: {per_ratio[r]}" for r in out["ratios"]
                                                             if r in per_ratio)
                      + (f"; test: {counts['test_counts']}" if counts["test_counts"] else "") + ".", ""]
        for metric, title in METRICS.items():
            rows = [[m] + [fmt(entry["table"][metric][m][r]) for r in out["ratios"]] for m in out["methods"]]
            lines += [f"**{title}**", "", *md_table(["method"] + out["ratios"], rows), ""]
        lines += [f"![{task}](plots/imbalance-{task}.png)", ""]
    lines += ["## What reproduced", "",
              "Rule: two means are separated when their difference exceeds the larger of the two sample stds "
              "(a heuristic, not a significance test).", ""]
    for task, entry in out["tasks"].items():
        lines += _findings(task, entry["table"], out["methods"], out["ratios"])
    lines += [""] + regenerate_lines("imbalance", spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Run (resumably) every task's compare grid, then write the report."""
    from balora.experiments.compare import run_compare

    spec = load_lab_spec(spec_path, "imbalance", KEYS, required=("tasks",))
    ratios, methods, seeds, specs = _setup(spec)
    for task, cspec in specs.items():
        say(f"imbalance: task {task} → {cspec.output_dir}")
        run_compare(cspec, only_summary=only_report, show_progress=show_progress, say=say)
    out = report(spec, ratios, methods, seeds, specs)
    say(f"imbalance: report in {spec.output_dir / 'README.md'}")
    return out
