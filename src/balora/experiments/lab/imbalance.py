"""``balora lab imbalance``: the paper's imbalanced-data probe, controlled.

For each task, a `balora compare` grid over ``data.imbalance_ratio`` × method × ``training.seed``:
the training split is subsampled (seeded by ``data.split_seed``) to each minority:majority ratio,
everything else is the task's run configuration; test (and validation) are balanced
(``data.balance_test``), so accuracy and macro-F1 are not dominated by the majority class. The
minority recall is the test recall of the class that was made rare in training.

Spec::

    experiment: imbalance
    output_dir: runs/lab-imbalance
    ratios: ["1:1", "1:9", "1:19", "1:49"]   # minority:majority (or numbers in (0, 1])
    methods: [lora, pissa, lora-reg, ba-lora]
    seeds: [1, 2, 3]
    tasks:                                   # name -> a compare spec without name/output_dir/grid
      rotten-tomatoes: {base: nlu-rotten-tomatoes-minilm.yaml, overrides: [training.max_steps=100]}
    paper: "..."                             # optional: reference numbers, shown in the README

Outputs: ``<output_dir>/<task>/`` (the compare run: cells, summary.md, plots/), ``results.json``,
``README.md`` and ``plots/imbalance-<task>.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from balora.experiments.grid import build_cells
from balora.experiments.lab.common import (
    DIFFERENCE_RULE,
    compare_paired,
    difference_table,
    figure,
    fmt,
    head_lines,
    md_table,
    regenerate_lines,
    save_figure,
)
from balora.experiments.paired import DEFAULT_METHOD_PAIRS, compare_pair
from balora.experiments.report import Say, paired_section, say_print
from balora.experiments.runner import run_compare
from balora.experiments.spec import CompareSpec, LabSpec, load_lab_spec
from balora.experiments.stats import stats
from balora.experiments.store import load_result
from balora.training.data import parse_ratio
from balora.utils import now_iso, write_json, write_text_atomic

KEYS = ("ratios", "methods", "seeds", "tasks")
TASK_KEYS = ("base", "base_config", "overrides", "grid", "per_method")
METRICS = {"minority_recall": "minority recall", "balanced_accuracy": "balanced accuracy",
           "auroc": "AUROC (threshold-free)", "macro_f1": "macro-F1", "accuracy": "accuracy"}
RATIO_KEY = "data.imbalance_ratio"
RARE_RECALL = "test.rare_class.recall"  # the recall of the class made rare in training, as a paired metric


def _ratio_label(value: Any) -> str:
    """"1:9" stays "1:9"; a number r becomes "1:{1/r:g}"."""
    if isinstance(value, str):
        return value.replace(" ", "")
    return f"1:{1 / float(value):.3g}"


def _setup(spec: LabSpec) -> tuple[list[Any], list[str], list[int], dict[str, CompareSpec]]:
    ratios = spec.list_of("ratios", (int, float, str), default=["1:1", "1:9", "1:19", "1:49"])
    for i, ratio in enumerate(ratios):
        try:
            parse_ratio(ratio)
        except ValueError as error:
            raise spec.error(f"ratios[{i}]", str(error)) from None
    methods = spec.list_of("methods", str, default=["lora", "pissa", "lora-reg", "ba-lora"])
    seeds = spec.list_of("seeds", int, default=[1, 2, 3])
    tasks = spec.mapping("tasks")
    if not tasks:
        raise spec.error("tasks", "expected at least one task (name -> compare spec)")
    specs = {}
    for name, mapping in tasks.items():
        if not isinstance(mapping, dict):
            raise spec.error(f"tasks.{name}", f"expected a mapping (base or base_config, overrides), got {mapping!r}")
        spec.section("tasks").section(name, TASK_KEYS)
        specs[name] = spec.compare_spec(
            f"tasks.{name}", mapping, name=f"imbalance-{name}", output_dir=spec.output_dir / name,
            grid={RATIO_KEY: ratios, "method": methods, "training.seed": seeds},
            overrides=["data.balance_test=true"],
            # not test.minority_recall: the test split is balanced, so its "minority" is a tie, not the
            # class made rare in training (cell_row reads that one's recall)
            metrics=["test.accuracy", "test.balanced_accuracy", "test.macro_f1", "test.auroc"])
    return ratios, methods, seeds, specs


def _from_stored_logits(run_dir: Path | None) -> dict[str, Any]:
    """Balanced accuracy and AUROC recomputed from ``predictions/test.json`` (cells run before these two
    metrics were part of the test metrics), or {} when the file is missing."""
    path = run_dir / "predictions" / "test.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    from balora.training.metrics import classification_metrics

    items = json.loads(path.read_text())
    metrics = classification_metrics(items["label"], items["predicted"], labels=items["labels"],
                                     scores=items["logits"])
    return {"balanced_accuracy": metrics["balanced_accuracy"], "auroc": metrics["auroc"]}


def cell_row(result: dict[str, Any], run_dir: Path | None = None) -> dict[str, Any]:
    """One finished cell: its grid values and the metrics (minority = the class made rare); balanced
    accuracy and AUROC from the stored logits of ``run_dir`` when the cell's metrics lack them."""
    test = dict(result.get("metrics", {}).get("test", {}))
    if "auroc" not in test:
        test.update(_from_stored_logits(run_dir))
    imbalance = result.get("data", {}).get("imbalance", {})
    minority = imbalance.get("minority_label")
    recall = (test.get("per_class_recall") or {}).get(str(minority)) if minority is not None else None
    return {"cell_id": result["cell_id"], "status": result.get("status"), "method": result.get("method"),
            "ratio": _ratio_label(result["grid"][RATIO_KEY]), "seed": result.get("seed"),
            "minority_label": minority, "minority_recall": recall, "macro_f1": test.get("macro_f1"),
            "balanced_accuracy": test.get("balanced_accuracy"), "auroc": test.get("auroc"),
            "accuracy": test.get("accuracy"), "train_counts": imbalance.get("counts_after"),
            "test_counts": (result.get("data", {}).get("class_counts") or {}).get("test"),
            "train_seconds": result.get("train_seconds")}


def rare_class_pairs(rows: list[dict[str, Any]], methods: list[str], ratios: list[str]) -> list[dict[str, Any]]:
    """The recall of the class made rare, compared seed by seed per ratio (the default method pairs),
    as the compare summaries record a paired entry; t interval only: a recall has no per-item score."""
    ok = [r for r in rows if r["status"] == "ok"]
    entries = []
    for ratio in ratios:
        for a, b in [p for p in DEFAULT_METHOD_PAIRS if p[0] in methods and p[1] in methods]:
            values = [{r["seed"]: r["minority_recall"] for r in ok if r["method"] == m and r["ratio"] == ratio}
                      for m in (a, b)]
            entry = compare_pair(*values, metric=RARE_RECALL, samples=0)
            entry["bootstrap_note"] = "a recall has no per-item score: t interval only"
            entries.append({"a": f"{RATIO_KEY}={ratio}, method={a}", "b": f"{RATIO_KEY}={ratio}, method={b}",
                            **entry})
    return entries


def tabulate(rows: list[dict[str, Any]], methods: list[str], ratios: list[str]) -> dict[str, Any]:
    """metric -> method -> ratio -> mean ± std over the ok cells."""
    ok = [r for r in rows if r["status"] == "ok"]
    return {metric: {m: {ratio: stats([r[metric] for r in ok if r["method"] == m and r["ratio"] == ratio])
                         for ratio in ratios} for m in methods} for metric in METRICS}


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
           specs: dict[str, CompareSpec]) -> dict[str, Any]:
    """results.json, README.md and plots from the cells' result.json files."""
    labels = [_ratio_label(r) for r in ratios]
    out: dict[str, Any] = {"experiment": "imbalance", "spec": str(spec.path), "ratios": labels,
                           "methods": methods, "seeds": seeds, "tasks": {}, "finished_at": now_iso()}
    plots = []
    for task, cspec in specs.items():
        rows = [cell_row(result, cell.run_dir) for cell in build_cells(cspec)
                if (result := load_result(cell)) is not None]
        table = tabulate(rows, methods, labels)
        out["tasks"][task] = {"compare_dir": str(cspec.output_dir), "cells": rows, "table": table,
                              "cells_expected": len(ratios) * len(methods) * len(seeds),
                              "cells_ok": sum(r["status"] == "ok" for r in rows),
                              "paired": compare_paired(cspec) + rare_class_pairs(rows, methods, labels)}
        plots.append(_plot(task, table, methods, labels, spec.output_dir / "plots" / f"imbalance-{task}.png"))
    out["plots"] = [str(p.relative_to(spec.output_dir)) for p in plots]
    write_json(spec.output_dir / "results.json", out)
    write_text_atomic(spec.output_dir / "README.md", render(spec, out))
    return out


def render(spec: LabSpec, out: dict[str, Any]) -> str:
    """README.md: the setup, per task the class counts and a table per metric, and the pairwise
    differences of the minority recall at the strongest imbalance."""
    lines = head_lines(spec, "Imbalance: minority recall under a controlled class imbalance",
                       "Minority recall, balanced accuracy, AUROC, macro-F1 and accuracy of each method when "
                       "the training split is "
                       "subsampled to a minority:majority ratio.")
    lines += ["## Setup", "",
              f"- Spec: `{spec.path}`; tasks: {', '.join(out['tasks'])}; methods: {', '.join(out['methods'])}; "
              f"seeds: {', '.join(map(str, out['seeds']))}.",
              f"- Training split subsampled (seeded by `data.split_seed`) to minority:majority "
              f"{', '.join(out['ratios'])}: the rare class is the least frequent training label unless "
              "`data.minority_label` says otherwise; the kept minority examples of a stronger imbalance are a "
              "subset of those of a milder one. Test and validation are balanced (`data.balance_test`).",
              "- Everything else (model, rank, steps, batch, learning rate, test set) is the task's run "
              "configuration, identical across cells. Minority recall = test recall of the class made rare.", ""]
    hardest = out["ratios"][-1]
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
        lines += [f"![{task}](plots/imbalance-{task}.png)", "",
                  f"**minority recall at {hardest}, differences between methods**", "",
                  *difference_table({m: entry["table"]["minority_recall"][m][hardest] for m in out["methods"]}),
                  "", DIFFERENCE_RULE, ""]
        # the verdicts: per ratio, paired by seed — test accuracy (= balanced accuracy here) from the
        # compare run's summary, and the recall of the class made rare
        if entry.get("paired"):
            rows, where = [], []
            for e in entry["paired"]:  # group labels "data.imbalance_ratio=1:4, method=ba-lora"
                a, b = (dict(part.split("=", 1) for part in e[side].split(", ")) for side in ("a", "b"))
                rows.append({**e, "a": f"method={a.get('method')}", "b": f"method={b.get('method')}"})
                where.append(_ratio_label(a.get(RATIO_KEY, "?")))
            lines += [*paired_section(rows, where=where, level="###")[1:], ""]
    lines += regenerate_lines("imbalance", spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Run (resumably) every task's compare grid, then write the report."""
    spec = load_lab_spec(spec_path, "imbalance", KEYS, required=("tasks",))
    ratios, methods, seeds, specs = _setup(spec)
    for task, cspec in specs.items():
        say(f"imbalance: task {task} → {cspec.output_dir}")
        run_compare(cspec, only_summary=only_report, show_progress=show_progress, say=say)
    out = report(spec, ratios, methods, seeds, specs)
    say(f"imbalance: report in {spec.output_dir / 'README.md'}")
    return out
