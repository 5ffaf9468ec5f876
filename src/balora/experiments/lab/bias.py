"""``balora lab bias``: social-bias scores of a model before and after fine-tuning (e.g. whether
BA-LoRA's consistency term, which pulls towards the pre-trained model, changes them less).

The evaluation harness's likelihood tasks (CrowS-Pairs, StereoSet, BBQ) run on the base model and
on every fine-tuned run, in this process; each model's ``eval.json`` goes to
``<output_dir>/evals/<model>/`` and a model whose ``eval.json`` already holds every task is skipped
(resumable). The table reports each group's mean ± std over its runs and the change from the base.

Spec::

    experiment: bias
    output_dir: runs/lab-bias
    base_model: asset:smollm2
    compare_dirs: [runs/compare-nlg]         # `balora compare` outputs: every ok cell is a run
    runs: []                                 # and/or run directories (config.yaml + adapter/)
    tasks: [crows_pairs, stereoset, bbq]
    limit: null                              # first N items of every task, or per task:
                                             # {crows_pairs: null, stereoset: 600, bbq: 120}
    batch_size: 8
    data: {}                                 # task -> file instead of the asset
    device: null                             # cpu / cuda (default: CUDA when present)

Paths (output_dir, compare_dirs, runs) are relative to the current directory, as in `balora compare`.
Groups: a compare cell's group (e.g. ``method=pissa``), a run directory's method.

Reading the scores: CrowS-Pairs score and StereoSet ss are the % of items where the stereotyped
option is more likely (50 = no preference); StereoSet lms is language-modelling ability, icat
combines both (100 ideal); BBQ accuracy is multiple-choice accuracy (ambiguous contexts: the
unbiased answer is "unknown").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from balora.core.config import ConfigError
from balora.experiments.grid import short_label
from balora.experiments.lab.common import figure, fmt, head_lines, md_table, regenerate_lines, save_figure
from balora.experiments.paired import paired_seed_differences
from balora.experiments.paired import verdict as paired_verdict
from balora.experiments.report import Say, say_print
from balora.experiments.spec import LabSpec, load_lab_spec
from balora.experiments.stats import stats
from balora.experiments.store import claim_dir, release_dir
from balora.utils import iter_jsonl, now_iso, write_json, write_text_atomic

KEYS = ("base_model", "compare_dirs", "runs", "tasks", "limit", "batch_size", "data", "device")
BIAS_TASKS = ("crows_pairs", "stereoset", "bbq")
# task -> [(metric key in eval.json, column title)]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "crows_pairs": [("score", "CrowS-Pairs score")],
    "stereoset": [("ss", "StereoSet ss"), ("lms", "StereoSet lms"), ("icat", "StereoSet icat")],
    "bbq": [("accuracy", "BBQ acc"), ("ambiguous_accuracy", "BBQ ambiguous acc"),
            ("disambiguated_accuracy", "BBQ disamb. acc")],
}
# per-item 0/1 outcome behind a score (records/<task>.jsonl), for the paired item-level comparison
ITEM_OUTCOME = {"crows_pairs.score": "stereotype_preferred", "stereoset.ss": "stereotype_preferred",
                "bbq.accuracy": "correct"}
BOOTSTRAP = 2000


def paired_item_change(before: list[bool], after: list[bool], *, resamples: int = BOOTSTRAP,
                       seed: int = 0) -> dict[str, Any]:
    """Change in % of items with the outcome, same items before and after, with a 95 % paired bootstrap
    interval over items (resampling the items, not the seeds: the uncertainty that a finite test set
    adds even when there is one run per method). Also how many items flipped each way."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired outcomes need the same non-zero number of items, got {len(before)} and "
                         f"{len(after)}")
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    boot = diff[idx].mean(axis=1) * 100.0
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"delta": float(diff.mean() * 100.0), "ci95": [float(lo), float(hi)], "n": len(diff),
            "flipped_to": int((diff > 0).sum()), "flipped_from": int((diff < 0).sum())}


def _outcomes(eval_dir: Path, task: str, key: str) -> list[bool] | None:
    path = eval_dir / "records" / f"{task}.jsonl"
    return [bool(row[key]) for _, row in iter_jsonl(path)] if path.is_file() else None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:120] or "model"


def _run_method(run_dir: Path) -> tuple[str, Any]:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return str(cfg.get("method")), (cfg.get("training") or {}).get("seed")


def collect_models(spec: LabSpec, need_weights: bool = True) -> list[dict[str, Any]]:
    """The base model, then each run: {label, group, spec (what to load), eval_dir, seed}.

    ``need_weights``: check that each run directory can be loaded (not needed to report stored scores)."""
    base = spec.value("base_model", str)
    if not base:
        raise spec.error("base_model", "required (the model before fine-tuning, e.g. asset:smollm2)")
    evals = spec.output_dir / "evals"
    models = [{"label": "base", "group": "base", "spec": base, "eval_dir": evals / "base", "seed": None}]
    for i, directory in enumerate(spec.list_of("compare_dirs", str, default=[], nonempty=False)):
        root = Path(directory)
        if not (root / "cells").is_dir():
            raise spec.error(f"compare_dirs[{i}]", f"{root}: not a `balora compare` output directory (no cells/)")
        results = sorted(root.glob("cells/*/result.json"))
        ok = [json.loads(p.read_text()) for p in results]
        ok = [r for r in ok if r.get("status") == "ok"]
        if not ok:
            raise spec.error(f"compare_dirs[{i}]", f"{root}: no finished (ok) cell in cells/*/result.json")
        for r in ok:
            run_dir = root / r["run_dir"]
            if need_weights:  # adapters are gitignored: a stored report must not need them
                _check_run(spec, f"compare_dirs[{i}]", run_dir)
            group = r.get("group") or f"method={r.get('method')}"
            models.append({"label": f"{root.name}/{r['cell_id']}", "group": group, "spec": str(run_dir),
                           "eval_dir": evals / _safe(root.name) / _safe(r["cell_id"]), "seed": r.get("seed")})
    for i, directory in enumerate(spec.list_of("runs", str, default=[], nonempty=False)):
        run_dir = Path(directory)
        _check_run(spec, f"runs[{i}]", run_dir, need_weights)
        method, seed = _run_method(run_dir)
        models.append({"label": str(run_dir), "group": f"method={method}", "spec": str(run_dir),
                       "eval_dir": evals / "runs" / _safe(str(run_dir)), "seed": seed})
    if len(models) == 1:
        raise spec.error("runs", "no fine-tuned model: give compare_dirs and/or runs")
    seen: dict[Path, str] = {}
    for m in models:
        if m["eval_dir"] in seen:
            raise spec.error("runs", f"{m['label']} and {seen[m['eval_dir']]} would share {m['eval_dir']}")
        seen[m["eval_dir"]] = m["label"]
    return models


def _check_run(spec: LabSpec, key: str, run_dir: Path, need_weights: bool = True) -> None:
    if not run_dir.is_dir():
        raise spec.error(key, f"{run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file() or (need_weights and not (run_dir / "adapter").is_dir()):
        raise spec.error(key, f"{run_dir}: not a balora run directory (needs config.yaml and adapter/)")


def _missing_tasks(spec: LabSpec, model: dict[str, Any], tasks: list[str],
                   limits: dict[str, int | None]) -> list[str]:
    """Tasks without a result in the model's eval.json; a result made with another limit is an error."""
    path = model["eval_dir"] / "eval.json"
    if not path.is_file():
        return list(tasks)
    stored = json.loads(path.read_text())
    missing = []
    for task in tasks:
        entry = stored.get("tasks", {}).get(task)
        if entry is None:
            missing.append(task)
        elif entry.get("settings", {}).get("limit") != limits[task]:
            raise ConfigError(f"{spec.path}: limit: {path} holds {task} with limit "
                              f"{entry.get('settings', {}).get('limit')}, the spec says {limits[task]}; delete "
                              f"{model['eval_dir']} to redo it, or choose another output_dir")
    return missing


def parse_limits(spec: LabSpec, tasks: list[str]) -> dict[str, int | None]:
    """``limit``: null / N for every task, or a mapping task -> null / N (tasks left out: all items)."""
    raw = spec.data.get("limit")
    if isinstance(raw, dict):
        unknown = sorted(set(raw) - set(tasks))
        if unknown:
            raise spec.error(f"limit.{unknown[0]}", f"not one of the spec's tasks {tasks}")
        limits = {task: raw.get(task) for task in tasks}
    else:
        limits = {task: raw for task in tasks}
    for task, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            where = f"limit.{task}" if isinstance(raw, dict) else "limit"
            raise spec.error(where, f"expected null (all items) or an integer >= 1, got {value!r}")
    return limits


def _metric(entry: dict[str, Any] | None, task: str, key: str) -> float | None:
    value = ((entry or {}).get("tasks", {}).get(task, {}).get("metrics") or {}).get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # BBQ accuracies are fractions; shown in % like the other scores
        return float(value) * (100.0 if task == "bbq" else 1.0)
    return None


def report(spec: LabSpec, models: list[dict[str, Any]], tasks: list[str],
           limits: dict[str, int | None]) -> dict[str, Any]:
    """results.json, README.md and the plot from the models' eval.json files and per-item records."""
    columns = [(f"{t}.{k}", title) for t in tasks for k, title in COLUMNS[t]]
    evals = {m["label"]: (json.loads((m["eval_dir"] / "eval.json").read_text())
                          if (m["eval_dir"] / "eval.json").is_file() else None) for m in models}
    values = {m["label"]: {c: _metric(evals[m["label"]], *c.split(".", 1)) for c, _ in columns} for m in models}
    base = values["base"]
    groups: dict[str, list[str]] = {}
    for m in models[1:]:
        groups.setdefault(m["group"], []).append(m["label"])
    table: dict[str, Any] = {"base": {c: stats([base[c]] if base[c] is not None else []) for c, _ in columns}}
    deltas: dict[str, Any] = {}
    for group, labels in groups.items():
        table[group] = {c: stats([values[lab][c] for lab in labels if values[lab][c] is not None])
                        for c, _ in columns}
        deltas[group] = {c: stats([values[lab][c] - base[c] for lab in labels
                                   if values[lab][c] is not None and base[c] is not None]) for c, _ in columns}
    paired: dict[str, Any] = {}
    for col, key in ITEM_OUTCOME.items():
        task = col.split(".", 1)[0]
        if task not in tasks:
            continue
        before = _outcomes(models[0]["eval_dir"], task, key)
        for m in models[1:]:
            after = _outcomes(m["eval_dir"], task, key)
            if before and after and len(before) == len(after):
                paired.setdefault(m["label"], {})[col] = paired_item_change(before, after)
    out = {"experiment": "bias", "spec": str(spec.path), "tasks": tasks, "limits": limits,
           "columns": [c for c, _ in columns], "titles": dict(columns), "paired": paired,
           "closeness": closeness_by_seed(models, values, [c for c, _ in columns]),
           "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()} | {"values": values[m["label"]],
                       "evaluated": evals[m["label"]] is not None} for m in models],
           "table": table, "delta": deltas, "finished_at": now_iso()}
    plot = _plot(out, spec.output_dir / "plots" / "bias-delta.png")
    out["plots"] = [str(plot.relative_to(spec.output_dir))]
    write_json(spec.output_dir / "results.json", out)
    write_text_atomic(spec.output_dir / "README.md", render(spec, out))
    return out


def closeness_by_seed(models: list[dict[str, Any]], values: dict[str, dict[str, float | None]],
                      columns: list[str]) -> dict[str, dict[str, Any]]:
    """Which method stays closer to the base model, seed by seed: for each pair of groups (A, B) and each
    score, per common seed |A − base| − |B − base| (negative: A stayed closer), with its mean and 95 % t
    interval over the seeds (`balora.experiments.paired.paired_seed_differences`)."""
    base = values["base"]
    by_group: dict[str, dict[Any, str]] = {}
    for m in models[1:]:
        by_group.setdefault(m["group"], {})[m["seed"]] = m["label"]
    out: dict[str, dict[str, Any]] = {}
    names = list(by_group)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pair = {}
            for col in columns:
                if base[col] is None:
                    continue
                dist = {g: {seed: (abs(values[lab][col] - base[col]) if values[lab][col] is not None else None)
                            for seed, lab in by_group[g].items()} for g in (a, b)}
                pair[col] = paired_seed_differences(dist[a], dist[b])
            out[f"{a} vs {b}"] = pair
    return out


def _plot(out: dict[str, Any], path: Path) -> Path:
    columns = out["columns"]
    groups = list(out["delta"])
    fig, axes = figure(len(columns), width=3.4, height=3.2, rows=2 if len(columns) > 4 else 1)
    for ax, col in zip(axes, columns):
        cells = [out["delta"][g][col] for g in groups]
        xs = range(len(groups))
        ax.bar(xs, [c["mean"] if c["n"] else 0 for c in cells], yerr=[c["std"] or 0 for c in cells],
               capsize=3, color="tab:purple", alpha=0.8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), [short_label(g) for g in groups], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"Δ {out['titles'][col]} (after − base)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _tasks_words(limits: dict[str, int | None]) -> str:
    return ", ".join(f"{task} ({'all items' if n is None else f'first {n} items'})" for task, n in limits.items())


def render(spec: LabSpec, out: dict[str, Any]) -> str:
    """README.md: the setup, the scores per group, their change from the base model, and per run the
    change on the same items with its bootstrap interval."""
    cols = out["columns"]
    n_done = sum(m["evaluated"] for m in out["models"])
    lines = head_lines(spec, "Bias: inherited social bias before and after fine-tuning",
                       "Social-bias scores of the base model and of each fine-tuned run, and their change "
                       "from the base model.")
    lines += ["## Setup", "",
              f"- Spec: `{spec.path}`; base model `{out['models'][0]['spec']}`; {len(out['models']) - 1} fine-tuned "
              f"runs; tasks {_tasks_words(out['limits'])}; {n_done} of "
              f"{len(out['models'])} models evaluated.",
              "- Scores from the model's own likelihoods (`balora.evaluation.likelihood`): CrowS-Pairs score and "
              "StereoSet ss = % of items where the stereotyped option is more likely (50 = no preference); "
              "StereoSet lms = % where a related option beats the unrelated one; icat = lms·min(ss, 100 − ss)/50; "
              "BBQ accuracies in % (ambiguous contexts: the right answer is \"unknown\").", "",
              "## Scores", "", "Mean ± sample std over each group's runs (seeds).", ""]
    rows = [[short_label(g)] + [fmt(out["table"][g][c], 2) for c in cols] for g in out["table"]]
    lines += md_table(["model"] + [out["titles"][c] for c in cols], rows)
    lines += ["", "## Change from the base model (after − before)", ""]
    rows = [[short_label(g)] + [fmt(out["delta"][g][c], 2, sign=True) for c in cols] for g in out["delta"]]
    lines += md_table(["method"] + [out["titles"][c] for c in cols], rows)
    if out["paired"]:
        item_cols = [c for c in ITEM_OUTCOME if c in cols]
        lines += ["", "## Per run: the change on the same items, with its item-level uncertainty", "",
                  f"Δ in points, 95 % paired bootstrap interval over the items ({BOOTSTRAP} resamples), and "
                  "how many items flipped to / from the outcome (stereotype preferred; BBQ: correct). It "
                  "measures the uncertainty the finite test set adds to one run (an interval that excludes 0: "
                  "a change the item sample alone does not explain); it says nothing about seeds.", ""]
        rows = []
        for m in out["models"][1:]:
            got = out["paired"].get(m["label"], {})
            rows.append([f"{short_label(m['group'])} (seed {m['seed']})"]
                        + [(f"{got[c]['delta']:+.2f} [{got[c]['ci95'][0]:+.2f}, {got[c]['ci95'][1]:+.2f}] "
                            f"(+{got[c]['flipped_to']} / −{got[c]['flipped_from']}, n={got[c]['n']})")
                           if c in got else "–" for c in item_cols])
        lines += md_table(["run"] + [out["titles"][c] for c in item_cols], rows)
    if out.get("closeness"):
        lines += ["", "## Between methods, seed by seed: who stays closer to the base model", "",
                  "Per common seed, |change of A| − |change of B| in points (negative: A stayed closer to the base "
                  "model's score), mean and 95 % t interval over the seeds; A is closer only when the interval "
                  "lies below 0, B when above; otherwise inconclusive.", ""]
        rows = []
        for pair, by_col in out["closeness"].items():
            a, b = (short_label(x) for x in pair.split(" vs "))
            cells = []
            for c in cols:
                d = by_col.get(c)
                if not d or d["n"] == 0:
                    cells.append("–")
                    continue
                low, high = d["t_low"], d["t_high"]
                # |A| − |B| below 0 is A's "win": paired.verdict with lower is better
                verdict = {"beats": f"{a} closer", "is beaten by": f"{b} closer"}.get(
                    paired_verdict((low, high), None, lower_is_better=True), "inconclusive")
                interval = f" [{low:+.2f}, {high:+.2f}]" if low is not None else ""
                cells.append(f"{d['mean']:+.2f}{interval} (n={d['n']}): {verdict}")
            rows.append([f"{a} − {b}"] + cells)
        lines += md_table(["A − B"] + [out["titles"][c] for c in cols], rows)
    lines += ["", "![bias deltas](plots/bias-delta.png)", ""] + regenerate_lines("bias", spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
        say: Say = say_print) -> dict[str, Any]:
    """Evaluate (resumably) the base model and every run, then write the report.

    ``show_progress`` is accepted like every lab's; the harness reports through ``say``."""
    spec = load_lab_spec(spec_path, "bias", KEYS, required=("base_model",))
    tasks = spec.list_of("tasks", str, default=list(BIAS_TASKS))
    for i, task in enumerate(tasks):
        if task not in BIAS_TASKS:
            raise spec.error(f"tasks[{i}]", f"{task!r} is not a bias task; known: {', '.join(BIAS_TASKS)}")
    limits = parse_limits(spec, tasks)
    batch_size = spec.value("batch_size", int, 8)
    device = spec.value("device", str)
    data = spec.mapping("data", {})
    for task, path in data.items():
        if task not in tasks or not isinstance(path, str):
            raise spec.error(f"data.{task}", f"expected a file for one of the tasks {tasks}, got {path!r}")
    models = collect_models(spec, need_weights=not only_report)
    if not only_report:
        from balora.evaluation.harness import evaluate  # loads models: only when something is evaluated

        for i, model in enumerate(models, 1):
            missing = _missing_tasks(spec, model, tasks, limits)
            if not missing:
                say(f"bias: [{i}/{len(models)}] {model['label']}: eval.json complete, skipped")
                continue
            # several processes may share the models (one per core): each takes the unclaimed ones
            owner = claim_dir(model["eval_dir"])
            if owner is not None:
                say(f"bias: [{i}/{len(models)}] {model['label']}: being evaluated by process {owner}, skipped")
                continue
            try:
                missing = _missing_tasks(spec, model, tasks, limits)  # again: another process may have finished it
                say(f"bias: [{i}/{len(models)}] {model['label']}: {', '.join(missing) or 'done meanwhile'}")
                # one harness call per distinct limit (it takes one limit for all its tasks); each merges
                # its tasks into the model's eval.json
                for limit in dict.fromkeys(limits[task] for task in missing):
                    evaluate(model["spec"], [t for t in missing if limits[t] == limit], limit=limit,
                             out_dir=model["eval_dir"], batch_size=batch_size, progress=lambda m: say(f"  {m}"),
                             device=device, data=data)
            finally:
                release_dir(model["eval_dir"])
    out = report(spec, models, tasks, limits)
    say(f"bias: report in {spec.output_dir / 'README.md'}")
    return out
