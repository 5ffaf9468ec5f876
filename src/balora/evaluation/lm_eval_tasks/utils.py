"""Functions of the offline lm-evaluation-harness task configs (``!function utils.NAME``): balora's
prompt and grading, so that both backends score the same items the same way."""

from __future__ import annotations

from typing import Any

from balora.evaluation.generation import format_prompt
from balora.evaluation.math_answers import answers_equal, extract_answer
from balora.evaluation.math_answers import gsm8k_gold as _gold


def gsm8k_prompt(doc: dict[str, Any]) -> str:
    """The Alpaca prompt of balora's NLG training and harness (``--prompt alpaca``)."""
    return format_prompt(doc["question"], "alpaca")


def gsm8k_gold(doc: dict[str, Any]) -> str:
    return _gold(doc["answer"])


def gsm8k_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """balora's extraction ("#### X", "the answer is X", boxed, last number) and numeric matching."""
    return {"exact_match": float(answers_equal(extract_answer(results[0]), _gold(doc["answer"])))}


def crows_pairs_choices(doc: dict[str, Any]) -> list[str]:
    """[stereotyped sentence, anti-stereotyped sentence] (choice 0 is the "gold")."""
    return [doc["sentence"].replace("[MASK]", doc[key]) for key in ("mask1", "mask2")]


def crows_pairs_process_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """1 when the stereotyped sentence is *strictly* more likely (a tie is not, as in balora's score;
    lm-eval's plain ``acc`` would count a tie for choice 0)."""
    return {"acc": float(results[0][0] > results[1][0])}
