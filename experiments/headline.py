"""Print the headline tables of the results (Markdown) from the comparisons' summary.json files.

    python experiments/headline.py

The comparisons of the issue-13 protocol: each method at its learning rate selected on the validation
split, ≥ 5 seeds (NLU) / 3 (NLG), paired differences with a t interval over seeds and a bootstrap over test
items, "beats" only when both exclude 0. Every number comes from a `balora compare` summary under
results/<name>/ (and the cells' stored predictions); nothing is typed in by hand. A comparison that has
not finished prints as such.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "results"
METHODS = ["pissa", "ba-lora", "lora", "dora", "lora-reg"]
NAMES = {"pissa": "PiSSA", "ba-lora": "BA-LoRA", "lora": "LoRA", "dora": "DoRA", "lora-reg": "lora-reg"}
NLU = {"nlu-main-rotten-tomatoes": "Rotten Tomatoes", "nlu-main-privacy-policy": "privacy-policy QA"}
NLG = "nlg-privacy-policy"


def load(name: str) -> dict[str, Any] | None:
    """The finished comparison's summary (every cell ok), else None."""
    path = RESULTS / name / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    groups = summary["groups"]
    return summary if groups and all(len(g["ok"]) == len(g["cells"]) for g in groups) else None


def group(summary: dict[str, Any] | None, **grid: Any) -> dict[str, Any] | None:
    for g in (summary or {}).get("groups", []):
        if all(g["grid"].get(k) == v for k, v in grid.items()):
            return g
    return None


def cell(g: dict[str, Any] | None, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    stats = (g["metrics"].get(metric) or g["cost"].get(metric)) if g else None
    if not stats or stats["mean"] is None:
        return "–"
    mean = stats["mean"] * scale
    return f"{mean:.{digits}f}" if stats["std"] is None else f"{mean:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def chosen_rate(summary: dict[str, Any] | None, label: str) -> str:
    choice = ((summary or {}).get("selection") or {}).get("groups", {}).get(label, {}).get("choice", {})
    rate = choice.get("training.learning_rate")
    return f"{rate:g}" if rate is not None else "–"


def majority_share(name: str) -> str:
    """The test split's majority-class share, from a cell's stored predictions."""
    for path in sorted((RESULTS / name / "cells").glob("*/run/predictions/test.json")):
        labels = json.loads(path.read_text())["label"]
        return f"{100 * Counter(labels).most_common(1)[0][1] / len(labels):.1f}"
    return "–"


# paired metrics other than a task's accuracy, as the tables name them
METRIC_NAMES = {"forgetting": "forgetting ↓ (Δ XSum CE, nats)", "eval.piqa.accuracy": "PIQA accuracy"}


def number(value: float, scale: float) -> str:
    """A difference: points (scale 100) to 2 decimals, anything else (nats) to 4."""
    return f"{value * scale:+.2f}" if scale == 100 else f"{value * scale:+.4f}"


def paired_rows(summary: dict[str, Any] | None, task: str) -> list[str]:
    rows = []
    for p in (summary or {}).get("paired", []):
        scale = p.get("scale", 1)
        a, b = (NAMES.get(x.split("=", 1)[-1], x.split("=", 1)[-1]) for x in (p["a"], p["b"]))
        t = p["t_interval"]
        boot = p.get("bootstrap")
        where = f"{task}, {METRIC_NAMES[p['metric']]}" if p.get("metric") in METRIC_NAMES else task
        rows.append(f"| {a} − {b} | {where} | {p['n']} | {number(p['mean'], scale)} | "
                    f"[{number(t[0], scale)}, {number(t[1], scale)}] | "
                    + (f"[{number(boot[0], scale)}, {number(boot[1], scale)}]" if boot else "–")
                    + f" | {p['positive']}/{p['negative']} | {p['verdict']} |")
    return rows


# The paper's headline claims (docs/method.md §8, "The paper's headline numbers"), and the reviewers'
# question whether forgetting is reduced, with the kind of evidence and the pair here that test them
CLAIMS = [
    ("NLU: BA-LoRA beats PiSSA (GLUE average 90.67 vs 89.47)", "nlu", ("ba-lora", "pissa")),
    ("NLU: BA-LoRA beats LoRA (90.67 vs 88.56)", "nlu", ("ba-lora", "lora")),
    ("NLU: PiSSA beats LoRA (89.47 vs 88.56)", "nlu", ("pissa", "lora")),
    ("NLG: BA-LoRA beats PiSSA (GSM8K 55.86 vs 51.48)", "nlg", ("ba-lora", "pissa")),
    ("NLG: BA-LoRA beats LoRA (55.86 vs 42.68)", "nlg", ("ba-lora", "lora")),
    ("NLG: PiSSA beats LoRA (51.48 vs 42.68)", "nlg", ("pissa", "lora")),
    ("NLG: BA-LoRA forgets less than PiSSA (the consistency term's purpose; asked by the reviewers)",
     "forgetting", ("ba-lora", "pissa")),
]
VERDICTS = {"beats": "reproduced", "is beaten by": "contradicted", "inconclusive": "inconclusive"}


def find_pair(summary: dict[str, Any] | None, a: str, b: str, metric: str | None = None) -> dict[str, Any] | None:
    """The summary's paired entry A − B: for ``metric``, or (None) the first one, the task's accuracy."""
    for p in (summary or {}).get("paired", []):
        if p["a"] == f"method={a}" and p["b"] == f"method={b}" and metric in (None, p.get("metric")):
            return p
    return None


def claim_row(claim: str, sources: dict[str, tuple[dict[str, Any] | None, str | None]], pair: tuple[str, str]) -> str:
    """One claim: the evidence per task (task -> its summary and paired metric; mean difference, t interval,
    seeds, verdict) and the overall verdict: reproduced / contradicted only when every task agrees,
    pending while a task is unfinished."""
    evidence, verdicts = [], []
    for task, (summary, metric) in sources.items():
        p = find_pair(summary, *pair, metric)
        if p is None:
            evidence.append(f"{task}: not finished")
            verdicts.append(None)
            continue
        scale, t = p.get("scale", 1), p["t_interval"]
        evidence.append(f"{task} {number(p['mean'], scale)} [{number(t[0], scale)}, {number(t[1], scale)}], "
                        f"{p['n']} seeds: {VERDICTS[p['verdict']]}")
        verdicts.append(VERDICTS[p["verdict"]])
    done = [v for v in verdicts if v is not None]
    if len(done) < len(verdicts):
        overall = "pending" if not done else "pending (so far: " + ", ".join(sorted(set(done))) + ")"
    elif len(set(done)) == 1:
        overall = f"**{done[0]}**" + (" at this scale" if done[0] == "inconclusive" else "")
    else:
        overall = "mixed: " + ", ".join(sorted(set(done)))
    return f"| {claim} | {'; '.join(evidence)} | {overall} |"


IMBALANCE = RESULTS / "lab" / "imbalance-selected"
NOISE = RESULTS / "lab" / "noise-selected"
LAB_CLAIMS = [  # (claim, pair): the recall of the class made rare, per imbalanced ratio
    ("Imbalance: BA-LoRA keeps more of the rare class than PiSSA (imbalanced MNLI, minority recall 61.7 vs 26.4)",
     ("ba-lora", "pissa")),
    ("Imbalance: BA-LoRA keeps more of the rare class than LoRA (61.7 vs 5.8)", ("ba-lora", "lora")),
]


def load_lab(path: Path) -> dict[str, Any] | None:
    """A finished lab experiment's results.json (every cell ok), else None."""
    results = path / "results.json"
    if not results.is_file():
        return None
    out = json.loads(results.read_text())
    tasks = out.get("tasks")
    if tasks is not None:  # imbalance
        return out if tasks and all(t["cells_ok"] == t["cells_expected"] for t in tasks.values()) else None
    cells = [c for level in out.get("cells", {}).values() for c in level]  # noise
    expected = len(out.get("noise_levels", [])) * len(out.get("methods", [])) * len(out.get("seeds", []))
    return out if cells and len(cells) == expected and all(c["status"] == "ok" for c in cells) else None


def imbalance_sources(results: dict[str, Any] | None) -> dict[str, tuple[dict[str, Any] | None, str | None]]:
    """Per imbalanced ratio, a summary-like {"paired": [...]} of the rare-class recall pairs (A, B by method)."""
    if results is None:
        return {"imbalance probe": (None, None)}
    out = {}
    for task in results["tasks"].values():
        for e in task["paired"]:
            if e["metric"] != "test.rare_class.recall":
                continue
            a, b = (dict(part.split("=", 1) for part in e[side].split(", ")) for side in ("a", "b"))
            ratio = next(v for k, v in a.items() if k != "method")
            if ratio.replace(" ", "") in ("1:1", "1"):
                continue  # nothing is rare
            entry = {**e, "a": f"method={a['method']}", "b": f"method={b['method']}"}
            out.setdefault(f"rare-class recall at {ratio}", ({"paired": []}, None))[0]["paired"].append(entry)
    return out


def noise_growth_row(results: dict[str, Any] | None) -> str:
    """The paper's noise claim: the gain of A over B (per seed) at the noisiest level minus at the cleanest,
    with a 95 % t interval over seeds; reproduced only when it lies above 0."""
    claim = "Noise: BA-LoRA's gain over PiSSA grows with pre-training noise (T5 vs RoBERTa: +1.11 → +3.26 GLUE)"
    if results is None:
        return f"| {claim} | noise probe: not finished | pending |"
    from balora.experiments.paired import paired_seed_differences  # the same t interval as the summaries

    levels = list(results["gain"]["by_level"])
    gains = {lvl: dict(zip(results["gain"]["by_level"][lvl]["seeds"], results["gain"]["by_level"][lvl]["values"]))
             for lvl in levels}
    d = paired_seed_differences(gains[levels[-1]], gains[levels[0]])
    if d["t_low"] is None:
        return f"| {claim} | fewer than 2 seeds | pending |"
    verdict = ("reproduced" if d["t_low"] > 0 else "contradicted" if d["t_high"] < 0 else "inconclusive")
    each = "; ".join(f"{lvl}: {100 * results['gain']['by_level'][lvl]['mean']:+.2f}" for lvl in levels)
    return (f"| {claim} | gain by level {each}; {levels[-1]} − {levels[0]}: {100 * d['mean']:+.2f} "
            f"[{100 * d['t_low']:+.2f}, {100 * d['t_high']:+.2f}], {d['n']} seeds | **{verdict}**"
            + (" at this scale" if verdict == "inconclusive" else "") + " |")


def status(name: str) -> str:
    return f"not finished yet (spec `experiments/{name}.yaml`; results are committed when every cell is done)"


def main() -> int:
    out = sys.stdout.write
    nlu = {name: load(name) for name in NLU}
    nlg = load(NLG)

    out("#### NLU: MiniLM-L6, r = 8, each method at its selected rate; test accuracy / MCC %, mean ± std over "
        "5 seeds\n\n")
    head = " | ".join(f"{task} lr | {task} acc | MCC" for task in NLU.values())
    out(f"| method | {head} |\n|---|{'---|---|---|' * len(NLU)}\n")
    for m in METHODS:
        parts = []
        for name in NLU:
            g = group(nlu[name], method=m)
            parts.append(f"{chosen_rate(nlu[name], f'method={m}')} | {cell(g, 'test.accuracy')} | "
                         f"{cell(g, 'test.mcc')}")
        out(f"| {NAMES[m]} | {' | '.join(parts)} |\n")
    out("| *majority class* | " + " | ".join(f"– | {majority_share(n)} | –" for n in NLU) + " |\n\n")
    for name, task in NLU.items():
        if nlu[name] is None:
            out(f"{task}: {status(name)}.\n\n")

    out("#### NLG: SmolLM2-135M-Instruct answering privacy-policy QA as yes / no (3 seeds)\n\n")
    if nlg is None:
        out(f"{status(NLG)}.\n\n")
    else:
        untuned = RESULTS / NLG / "untuned" / "eval.json"
        base = json.loads(untuned.read_text()) if untuned.is_file() else {}
        out("| method | lr | held-out acc % | forgetting (Δ XSum CE, nats) ↓ | PIQA acc % |\n|---|---|---|---|---|\n")
        for m in ("pissa", "ba-lora", "lora"):
            g = group(nlg, method=m)
            out(f"| {NAMES[m]} | {chosen_rate(nlg, f'method={m}')} | {cell(g, 'eval.privacy_policy.accuracy')} | "
                f"{cell(g, 'forgetting', 1, 4)} | {cell(g, 'eval.piqa.accuracy')} |\n")
        tasks = base.get("tasks", {})  # balora eval's eval.json: task -> {"metrics": {...}}
        acc = ((tasks.get("privacy_policy") or {}).get("metrics") or {}).get("accuracy")
        piqa = ((tasks.get("piqa") or {}).get("metrics") or {}).get("accuracy")
        out(f"| *untuned* | – | {acc * 100:.1f} | 0 | {piqa * 100:.1f} |\n\n" if acc is not None and piqa is not None
            else "\n")

    rows = [r for name, task in NLU.items() for r in paired_rows(nlu[name], task)]
    rows += paired_rows(nlg, "NLG privacy-policy")
    if rows:
        out("#### Paired differences (A − B per seed, points) and verdicts\n\n"
            "Rule, stated before the runs: A beats B only when both 95 % intervals (t over seeds; bootstrap "
            "over test items) exclude 0.\n\n"
            "| A − B | task | seeds | mean Δ | 95 % t | 95 % items | seeds +/− | verdict |\n"
            "|---|---|---|---|---|---|---|---|\n")
        out("\n".join(rows) + "\n\n")
    out("#### The paper's claims at this scale\n\n"
        "Each claim against the paired differences above (points of accuracy, or nats of XSum cross-entropy; 95 % t "
        "interval over seeds); "
        "reproduced / contradicted only when every task's verdict says so.\n\n"
        "| the paper's claim | here (A − B, 95 % t) | verdict |\n|---|---|---|\n")
    for claim, kind, pair in CLAIMS:
        sources = ({task: (nlu[name], None) for name, task in NLU.items()} if kind == "nlu"
                   else {"privacy-policy QA as words": (nlg, None)} if kind == "nlg"
                   else {"XSum CE (nats)": (nlg, "forgetting"), "PIQA": (nlg, "eval.piqa.accuracy")})
        out(claim_row(claim, sources, pair) + "\n")
    imbalance = load_lab(IMBALANCE)
    for claim, pair in LAB_CLAIMS:
        out(claim_row(claim, imbalance_sources(imbalance), pair) + "\n")
    out(noise_growth_row(load_lab(NOISE)) + "\n")
    out("\n")
    finished = [s for s in (*nlu.values(), nlg) if s is not None]
    hours = sum(s["compute_seconds"] or 0 for s in finished) / 3600
    search = sum((s.get("selection") or {}).get("compute_seconds") or 0 for s in finished) / 3600
    out(f"Compute of the finished comparisons (cell wall time, one CPU thread each): {hours:.2f} h for the final "
        f"cells, plus {search:.2f} h for the model selection.\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
