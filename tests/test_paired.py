"""Paired statistics of `balora compare` (`balora.experiments.paired`) against naive loop
implementations: the t interval over seeds, the item bootstrap with the same random draws, the
verdict rule, per-item scores from run directories, and which groups a ``paired:`` block compares."""

import json
import math
import time

import numpy as np
import pytest
from scipy.stats import t as student_t

from balora.experiments import paired as P


# ---------------------------------------------------------------- naive references
def naive_t_interval(a: dict, b: dict):
    diffs = [a[s] - b[s] for s in a if s in b]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = student_t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def naive_bootstrap(a_items: dict, b_items: dict, samples: int, rng_seed: int = 0):
    seeds = [s for s in a_items if s in b_items]
    n_items = len(a_items[seeds[0]])
    rng = np.random.default_rng(rng_seed)
    stats = []
    for _ in range(samples):
        idx = rng.integers(0, n_items, size=n_items)  # one draw of item indices for every seed
        per_seed = []
        for s in seeds:
            mean_a = sum(a_items[s][i] for i in idx) / n_items
            mean_b = sum(b_items[s][i] for i in idx) / n_items
            per_seed.append(mean_a - mean_b)
        stats.append(sum(per_seed) / len(per_seed))
    stats.sort()

    def percentile(q):  # numpy's default (linear) definition
        pos = (len(stats) - 1) * q / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(stats) - 1)
        return stats[lo] + (stats[hi] - stats[lo]) * (pos - lo)

    return percentile(2.5), percentile(97.5)


def items(p: float, n: int, rng) -> np.ndarray:
    return (rng.random(n) < p).astype(float)


# ---------------------------------------------------------------- the t interval
def test_seed_differences_match_a_naive_t_interval():
    a = {1: 0.81, 2: 0.79, 3: 0.84, 4: 0.80, 5: 0.83}
    b = {1: 0.78, 2: 0.80, 3: 0.80, 4: 0.77, 5: 0.79, 6: 0.9}  # seed 6: only B has it
    d = P.paired_seed_differences(a, b)
    mean, (low, high) = naive_t_interval(a, b)
    assert d["n"] == 5 and list(d["diffs"]) == [1, 2, 3, 4, 5]
    assert d["diffs"][2] == pytest.approx(-0.01)
    assert d["mean"] == pytest.approx(mean) and d["t_low"] == pytest.approx(low) and d["t_high"] == pytest.approx(high)
    assert (d["positive"], d["negative"]) == (4, 1)


def test_t_quantile_closed_form_matches_scipy():
    for df in range(1, 40):
        assert P._t_quantile_closed_form(0.975, df) == pytest.approx(student_t.ppf(0.975, df), rel=1e-10)
    assert P.t_quantile(0.975, 4) == pytest.approx(2.7764451051977987)


def test_one_seed_has_no_t_interval_and_is_inconclusive():
    d = P.paired_seed_differences({1: 0.9}, {1: 0.5})
    assert d["n"] == 1 and d["mean"] == pytest.approx(0.4) and d["t_low"] is None and d["t_high"] is None
    assert P.verdict(None, (0.3, 0.5)) == "inconclusive"
    entry = P.compare_pair({1: 0.9}, {1: 0.5}, metric="test.accuracy", samples=0)
    assert entry["t_interval"] is None and entry["verdict"] == "inconclusive" and entry["bootstrap"] is None
    assert P.paired_seed_differences({1: 0.9}, {2: 0.5})["mean"] is None  # no common seed


# ---------------------------------------------------------------- the item bootstrap
def test_item_bootstrap_matches_a_naive_loop_with_the_same_draws():
    rng = np.random.default_rng(7)
    a = {s: items(0.75, 60, rng) for s in (1, 2, 3)}
    b = {s: items(0.70, 60, rng) for s in (1, 2, 3)}
    got = P.paired_item_bootstrap(a, b, samples=300, rng_seed=5)
    assert got == pytest.approx(naive_bootstrap(a, b, 300, rng_seed=5), abs=1e-12)
    assert got != P.paired_item_bootstrap(a, b, samples=300, rng_seed=6)


def test_item_bootstrap_draws_in_chunks_like_one_draw_per_replicate(monkeypatch):
    rng = np.random.default_rng(8)
    a = {s: rng.random(50) for s in (1, 2)}  # any per-item score, not only 0/1
    b = {s: rng.random(50) for s in (1, 2)}
    whole = P.paired_item_bootstrap(a, b, samples=101)
    monkeypatch.setattr(P, "_INDEX_CHUNK", 50 * 7)  # 7 replicates per chunk
    assert P.paired_item_bootstrap(a, b, samples=101) == pytest.approx(whole, abs=1e-15)
    assert whole == pytest.approx(naive_bootstrap(a, b, 101), abs=1e-12)


def test_item_bootstrap_is_fast_enough():
    rng = np.random.default_rng(0)
    a = {s: items(0.8, 1275, rng) for s in range(5)}
    b = {s: items(0.78, 1275, rng) for s in range(5)}
    P.paired_item_bootstrap(a, b, samples=10)
    started = time.perf_counter()
    low, high = P.paired_item_bootstrap(a, b, samples=2000)
    assert time.perf_counter() - started < 1.0
    assert low < high


def test_item_bootstrap_errors():
    with pytest.raises(ValueError, match="no seed in common"):
        P.paired_item_bootstrap({1: [1.0]}, {2: [1.0]})
    with pytest.raises(ValueError, match="seed 1"):
        P.paired_item_bootstrap({1: [1.0, 0.0]}, {1: [1.0]})
    with pytest.raises(ValueError, match="different numbers of items across seeds"):
        P.paired_item_bootstrap({1: [1.0, 0.0], 2: [1.0]}, {1: [1.0, 1.0], 2: [0.0]})


# ---------------------------------------------------------------- the verdict
def test_identical_methods_are_inconclusive():
    rng = np.random.default_rng(1)
    same = {s: items(0.8, 200, rng) for s in (1, 2, 3)}
    values = {s: float(x.mean()) for s, x in same.items()}
    d = P.paired_seed_differences(values, dict(values))
    assert d["mean"] == 0 and d["t_low"] == 0 and d["t_high"] == 0 and d["positive"] == d["negative"] == 0
    boot = P.paired_item_bootstrap(same, same, samples=200)
    assert boot == (0.0, 0.0)
    assert P.verdict((d["t_low"], d["t_high"]), boot) == "inconclusive"


def test_a_clear_win_beats_and_the_rule_needs_both_intervals():
    rng = np.random.default_rng(2)
    a = {s: items(0.9, 500, rng) for s in (1, 2, 3, 4)}
    b = {s: items(0.6, 500, rng) for s in (1, 2, 3, 4)}
    d = P.paired_seed_differences({s: x.mean() for s, x in a.items()}, {s: x.mean() for s, x in b.items()})
    t_interval = (d["t_low"], d["t_high"])
    boot = P.paired_item_bootstrap(a, b, samples=500)
    assert t_interval[0] > 0 and boot[0] > 0
    assert P.verdict(t_interval, boot) == "beats"
    assert P.verdict((-boot[1], -boot[0]), (-t_interval[1], -t_interval[0])) == "is beaten by"
    assert P.verdict((0.01, 0.03), (-0.001, 0.02)) == "inconclusive"  # the bootstrap touches 0
    assert P.verdict((0.01, 0.03), None) == "beats"  # no per-item scores: the t interval alone
    assert P.verdict((0.01, 0.03), (0.01, 0.02), lower_is_better=True) == "is beaten by"
    assert P.verdict((-0.03, -0.01), (-0.02, -0.01), lower_is_better=True) == "beats"
    assert P.VERDICT_RULE == ("A beats B only when both 95 % intervals (t over seeds, paired bootstrap over test "
                              "items) exclude 0 on the positive side; 'is beaten by' when both exclude it on the "
                              "negative side; otherwise inconclusive.")


# ---------------------------------------------------------------- per-item scores from run directories
def write_predictions(run, label, predicted, split="test"):
    (run / "predictions").mkdir(parents=True, exist_ok=True)
    (run / "predictions" / f"{split}.json").write_text(json.dumps(
        {"labels": ["neg", "pos"], "label": label, "predicted": predicted, "logits": [[0.0, 1.0]] * len(label)}))


def test_item_scores_from_predictions_and_harness_records(tmp_path):
    run = tmp_path / "run"
    write_predictions(run, ["pos", "neg", "pos"], ["pos", "pos", "pos"])
    scores, ids = P.item_scores(run, "test.accuracy")
    assert scores.tolist() == [1.0, 0.0, 1.0] and ids == ["pos", "neg", "pos"]
    with pytest.raises(P.NoItemScores, match="untuned.json"):
        P.item_scores(run, "untuned.accuracy")
    with pytest.raises(P.NoItemScores, match="test.accuracy, untuned.accuracy and eval.<task>.accuracy only"):
        P.item_scores(run, "test.mcc")

    records = run / "eval" / "records"
    records.mkdir(parents=True)
    rows = [{"index": 0, "sample": 0, "gold": "3", "correct": True}, {"index": 0, "sample": 1, "gold": "3",
                                                                      "correct": False},
            {"index": 1, "sample": 0, "gold": "5", "correct": True}, {"index": 1, "sample": 1, "gold": "5",
                                                                      "correct": True}]
    (records / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores, ids = P.item_scores(run, "eval.gsm8k.accuracy")  # samples of one item averaged
    assert scores.tolist() == [0.5, 1.0] and ids == [[0, "3"], [1, "5"]]
    (records / "forgetting.jsonl").write_text(json.dumps({"doc": 1, "ce": 2.0}) + "\n")
    with pytest.raises(P.NoItemScores, match="no per-item 'correct'"):
        P.item_scores(run, "eval.forgetting.accuracy")


def test_compare_pair_bootstraps_from_run_dirs_and_says_when_it_cannot(tmp_path):
    rng = np.random.default_rng(3)
    labels = ["pos" if x else "neg" for x in rng.random(400) < 0.5]
    flip = {"pos": "neg", "neg": "pos"}
    a_dirs, b_dirs, a_vals, b_vals, a_items, b_items = {}, {}, {}, {}, {}, {}
    for seed, (pa, pb) in {1: (0.9, 0.7), 2: (0.88, 0.72), 3: (0.91, 0.69)}.items():
        for side, p, dirs, vals, its in (("a", pa, a_dirs, a_vals, a_items), ("b", pb, b_dirs, b_vals, b_items)):
            right = rng.random(400) < p
            run = tmp_path / f"{side}{seed}"
            write_predictions(run, labels, [lab if ok else flip[lab] for lab, ok in zip(labels, right)])
            dirs[seed], vals[seed], its[seed] = run, float(right.mean()), right.astype(float)
    entry = P.compare_pair(a_vals, b_vals, metric="test.accuracy", a_dirs=a_dirs, b_dirs=b_dirs, samples=400)
    assert entry["bootstrap"] == pytest.approx(list(naive_bootstrap(a_items, b_items, 400)), abs=1e-12)
    assert entry["verdict"] == "beats" and entry["scale"] == 100 and entry["bootstrap_items"] == 400
    assert entry["n"] == 3 and entry["positive"] == 3 and entry["bootstrap_note"] is None

    write_predictions(b_dirs[2], labels[::-1], labels[::-1])  # other items: no bootstrap, the t interval alone
    entry = P.compare_pair(a_vals, b_vals, metric="test.accuracy", a_dirs=a_dirs, b_dirs=b_dirs, samples=400)
    assert entry["bootstrap"] is None and "seed 2: the two runs scored different test items" in entry["bootstrap_note"]
    assert entry["verdict"] == "beats"  # by the t interval alone
    entry = P.compare_pair(a_vals, b_vals, metric="test.mcc", a_dirs=a_dirs, b_dirs=b_dirs)
    assert entry["bootstrap"] is None and entry["scale"] == 1 and "accuracy only" in entry["bootstrap_note"]


# ---------------------------------------------------------------- which pairs
GROUPS = {f"method={m}": {"method": m} for m in ("lora", "pissa", "dora", "ba-lora")}


def test_default_pairs_are_the_methods_present():
    assert P.resolve_pairs(None, GROUPS) == [("method=ba-lora", "method=pissa"), ("method=ba-lora", "method=lora"),
                                             ("method=pissa", "method=lora")]
    two = {k: v for k, v in GROUPS.items() if k in ("method=lora", "method=dora")}
    assert P.resolve_pairs(None, two) == []
    variants = {f"variant={v}": {"variant": v} for v in ("all", "cr-only", "dr-only")}
    assert P.resolve_pairs(None, variants) == []  # variants without a reference: no pairs
    assert P.resolve_pairs(None, variants, reference="all") == [("variant=cr-only", "variant=all"),
                                                                ("variant=dr-only", "variant=all")]
    with pytest.raises(ValueError, match=r"reference: 'none' is not one of the variants: all, cr-only, dr-only"):
        P.resolve_pairs(None, variants, reference="none")
    assert P.resolve_pairs(None, {"all": {}}) == []


def test_pairs_match_the_other_axes():
    groups = {f"task={t}, method={m}": {"task": t, "method": m} for t in ("rt", "boolq") for m in ("lora", "pissa")}
    assert P.resolve_pairs([["pissa", "lora"]], groups) == [("task=rt, method=pissa", "task=rt, method=lora"),
                                                            ("task=boolq, method=pissa", "task=boolq, method=lora")]
    assert P.resolve_pairs([["task=rt, method=pissa", "task=boolq, method=pissa"]], groups) == [
        ("task=rt, method=pissa", "task=boolq, method=pissa")]
    with pytest.raises(ValueError, match=r"pairs\[0\]: 'pissa' and 'rt' set different grid keys"):
        P.resolve_pairs([["pissa", "rt"]], groups)
    with pytest.raises(ValueError, match=r"pairs\[1\]: 'qlora' names no group .*known groups: task=rt, method=lora; "):
        P.resolve_pairs([["pissa", "lora"], ["qlora", "lora"]], groups)
    with pytest.raises(ValueError, match=r"pairs\[0\]: 'lora' and 'method=lora' are the same group"):
        P.resolve_pairs([["lora", "method=lora"]], groups)
