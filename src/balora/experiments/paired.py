"""Paired statistics for `balora compare`: two groups compared seed by seed, and item by item.

Cells with the same seed share the data order, the head initialisation and the adapter init, so the
difference of a metric between two groups (A − B) is taken per seed, and its spread over seeds is
what decides, not the spread of each group on its own:

* the **t interval**: mean ± t₀.₉₇₅,ₙ₋₁ · sd / √n over the n seeds both groups have (sd with n − 1;
  none below 2 seeds);
* the **paired bootstrap over test items**: per-item scores (1/0 correct, or any per-item score) of
  the same test items for every common seed; each replicate draws item indices once (with
  replacement) and applies them to every seed, and its statistic is the mean over seeds of
  (mean_A − mean_B) on the drawn items; the interval is the 2.5 / 97.5 percentiles of the replicates.

`VERDICT_RULE` turns the two intervals into "beats" / "is beaten by" / "inconclusive"; without
per-item scores the t interval decides alone (``bootstrap: null`` and a note say so).

Per-item scores (`item_scores`) come from a cell's run directory: ``test.accuracy`` and
``untuned.accuracy`` from ``predictions/test.json`` / ``predictions/untuned.json`` (NLU: correct =
label == predicted), ``eval.<task>.accuracy`` from ``eval/records/<task>.jsonl`` (the evaluation
harness: a record's ``correct``; several samples of one item, same ``index``, are averaged).

Which groups are compared (`resolve_pairs`): the spec's ``paired.pairs`` (group labels, or values of
one grid axis, matched on every other non-seed axis), else each other value of the variant (or
method) axis against ``paired.reference``, else `DEFAULT_METHOD_PAIRS` among the methods present.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_BOOTSTRAP", "DEFAULT_METHOD_PAIRS", "LOWER_IS_BETTER_NOTE", "VERDICT_RULE", "NoItemScores",
           "compare_pair", "item_scores", "paired_item_bootstrap", "paired_items", "paired_seed_differences",
           "percent_points", "resolve_pairs", "t_quantile", "verdict"]

VERDICT_RULE = ("A beats B only when both 95 % intervals (t over seeds, paired bootstrap over test items) exclude 0 "
                "on the positive side; 'is beaten by' when both exclude it on the negative side; otherwise "
                "inconclusive.")
LOWER_IS_BETTER_NOTE = ("For a lower-is-better metric (↓) the sides swap: A beats B when both intervals lie below 0. "
                        "Without per-item scores (bootstrap –) the t interval decides alone.")
DEFAULT_METHOD_PAIRS = (("ba-lora", "pissa"), ("ba-lora", "lora"), ("pissa", "lora"))
DEFAULT_BOOTSTRAP = 2000
ACCURACY_LIKE = ("accuracy", "f1", "macro_f1", "precision", "recall", "auroc")
_INDEX_CHUNK = 2**22  # bootstrap indices drawn per chunk (32 MB of int64), whatever the test set's size

Seed = Hashable


class NoItemScores(Exception):
    """A run has no per-item scores for a metric (the message says why)."""


# ---------------------------------------------------------------------------- the t interval
def _t_abs_cdf(x: float, df: int) -> float:
    """P(|T| ≤ x) for Student's t with an integer ``df`` (Abramowitz & Stegun 26.7.3 / 26.7.4)."""
    theta = math.atan(x / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/π)(θ + sinθ (cosθ + 2/3 cos³θ + ... + (2·4···(ν−3))/(1·3···(ν−2)) cos^(ν−2)θ))
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0  # even: sinθ (1 + 1/2 cos²θ + ... + (1·3···(ν−3))/(2·4···(ν−2)) cos^(ν−2)θ)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def _t_quantile_closed_form(p: float, df: int) -> float:
    target = 2 * p - 1  # P(|T| ≤ q) for the upper quantile q
    low, high = 0.0, 1.0
    while _t_abs_cdf(high, df) < target:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if _t_abs_cdf(mid, df) < target else (low, mid)
    return (low + high) / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: expected 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    try:  # scipy comes with the [report] extra (scikit-learn); without it, the integer-df closed form
        from scipy.stats import t
    except ImportError:
        return _t_quantile_closed_form(p, int(df))
    return float(t.ppf(p, df))


def paired_seed_differences(a: Mapping[Seed, float | None], b: Mapping[Seed, float | None]) -> dict[str, Any]:
    """A − B per common seed (seeds where both have a finite value, in ``a``'s order): ``{"n", "diffs"
    (seed -> difference), "mean", "t_low", "t_high" (95 % t interval; None below 2 seeds), "positive",
    "negative" (how many seeds have a difference > 0, < 0)}``; ``mean`` is None without a common seed."""
    def finite(x: float | None) -> bool:
        return x is not None and math.isfinite(float(x))

    diffs = {s: float(a[s]) - float(b[s]) for s in a if s in b and finite(a[s]) and finite(b[s])}
    values = np.array(list(diffs.values()), dtype=float)
    n = len(values)
    mean = float(values.mean()) if n else None
    low = high = None
    if n >= 2:
        half = t_quantile(0.975, n - 1) * float(values.std(ddof=1)) / math.sqrt(n)
        low, high = mean - half, mean + half
    return {"n": n, "diffs": diffs, "mean": mean, "t_low": low, "t_high": high,
            "positive": int((values > 0).sum()), "negative": int((values < 0).sum())}


# ---------------------------------------------------------------------------- the item bootstrap
def paired_item_bootstrap(a_items: Mapping[Seed, Any], b_items: Mapping[Seed, Any], *,
                          samples: int = DEFAULT_BOOTSTRAP, rng_seed: int = 0) -> tuple[float, float]:
    """The 95 % paired bootstrap interval (2.5 / 97.5 percentiles) of the mean over seeds of
    (mean_A − mean_B), the test items resampled once per replicate for every common seed.

    ``a_items[seed]``, ``b_items[seed]``: per-item scores of the same test items (equal lengths, for
    every seed). Replicate r draws ``numpy.random.default_rng(rng_seed).integers(0, n_items, n_items)``
    (the r-th such draw of one generator)."""
    seeds = [s for s in a_items if s in b_items]
    if not seeds:
        raise ValueError("paired_item_bootstrap: no seed in common")
    if samples < 1:
        raise ValueError(f"paired_item_bootstrap: samples must be >= 1, got {samples}")
    diffs = []
    for s in seeds:
        x, y = np.asarray(a_items[s], dtype=float), np.asarray(b_items[s], dtype=float)
        if x.ndim != 1 or x.shape != y.shape or not len(x):
            raise ValueError(f"paired_item_bootstrap: seed {s}: {x.shape} vs {y.shape} item scores")
        diffs.append(x - y)
    if len({len(d) for d in diffs}) > 1:
        raise ValueError(f"paired_item_bootstrap: different numbers of items across seeds "
                         f"({', '.join(f'{s}: {len(d)}' for s, d in zip(seeds, diffs))})")
    # mean over seeds of the resampled means = the resampled mean of the per-item mean over seeds
    per_item = np.mean(diffs, axis=0)
    n = len(per_item)
    rng = np.random.default_rng(rng_seed)
    replicates = np.empty(samples)
    rows = max(1, _INDEX_CHUNK // n)
    for start in range(0, samples, rows):
        k = min(rows, samples - start)
        replicates[start:start + k] = per_item[rng.integers(0, n, size=(k, n))].mean(axis=1)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return float(low), float(high)


# ---------------------------------------------------------------------------- the verdict
def verdict(t_interval: Sequence[float] | None, bootstrap_interval: Sequence[float] | None, *,
            lower_is_better: bool = False) -> str:
    """"beats" | "is beaten by" | "inconclusive" by `VERDICT_RULE`; ``bootstrap_interval`` None: the t
    interval alone; ``t_interval`` None (fewer than 2 seeds): inconclusive."""
    if t_interval is None or any(x is None for x in t_interval):
        return "inconclusive"
    intervals = [t_interval] + ([bootstrap_interval] if bootstrap_interval is not None else [])
    above = all(low > 0 for low, _ in intervals)
    below = all(high < 0 for _, high in intervals)
    if lower_is_better:
        above, below = below, above
    return "beats" if above else "is beaten by" if below else "inconclusive"


# ---------------------------------------------------------------------------- per-item scores
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise NoItemScores(f"{path}: {error}") from None


def item_scores(run_dir: str | Path, metric: str) -> tuple[np.ndarray, list[Any]]:
    """One run's per-item scores of ``metric`` and each item's identity (NLU: its true label; harness
    records: (index, gold)), to check that two runs scored the same items. Raises `NoItemScores`."""
    run_dir = Path(run_dir)
    parts = metric.split(".")
    if len(parts) == 2 and parts[0] in ("test", "untuned") and parts[1] == "accuracy":
        path = run_dir / "predictions" / f"{parts[0]}.json"
        if not path.is_file():
            raise NoItemScores(f"no {path}")
        data = _read_json(path)
        labels, predicted = data.get("label"), data.get("predicted")
        if not isinstance(labels, list) or not isinstance(predicted, list) or len(labels) != len(predicted):
            raise NoItemScores(f"{path}: expected lists 'label' and 'predicted' of one length")
        return np.array([t == p for t, p in zip(labels, predicted)], dtype=float), labels
    if len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy":
        path = run_dir / "eval" / "records" / f"{parts[1]}.jsonl"
        if not path.is_file():
            raise NoItemScores(f"no {path}")
        try:
            records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as error:
            raise NoItemScores(f"{path}: {error}") from None
        if not records or any(not isinstance(r, dict) or "correct" not in r for r in records):
            raise NoItemScores(f"{path}: no per-item 'correct' field")
        scores: dict[Any, list[float]] = {}
        gold: dict[Any, Any] = {}
        for position, record in enumerate(records):  # several samples of one item share its index
            index = record.get("index", position)
            scores.setdefault(index, []).append(float(bool(record["correct"])))
            gold.setdefault(index, record.get("gold"))
        return (np.array([sum(v) / len(v) for v in scores.values()], dtype=float),
                [[i, gold[i]] for i in scores])
    raise NoItemScores(f"{metric}: per-item scores exist for test.accuracy, untuned.accuracy and "
                       "eval.<task>.accuracy only")


def paired_items(a_dirs: Mapping[Seed, str | Path], b_dirs: Mapping[Seed, str | Path],
                 metric: str) -> tuple[dict[Seed, np.ndarray], dict[Seed, np.ndarray]]:
    """Per-item scores of both groups' runs for every common seed (run directories by seed), checked
    to be the same items in the same order and as many for every seed. Raises `NoItemScores`."""
    a_items: dict[Seed, np.ndarray] = {}
    b_items: dict[Seed, np.ndarray] = {}
    for seed in [s for s in a_dirs if s in b_dirs]:
        a_items[seed], a_ids = item_scores(a_dirs[seed], metric)
        b_items[seed], b_ids = item_scores(b_dirs[seed], metric)
        if a_ids != b_ids:
            raise NoItemScores(f"seed {seed}: the two runs scored different test items "
                               f"({len(a_ids)} vs {len(b_ids)} items, or not in the same order)")
    if not a_items:
        raise NoItemScores("no seed in common")
    if len({len(x) for x in a_items.values()}) > 1:
        raise NoItemScores("the seeds scored different numbers of test items")
    return a_items, b_items


# ---------------------------------------------------------------------------- one pair
def percent_points(metric: str, values: Sequence[float]) -> bool:
    """Whether differences of ``metric`` read as points (×100): an accuracy-like name, values in [0, 1]."""
    name = metric.rsplit(".", 1)[-1]
    like = name in ACCURACY_LIKE or name.endswith("_accuracy")
    return like and all(0 <= v <= 1 for v in values)


def compare_pair(a_values: Mapping[Seed, float | None], b_values: Mapping[Seed, float | None], *, metric: str,
                 a_dirs: Mapping[Seed, str | Path] | None = None, b_dirs: Mapping[Seed, str | Path] | None = None,
                 samples: int = DEFAULT_BOOTSTRAP, lower_is_better: bool = False,
                 rng_seed: int = 0) -> dict[str, Any]:
    """One pair's paired statistics, as summary.json records them: metric values and run directories
    by seed for A and B (``samples``: bootstrap replicates, 0 = the t interval only)."""
    d = paired_seed_differences(a_values, b_values)
    t_interval = [d["t_low"], d["t_high"]] if d["t_low"] is not None else None
    bootstrap, note, items = None, None, None
    if samples <= 0:
        note = "bootstrap: 0 in the spec (t interval only)"
    elif not d["n"]:
        note = "no seed with a value on both sides"
    elif a_dirs is None or b_dirs is None:
        note = "no run directories"
    else:
        seeds = list(d["diffs"])
        try:
            a_items, b_items = paired_items({s: a_dirs[s] for s in seeds}, {s: b_dirs[s] for s in seeds}, metric)
            bootstrap = list(paired_item_bootstrap(a_items, b_items, samples=samples, rng_seed=rng_seed))
            items = len(next(iter(a_items.values())))
        except NoItemScores as error:
            note = f"no per-item scores: {error}"
    values = [float(v) for v in (*a_values.values(), *b_values.values()) if v is not None and math.isfinite(v)]
    return {"metric": metric, "lower_is_better": lower_is_better, "n": d["n"],
            "diffs": {str(s): v for s, v in d["diffs"].items()}, "mean": d["mean"], "t_interval": t_interval,
            "bootstrap": bootstrap, "bootstrap_samples": samples if bootstrap is not None else 0,
            "bootstrap_items": items, "bootstrap_note": note, "positive": d["positive"], "negative": d["negative"],
            "verdict": verdict(t_interval, bootstrap, lower_is_better=lower_is_better),
            "scale": 100 if percent_points(metric, values) else 1}


# ---------------------------------------------------------------------------- which pairs
def _assignment(name: str, groups: Mapping[str, Mapping[str, str]]) -> dict[str, str] | None:
    """The grid values a name fixes: a group label (all of them), or ``key=value`` / bare values of
    single axes joined by ", "; None when it names nothing (or a bare value of several axes)."""
    if name in groups:
        return dict(groups[name])
    axes: dict[str, list[str]] = {}
    for values in groups.values():
        for key, value in values.items():
            axes.setdefault(key, [])
            if value not in axes[key]:
                axes[key].append(value)
    fixed: dict[str, str] = {}
    for part in name.split(", "):
        key, _, value = part.partition("=")
        if key in axes and value in axes[key]:
            fixed[key] = value
            continue
        owners = [k for k, vs in axes.items() if part in vs]
        if len(owners) != 1 or owners[0] in fixed:
            return None
        fixed[owners[0]] = part
    return fixed


def _matches(values: Mapping[str, str], fixed: Mapping[str, str]) -> bool:
    return all(values.get(k) == v for k, v in fixed.items())


def _match(a: dict[str, str], b: dict[str, str], groups: Mapping[str, Mapping[str, str]]) -> list[tuple[str, str]]:
    """(A group, B group) for every A group and the B group that agrees with it on every other axis."""
    out = []
    for label_a, values_a in groups.items():
        if not _matches(values_a, a):
            continue
        rest = {k: v for k, v in values_a.items() if k not in a}
        out += [(label_a, label_b) for label_b, values_b in groups.items()
                if _matches(values_b, b) and _matches(values_b, rest)]
    return out


def _axis_values(groups: Mapping[str, Mapping[str, str]], axis: str) -> list[str]:
    return list(dict.fromkeys(v[axis] for v in groups.values() if axis in v))


def resolve_pairs(pairs: Sequence[Sequence[str]] | None, groups: Mapping[str, Mapping[str, str]], *,
                  reference: str | None = None, variant_axis: str = "variant",
                  method_axis: str = "method") -> list[tuple[str, str]]:
    """The (A, B) group labels to compare. ``groups``: label -> its non-seed grid values as text.

    ``pairs``: names as in the spec (a group label, or values of grid axes, e.g. ``ba-lora``); a pair
    fixes the same axes on both sides and is matched on every other axis (one (A, B) per task...).
    ``pairs`` None: each other value of the variant axis (else the method axis) against ``reference``;
    without a reference, `DEFAULT_METHOD_PAIRS` among the methods of the method axis. ValueError
    (``pairs[i]: ...`` / ``reference: ...``) for a name that matches no group."""
    known = "; ".join(groups)
    if pairs is None:
        if reference is not None:
            axis = variant_axis if _axis_values(groups, variant_axis) else method_axis
            values = _axis_values(groups, axis)
            if not values:
                raise ValueError(f"reference: {reference!r} needs variants or a {method_axis!r} grid axis")
            if reference not in values:
                raise ValueError(f"reference: {reference!r} is not one of the {axis}s: {', '.join(values)}")
            named = [({axis: v}, {axis: reference}) for v in values if v != reference]
        else:
            methods = _axis_values(groups, method_axis)
            named = [({method_axis: a}, {method_axis: b}) for a, b in DEFAULT_METHOD_PAIRS
                     if a in methods and b in methods]
    else:
        named = []
        for i, pair in enumerate(pairs):
            if len(pair) != 2:
                raise ValueError(f"pairs[{i}]: expected [A, B], got {list(pair)!r}")
            sides = [_assignment(str(name), groups) for name in pair]
            for name, side in zip(pair, sides):
                if side is None:
                    raise ValueError(f"pairs[{i}]: {name!r} names no group (nor a value of one grid axis); "
                                     f"known groups: {known}")
            a, b = sides
            if set(a) != set(b):
                raise ValueError(f"pairs[{i}]: {pair[0]!r} and {pair[1]!r} set different grid keys "
                                 f"({', '.join(a)} vs {', '.join(b)}); name two values of the same keys")
            if a == b:
                raise ValueError(f"pairs[{i}]: {pair[0]!r} and {pair[1]!r} are the same group")
            named.append((a, b))
    resolved: list[tuple[str, str]] = []
    for a, b in named:
        resolved += [p for p in _match(a, b, groups) if p not in resolved]
    return resolved
