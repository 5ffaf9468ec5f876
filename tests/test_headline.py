"""experiments/headline.py: the paper's claims judged from the paired differences of the summaries."""

import importlib.util
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
