"""``balora lab bias``: does fine-tuning move the social bias a model inherited, and does BA-LoRA's
consistency term (which pulls towards the pre-trained model) keep it where it was?

The evaluation harness's likelihood tasks (CrowS-Pairs, StereoSet, BBQ) run on the base model and
on every fine-tuned run, in this process; each model's ``eval.json`` goes to
``<output_dir>/evals/<model>/`` and a model whose ``eval.json`` already holds every task is skipped
(resumable). The table reports each group's mean ± std over its runs and the change from the base.

Spec::

    experiment: bias
    output_dir: docs/results/lab/bias
    base_model: asset:smollm2
    compare_dirs: [docs/results/nlg-asdiv]   # `balora compare` outputs: every ok cell is a run
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

from balora.core.config import ConfigError
from balora.experiments.lab.common import (LabSpec, Say, figure, fmt, get_list, get_mapping, get_value, group_name, load_lab_spec,
                     md_table, now,
                     regenerate_lines, save_figure, say_print, spread_words, stats, write_json)

KEYS = ("base_model", "compare_dirs", "runs", "tasks", "limit", "batch_size", "data", "device")
BIAS_TASKS = ("crows_pairs", "stereoset", "bbq")
# task -> [(metric key in eval.json, column title)]
COLUMNS: dict[str, list[tuple[str, str]]] = {
    "crows_pairs": [("score", "CrowS-Pairs score")],
    "stereoset": [("ss", "StereoSet ss"), ("lms", "StereoSet lms"), ("icat", "StereoSet icat")],
    "bbq": [("accuracy", "BBQ acc"), ("ambiguous_accuracy", "BBQ ambiguous acc"),
            ("disambiguated_accuracy", "BBQ disamb. acc")],
}
NEUTRAL_50 = {"crows_pairs.score", "stereoset.ss"}  # 50 = no stereotype preference
# per-item 0/1 outcome behind a score (records/<task>.jsonl), for the paired item-level comparison
ITEM_OUTCOME = {"crows_pairs.score": "stereotype_preferred", "stereoset.ss": "stereotype_preferred",
                "bbq.accuracy": "correct"}
BOOTSTRAP = 2000


def paired_item_change(before: list[bool], after: list[bool], *, resamples: int = BOOTSTRAP,
                       seed: int = 0) -> dict[str, Any]:
    """Change in % of items with the outcome, same items before and after, with a 95 % paired bootstrap
    interval over items (resampling the items, not the seeds: the uncertainty that a finite test set
    adds even when there is one run per method). Also how many items flipped each way."""
    import numpy as np

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
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        return [bool(json.loads(line)[key]) for line in fh if line.strip()]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)[:120] or "model"


def _run_method(run_dir: Path) -> tuple[str, Any]:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    return str(cfg.get("method")), (cfg.get("training") or {}).get("seed")


def collect_models(spec: LabSpec) -> list[dict[str, Any]]:
    """The base model, then each run: {label, group, spec (what to load), eval_dir, seed}."""
    base = get_value(spec, spec.data, "base_model", str, None, "base_model")
    if not base:
        raise spec.error("base_model", "required (the model before fine-tuning, e.g. asset:smollm2)")
    evals = spec.output_dir / "evals"
    models = [{"label": "base", "group": "base", "spec": base, "eval_dir": evals / "base", "seed": None}]
    for i, directory in enumerate(get_list(spec, "compare_dirs", str, default=[], nonempty=False)):
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
            _check_run(spec, f"compare_dirs[{i}]", run_dir)
            group = r.get("group") or f"method={r.get('method')}"
            models.append({"label": f"{root.name}/{r['cell_id']}", "group": group, "spec": str(run_dir),
                           "eval_dir": evals / _safe(root.name) / _safe(r["cell_id"]), "seed": r.get("seed")})
    for i, directory in enumerate(get_list(spec, "runs", str, default=[], nonempty=False)):
        run_dir = Path(directory)
        _check_run(spec, f"runs[{i}]", run_dir)
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


def _check_run(spec: LabSpec, key: str, run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise spec.error(key, f"{run_dir}: no such run directory")
    if not ((run_dir / "config.yaml").is_file() and (run_dir / "adapter").is_dir()):
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
           "models": [{k: (str(v) if isinstance(v, Path) else v) for k, v in m.items()} | {"values": values[m["label"]],
                       "evaluated": evals[m["label"]] is not None} for m in models],
           "table": table, "delta": deltas, "finished_at": now()}
    plot = _plot(out, spec.output_dir / "plots" / "bias-delta.png")
    out["plots"] = [str(plot.relative_to(spec.output_dir))]
    write_json(spec.output_dir / "results.json", out)
    (spec.output_dir / "README.md").write_text(render(spec, out))
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
        ax.set_xticks(list(xs), [group_name(g) for g in groups], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"Δ {out['titles'][col]} (after − base)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def _item_words(out: dict[str, Any], group: str, col: str) -> str:
    """For a one-run group: whether its change is beyond what the finite item set alone allows."""
    labels = [m["label"] for m in out["models"][1:] if m["group"] == group]
    got = out["paired"].get(labels[0], {}).get(col) if len(labels) == 1 else None
    if got is None:
        return ""
    lo, hi = got["ci95"]
    verdict = "excludes 0: beyond item noise" if lo > 0 or hi < 0 else "includes 0: within item noise"
    return f"; item 95 % CI [{lo:+.2f}, {hi:+.2f}] {verdict}"


def _findings(out: dict[str, Any]) -> list[str]:
    lines = []
    for col in out["columns"]:
        if col not in NEUTRAL_50:
            continue
        base = out["table"]["base"][col]
        if not base["n"]:
            continue
        parts = []
        for group, d in out["delta"].items():
            if d[col]["n"]:
                if d[col]["std"] is None:
                    moved = "one run, seed spread unknown" + _item_words(out, group, col)
                else:
                    moved = "moved" if abs(d[col]["mean"]) > d[col]["std"] else "within its seed spread"
                parts.append(f"{group_name(group)} {fmt(d[col], 2, sign=True)} ({moved})")
        lines.append(f"- {out['titles'][col]} (base {base['mean']:.2f}; 50 = no preference): "
                     + "; ".join(parts) + ".")
    groups = {group_name(g): g for g in out["delta"]}
    if "ba-lora" in groups:
        for other in ("pissa", "lora"):
            if other not in groups:
                continue
            for col in out["columns"]:
                a, b = out["delta"][groups["ba-lora"]][col], out["delta"][groups[other]][col]
                if a["n"] and b["n"]:
                    closer = abs(a["mean"]) < abs(b["mean"])
                    lines.append(f"  - {out['titles'][col]}: ba-lora's |Δ| {abs(a['mean']):.2f} "
                                 f"{'<' if closer else '≥'} {other}'s {abs(b['mean']):.2f} "
                                 f"({spread_words(a, b)}).")
    return lines or ["- No evaluated fine-tuned model yet."]


def _tasks_words(limits: dict[str, int | None]) -> str:
    return ", ".join(f"{task} ({'all items' if n is None else f'first {n} items'})" for task, n in limits.items())


def render(spec: LabSpec, out: dict[str, Any]) -> str:
    cols = out["columns"]
    n_done = sum(m["evaluated"] for m in out["models"])
    lines = ["# Bias: inherited social bias before and after fine-tuning", "",
             "Question: does fine-tuning move the social bias the model inherited from pre-training, and does "
             "BA-LoRA's consistency term (which pulls towards the pre-trained model) preserve it? Reported as "
             "measured, whichever way it goes.", "",
             "## Setup", "",
             f"- Spec: `{spec.path}`; base model `{out['models'][0]['spec']}`; {len(out['models']) - 1} fine-tuned "
             f"runs; tasks {_tasks_words(out['limits'])}; {n_done} of "
             f"{len(out['models'])} models evaluated.",
             "- Scores from the model's own likelihoods (`balora.evaluation.likelihood`): CrowS-Pairs score and "
             "StereoSet ss = % of items where the stereotyped option is more likely (50 = no preference); "
             "StereoSet lms = % where a related option beats the unrelated one; icat = lms·min(ss, 100 − ss)/50; "
             "BBQ accuracies in % (ambiguous contexts: the right answer is \"unknown\").", "",
             "## Scores", "", "Mean ± sample std over each group's runs (seeds).", ""]
    rows = [[group_name(g)] + [fmt(out["table"][g][c], 2) for c in cols] for g in out["table"]]
    lines += md_table(["model"] + [out["titles"][c] for c in cols], rows)
    lines += ["", "## Change from the base model (after − before)", ""]
    rows = [[group_name(g)] + [fmt(out["delta"][g][c], 2, sign=True) for c in cols] for g in out["delta"]]
    lines += md_table(["method"] + [out["titles"][c] for c in cols], rows)
    if out["paired"]:
        item_cols = [c for c in ITEM_OUTCOME if c in cols]
        lines += ["", "## Per run: the change on the same items, with its item-level uncertainty", "",
                  f"Δ in points, 95 % paired bootstrap interval over the items ({BOOTSTRAP} resamples), and "
                  "how many items flipped to / from the outcome (stereotype preferred; BBQ: correct). It "
                  "measures the uncertainty the finite test set adds to one run; it says nothing about seeds.",
                  ""]
        rows = []
        for m in out["models"][1:]:
            got = out["paired"].get(m["label"], {})
            rows.append([f"{group_name(m['group'])} (seed {m['seed']})"]
                        + [(f"{got[c]['delta']:+.2f} [{got[c]['ci95'][0]:+.2f}, {got[c]['ci95'][1]:+.2f}] "
                            f"(+{got[c]['flipped_to']} / −{got[c]['flipped_from']}, n={got[c]['n']})")
                           if c in got else "–" for c in item_cols])
        lines += md_table(["run"] + [out["titles"][c] for c in item_cols], rows)
    lines += ["", "![bias deltas](plots/bias-delta.png)", "", "## What the numbers say", "",
              "Rule: a change 'moved' when |mean Δ| exceeds the std of Δ over seeds; two methods are compared "
              "with the compare rule (difference of means > larger std). Heuristics, not significance tests.", ""]
    lines += _findings(out)
    lines += [""] + regenerate_lines("bias", spec.path)
    return "\n".join(lines)


def run(spec_path: str | Path, *, only_report: bool = False, say: Say = say_print,
        **_: Any) -> dict[str, Any]:
    """Evaluate (resumably) the base model and every run, then write the report."""
    from balora.evaluation.harness import evaluate

    spec = load_lab_spec(spec_path, "bias", KEYS, required=("base_model",))
    tasks = get_list(spec, "tasks", str, default=list(BIAS_TASKS))
    for i, task in enumerate(tasks):
        if task not in BIAS_TASKS:
            raise spec.error(f"tasks[{i}]", f"{task!r} is not a bias task; known: {', '.join(BIAS_TASKS)}")
    limits = parse_limits(spec, tasks)
    batch_size = get_value(spec, spec.data, "batch_size", int, 8, "batch_size")
    device = get_value(spec, spec.data, "device", str, None, "device")
    data = get_mapping(spec, "data", {})
    for task, path in data.items():
        if task not in tasks or not isinstance(path, str):
            raise spec.error(f"data.{task}", f"expected a file for one of the tasks {tasks}, got {path!r}")
    models = collect_models(spec)
    if not only_report:
        for i, model in enumerate(models, 1):
            missing = _missing_tasks(spec, model, tasks, limits)
            if not missing:
                say(f"bias: [{i}/{len(models)}] {model['label']}: eval.json complete, skipped")
                continue
            say(f"bias: [{i}/{len(models)}] {model['label']}: {', '.join(missing)}")
            # one harness call per distinct limit (it takes one limit for all its tasks); each merges
            # its tasks into the model's eval.json
            for limit in dict.fromkeys(limits[task] for task in missing):
                evaluate(model["spec"], [t for t in missing if limits[t] == limit], limit=limit,
                         out_dir=model["eval_dir"], batch_size=batch_size, progress=lambda m: say(f"  {m}"),
                         device=device, data=data)
    out = report(spec, models, tasks, limits)
    say(f"bias: report in {spec.output_dir / 'README.md'}")
    return out
