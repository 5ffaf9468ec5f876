"""Answer extraction and equivalence for GSM8K / MATH-style generations."""

from __future__ import annotations

import gzip
import json
from fractions import Fraction
from pathlib import Path

import pytest

from balora.evaluation.math_answers import (
    answers_equal,
    extract_answer,
    gsm8k_gold,
    latex_to_sympy_text,
    load_gsm8k,
    normalize_number,
    score_math,
)

# The copy shipped with the package (a fresh clone has it; the test does not skip).
GSM8K = Path(__file__).resolve().parents[1] / "src" / "balora" / "evaluation" / "data" / "gsm8k_test.jsonl.gz"


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    with gzip.open(GSM8K, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_every_gsm8k_gold_solution_extracts_to_its_gold(gsm8k_rows):
    assert len(gsm8k_rows) == 1319
    pairs = [(gsm8k_gold(r["answer"]), extract_answer(r["answer"])) for r in gsm8k_rows]
    wrong = [(i, gold, got) for i, (gold, got) in enumerate(pairs) if gold != got]
    assert not wrong, wrong[:10]


def test_load_gsm8k_default_path_and_limit(gsm8k_rows):
    rows = load_gsm8k(limit=5)
    assert len(rows) == 5
    assert rows[0]["question"] == gsm8k_rows[0]["question"]
    assert rows[0]["gold"] == "18"
    assert load_gsm8k(GSM8K)[-1]["gold"] == gsm8k_gold(gsm8k_rows[-1]["answer"])


def test_load_gsm8k_reports_bad_lines(tmp_path):
    bad = tmp_path / "g.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"g\.jsonl:2"):
        load_gsm8k(bad)
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "absent.jsonl")


def test_gsm8k_gold_strips_commas_and_requires_marker():
    assert gsm8k_gold("so 1,000 + 450,000\n#### 1,450,000") == "1450000"
    assert gsm8k_gold("#### -10") == "-10"
    with pytest.raises(ValueError):
        gsm8k_gold("no marker 12")


EXTRACT_CASES = [
    # (completion, expected extraction)
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("Total: 10,800 dollars\n#### 10,800", "10800"),
    ("#### $18.00", "18.00"),
    ("The answer is 42.", "42"),
    ("So the answer is: $1,234.", "1234"),
    ("THE ANSWER IS 9 apples.", "9"),
    ("the answer is -3", "-3"),
    ("The answer is 5 + 3 = 8", "8"),
    ("so the answer is therefore 42 cookies.", "42"),
    ("The answer is $\\frac{3}{4}$.", "3/4"),
    ("The final answer is $\\boxed{10}$.", "10"),
    ("We get \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("First \\boxed{1}, then correcting: \\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{2\\sqrt{2}}", "2\\sqrt{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{\\$1,000}", "1000"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("He pays 5 * 3 = 15 dollars, then 15 - 2 = 13.", "13"),
    ("It costs $2.50 per cup.", "2.50"),
    ("The temperature dropped to -7 degrees.", "-7"),
    ("The difference 12-5 is 7.", "7"),
    ("She ate 3/4 of the pie.", "3/4"),
    ("The discount is 50%.", "50"),
    ("That is .5 of the total", ".5"),
    ("In total 1,000,000 people came.", "1000000"),
    ("Numbers 1, 2, 3 and finally 4.", "4"),
    ("I am not sure what the result is.", None),
    ("", None),
    ("x = -2.5", "-2.5"),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}"),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer_table(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_table_is_big_enough():
    assert len(EXTRACT_CASES) >= 25


def test_unbalanced_boxed_falls_back_to_earlier_box():
    assert extract_answer("\\boxed{5} and then \\boxed{\\frac{1}{2") == "5"


@pytest.mark.parametrize("text, value", [
    ("1,234", Fraction(1234)), ("$5.50", Fraction(11, 2)), ("3/4", Fraction(3, 4)),
    ("\\frac{1}{2}", Fraction(1, 2)), ("-\\frac{3}{4}", Fraction(-3, 4)),
    ("\\frac{-3}{4}", Fraction(-3, 4)), ("50%", Fraction(50)), ("9 apples", Fraction(9)),
    ("$18$", Fraction(18)), ("+7", Fraction(7)), ("0.25", Fraction(1, 4)),
    ("1/0", None), ("x+1", None), ("2\\sqrt{2}", None), ("3 and 4", None), (None, None),
])
def test_normalize_number(text, value):
    assert normalize_number(text) == value


@pytest.mark.parametrize("pred, gold, equal", [
    ("18", "18", True), ("18.00", "18", True), ("$1,234", "1234", True), ("0.5", "1/2", True),
    ("50%", "50", True),   # percent is a unit (module doc)
    ("50%", "0.5", False),  # ... and is not divided by 100
    ("17", "18", False), (None, "18", False), ("-3", "3", False),
])
def test_answers_equal_numeric(pred, gold, equal):
    assert answers_equal(pred, gold) is equal


@pytest.mark.parametrize("pred, gold", [
    ("\\frac{1}{2}", "0.5"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("x+1", "1+x"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("(x-1)(x+1)", "x^2-1"),
    ("\\left( \\frac{2}{2}, 2 \\right)", "(1, 2)"),
    ("2^{10}", "1024"),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
])
def test_symbolic_equivalence(pred, gold):
    assert answers_equal(pred, gold, symbolic=True)


@pytest.mark.parametrize("pred, gold", [("x+2", "1+x"), ("\\sqrt{8}", "3"), ("(1, 2)", "(2, 1)")])
def test_symbolic_non_equivalence(pred, gold):
    assert not answers_equal(pred, gold, symbolic=True)


def test_symbolic_off_does_not_call_sympy():
    assert not answers_equal("\\sqrt{8}", "2\\sqrt{2}")


def test_symbolic_timeout_returns_false_and_worker_recovers():
    # 2^(2^(2^30)) has ~10^8-digit exponent: GMP grinds (or hits the worker's memory cap).
    assert not answers_equal("2^{2^{2^{30}}}", "3", symbolic=True, timeout=1.0)
    assert answers_equal("x+1", "1+x", symbolic=True)


@pytest.mark.parametrize("evil", ["__import__('os').system('true')", "eval(1)", "x.__class__",
                                  "\\unknowncommand{1}", "open('f')"])
def test_latex_conversion_never_lets_code_through(evil):
    text = latex_to_sympy_text(evil)
    assert text is None or ("_" not in text and "'" not in text and "." not in text
                            and "eval" not in text and "open" not in text)


def test_score_math_records():
    out = score_math([
        {"prompt": "p1", "completion": "... #### 18", "gold": "18"},
        {"question": "p2", "completion": "The answer is 5.", "gold": "6"},
        {"completion": "I don't know", "gold": 3},
    ])
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["correct"] == 1 and out["total"] == 3
    first, second, third = out["records"]
    assert first == {"prompt": "p1", "completion": "... #### 18", "extracted": "18", "gold": "18",
                     "correct": True}
    assert second["prompt"] == "p2" and second["extracted"] == "5" and not second["correct"]
    assert third["extracted"] is None and third["gold"] == "3" and not third["correct"]
    with pytest.raises(KeyError, match="record 0"):
        score_math([{"completion": "1"}])
