"""experiments/headline.py: the paper's claims judged from the paired differences of the summaries."""

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("headline", Path(__file__).parent.parent / "experiments" / "headline.py")
headline = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(headline)


def summary(verdict: str, mean: float = 0.01) -> dict:
    return {"paired": [{"a": "method=ba-lora", "b": "method=pissa", "mean": mean, "t_interval": [mean - 0.005, mean + 0.005],
                        "n": 5, "scale": 100, "verdict": verdict}]}


@pytest.mark.parametrize(("verdicts", "overall"), [
    (["beats", "beats"], "**reproduced**"),
    (["is beaten by", "is beaten by"], "**contradicted**"),
    (["inconclusive", "inconclusive"], "**inconclusive** at this scale"),
    (["beats", "inconclusive"], "mixed: inconclusive, reproduced"),
    (["beats", None], "pending (so far: reproduced)"),
    ([None, None], "pending"),
])
def test_a_claim_holds_only_when_every_task_agrees(verdicts, overall):
    sources = {f"task{i}": (summary(v) if v else None, None) for i, v in enumerate(verdicts)}
    row = headline.claim_row("claim", sources, ("ba-lora", "pissa"))
    assert row.endswith(f"| {overall} |")
    if verdicts[0]:
        assert "task0 +1.00 [+0.50, +1.50], 5 seeds" in row


def test_a_pair_the_summary_lacks_is_not_finished():
    row = headline.claim_row("claim", {"t": (summary("beats"), None)}, ("ba-lora", "lora"))
    assert "t: not finished" in row and row.endswith("| pending |")


def test_a_claim_on_another_metric_reads_that_metrics_entry():
    entries = summary("inconclusive")["paired"] + [{**summary("beats", mean=-0.0123)["paired"][0],
                                                    "metric": "forgetting", "scale": 1}]
    row = headline.claim_row("forgets less", {"XSum": ({"paired": entries}, "forgetting")}, ("ba-lora", "pissa"))
    assert "XSum -0.0123 [-0.0173, -0.0073], 5 seeds: reproduced" in row and row.endswith("| **reproduced** |")
    assert "+1.00" in headline.claim_row("acc", {"t": ({"paired": entries}, None)}, ("ba-lora", "pissa"))


def rare(ratio: str, a: str, b: str, verdict: str, mean: float) -> dict:
    return {"a": f"data.imbalance_ratio={ratio}, method={a}", "b": f"data.imbalance_ratio={ratio}, method={b}",
            "metric": "test.rare_class.recall", "mean": mean, "t_interval": [mean - 0.01, mean + 0.01], "n": 3,
            "scale": 100, "verdict": verdict}


def test_the_imbalance_claim_is_judged_on_the_rare_class_at_every_imbalanced_ratio():
    paired = [{**rare("1:4", "ba-lora", "pissa", "beats", 0.2), "metric": "test.accuracy"},  # not this metric
              rare("1:1", "ba-lora", "pissa", "is beaten by", -0.1),  # nothing is rare at 1:1
              rare("1:4", "ba-lora", "pissa", "beats", 0.2), rare("1:9", "ba-lora", "pissa", "inconclusive", 0.05),
              rare("1:9", "ba-lora", "lora", "beats", 0.3)]
    sources = headline.imbalance_sources({"tasks": {"rt": {"paired": paired}}})
    assert list(sources) == ["rare-class recall at 1:4", "rare-class recall at 1:9"]
    row = headline.claim_row("imbalance", sources, ("ba-lora", "pissa"))
    assert "at 1:4 +20.00 [+19.00, +21.00], 3 seeds: reproduced" in row and row.endswith("| mixed: inconclusive, reproduced |")
    assert headline.claim_row("vs lora", sources, ("ba-lora", "lora")).endswith("| pending (so far: reproduced) |")
    assert headline.claim_row("x", headline.imbalance_sources(None), ("ba-lora", "lora")).endswith("| pending |")


def test_the_noise_claim_is_the_growth_of_the_gain_paired_by_seed():
    from balora.experiments.paired import paired_seed_differences

    low, high = {1: 0.01, 2: 0.02, 3: 0.025}, {1: 0.04, 2: 0.05, 3: 0.06}
    by_level = {name: {"seeds": list(g), "values": list(g.values()), "mean": sum(g.values()) / 3}
                for name, g in (("noise-0", low), ("noise-0.2", low), ("noise-0.4", high))}
    row = headline.noise_growth_row({"gain": {"by_level": by_level}})
    d = paired_seed_differences(high, low)
    assert f"noise-0.4 − noise-0: {100 * d['mean']:+.2f} [{100 * d['t_low']:+.2f}, {100 * d['t_high']:+.2f}]" in row
    assert row.endswith("| **reproduced** |") and d["t_low"] > 0
    by_level["noise-0.4"] = {**by_level["noise-0"]}
    assert headline.noise_growth_row({"gain": {"by_level": by_level}}).endswith("| **inconclusive** at this scale |")
    assert headline.noise_growth_row(None).endswith("| pending |")


def test_a_lab_experiment_counts_only_when_every_cell_is_done(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"tasks": {"rt": {"cells_ok": 47, "cells_expected": 48, "paired": []}}}))
    assert headline.load_lab(tmp_path) is None
    path.write_text(json.dumps({"tasks": {"rt": {"cells_ok": 48, "cells_expected": 48, "paired": []}}}))
    assert headline.load_lab(tmp_path) is not None
    noise = {"noise_levels": [0, 0.4], "methods": ["pissa", "ba-lora"], "seeds": [1],
             "cells": {"noise-0": [{"status": "ok"}] * 2, "noise-0.4": [{"status": "ok"}, {"status": "failed"}]}}
    path.write_text(json.dumps(noise))
    assert headline.load_lab(tmp_path) is None
    noise["cells"]["noise-0.4"][1] = {"status": "ok"}
    path.write_text(json.dumps(noise))
    assert headline.load_lab(tmp_path) is not None
