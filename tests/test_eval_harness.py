"""The evaluation harness and ``balora eval``: eval.json, records, ASDiv matching, CLI errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import make_tiny_llama, make_word_tokenizer

from balora.cli import main
from balora.evaluation.harness import TASKS, EvalError, asdiv_match, evaluate


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_llama(seed=5).save_pretrained(d)
    make_word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("data")
    problem = {"prompt": "def f():\n", "entry_point": "f",
               "test": "def check(c):\n    assert c() == 1\n", "canonical_solution": "    return 1\n"}
    with gzip.open(d / "he.jsonl.gz", "wt") as fh:
        for i in range(3):
            fh.write(json.dumps({"task_id": f"HumanEval/{i}", **problem}) + "\n")
    return {
        "gsm8k": _jsonl(d / "gsm8k.jsonl", [{"question": f"w{i} w2", "answer": "w3\n#### 4"}
                                            for i in range(3)]),
        "asdiv": _jsonl(d / "asdiv.jsonl", [{"passage": "w1", "question": f"w{i}",
                                             "answer": "4 apples"} for i in range(3)]),
        "math": _jsonl(d / "math.jsonl", [{"problem": "w1", "solution": "so \\boxed{\\frac12}"}
                                          for _ in range(3)]),
        "humaneval": str(d / "he.jsonl.gz"),
        "forgetting": _jsonl(d / "xsum.jsonl", [{"document": "w1 w2 w3 w4 w5 w6"},
                                                {"document": "w7 w8"}, {"document": "w9"}]),
        "crows_pairs": _jsonl(d / "crows.jsonl", [
            {"id": i, "bias_type": "age", "sentence": "w1 [MASK] w2", "mask1": f"w{i + 3}",
             "mask2": "w9"} for i in range(3)]),
        "stereoset": _jsonl(d / "stereoset.jsonl", [
            {"type": "intersentence", "target": "t", "bias_type": "race", "context": "w1",
             "stereotype": "w2", "anti-stereotype": "w3", "unrelated": f"w{4 + i}"}
            for i in range(3)]),
        "bbq": _jsonl(d / "bbq.jsonl", [
            {"passage": "w1", "question": "w2\nPlease choose the correct option ",
             "options": "A. w3\nB. Unknown\nC. w4", "answer": [a]}
            for a in ("w3", "Unknown", "w4")]),
        "boolq": _jsonl(d / "boolq.jsonl", [  # answers as the tiny vocabulary's words
            {"passage": f"w{i + 5} w6", "question": f"w{i + 7}", "label": "w3" if i % 3 else "w4"}
            for i in range(6)]),
    }


# ---------------------------------------------------------------- ASDiv answers

@pytest.mark.parametrize("completion, gold, correct", [
    ("The answer is: 9", "9 apples", True),
    ("There are 9 apples.", "9 apples", True),
    ("The answer is: 8", "9 apples", False),
    ("The answer is: 36 years old; 12 years old", "36 years old; 12 years old", True),
    ("Tom is 36 and his son is 12.", "36 years old; 12 years old", True),
    ("The answer is: 12 years old; 36 years old", "36 years old; 12 years old", False),
    ("The answer is 3:30 pm", "3:30 p.m.", True),
    ("The answer is 3:30 a.m.", "3:30 p.m.", False),
    ("The answer is: 7:4", "7:4", True),
    ("The answer is: 7:5", "7:4", False),
    ("The answer is: John.", "John", True),
    ("The answer is: John has more", "John", True),
    ("The answer is: Johnny", "John", False),
    ("The answer is: No", "Yes", False),
    ("The answer is: they are equal", "They are equal", True),
    ("The answer is: the 60th caller", "The 60th caller.", True),
])
def test_asdiv_match(completion, gold, correct):
    assert asdiv_match(completion, gold)[1] is correct


# ---------------------------------------------------------------- evaluate()

def test_evaluate_writes_eval_json_and_records(tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    report = evaluate(str(tiny_dir), list(TASKS), limit=2, out_dir=out, batch_size=4,
                      max_new_tokens=4, data=data, base_model=str(tiny_dir), device="cpu")
    written = json.loads((out / "eval.json").read_text())
    assert set(written["tasks"]) == set(TASKS) == set(report["tasks"])
    assert written["versions"]["transformers"] and written["model_kind"] == "model"
    for task in TASKS:
        entry = written["tasks"][task]
        assert entry["items"] == 2 and entry["settings"]["limit"] == 2
        assert entry["wall_seconds"] >= 0
        lines = (out / "records" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 2, task
    for task in ("gsm8k", "asdiv", "math", "humaneval"):
        assert written["tasks"][task]["throughput"]["tokens_per_second"] > 0
        assert written["tasks"][task]["settings"]["max_new_tokens"] == 4
    gsm = [json.loads(x) for x in (out / "records" / "gsm8k.jsonl").read_text().splitlines()]
    assert gsm[0]["prompt"].startswith("Below is an instruction") and gsm[0]["gold"] == "4"
    assert written["tasks"]["math"]["metrics"]["total"] == 2
    assert written["tasks"]["forgetting"]["metrics"]["forgetting"] == pytest.approx(0, abs=1e-6)
    assert written["tasks"]["humaneval"]["metrics"]["num_samples"] == 2
    samples = (out / "humaneval_samples.jsonl").read_text().splitlines()
    assert [json.loads(s)["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert written["tasks"]["bbq"]["metrics"]["ambiguous"] == 1

    # A later call on the same model adds to eval.json instead of replacing it.
    evaluate(str(tiny_dir), ["crows_pairs"], out_dir=out, data=data, device="cpu")
    again = json.loads((out / "eval.json").read_text())
    assert set(again["tasks"]) == set(TASKS)
    assert again["tasks"]["crows_pairs"]["items"] == 3


def test_unknown_task_and_missing_math_file_fail_before_loading(tmp_path):
    with pytest.raises(EvalError, match="unknown task.*'gsm9k'.*known: gsm8k"):
        evaluate(str(tmp_path / "no-model"), ["gsm9k"])
    with pytest.raises(EvalError, match="math-file"):
        evaluate(str(tmp_path / "no-model"), ["math"])


# ---------------------------------------------------------------- balora eval

def _cli(argv: list[str]) -> int:
    return main(argv)


def test_cli_runs_tasks(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = _cli(["eval", str(tiny_dir), "--tasks", "crows_pairs,bbq", "--limit", "2",
               "--data", f"crows_pairs={data['crows_pairs']}", "--data", f"bbq={data['bbq']}",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert "crows_pairs  score" in capsys.readouterr().out
    assert set(json.loads((out / "eval.json").read_text())["tasks"]) == {"crows_pairs", "bbq"}


def test_cli_errors_are_clear(tmp_path, monkeypatch, capsys):
    assert _cli(["eval", "whatever", "--tasks", "gsm8k,nope"]) == 2
    assert "unknown task(s) 'nope'" in capsys.readouterr().err
    monkeypatch.setenv("BALORA_HOME", str(tmp_path / "empty-cache"))
    assert _cli(["eval", "whatever", "--tasks", "crows_pairs"]) == 2
    assert "balora assets fetch crows-pairs" in capsys.readouterr().err
    assert _cli(["eval", "model", "--samples", "s.jsonl"]) == 2
    assert "balora eval humaneval --samples" in capsys.readouterr().err


@pytest.mark.assets
def test_cli_scores_a_samples_file_of_canonical_solutions(tmp_path, capsys):
    from balora.assets import AssetMissingError, main_file
    from balora.evaluation.code import load_humaneval

    try:
        problems = load_humaneval(main_file("humaneval"))
    except AssetMissingError as error:
        pytest.skip(str(error))
    first = list(problems)[:8]  # a subset keeps the default suite fast
    samples = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in first]
    samples.append({"task_id": first[0], "completion": "    return None\n"})  # wrong
    samples += [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in first[1:]]
    path = Path(_jsonl(tmp_path / "samples.jsonl", samples))
    rc = _cli(["eval", "humaneval", "--samples", str(path), "--k", "1,2",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    metrics = json.loads(capsys.readouterr().out)
    # 2 samples per problem, all right except one of problem 0: pass@1 = (7 + 0.5) / 8.
    assert metrics["pass@1"] == pytest.approx(7.5 / 8) and metrics["pass@2"] == 1.0
    assert metrics["num_problems"] == 8 and metrics["num_samples"] == 16
    records = (tmp_path / "o" / "records" / "humaneval.jsonl").read_text().splitlines()
    assert len(records) == 16


def test_forgetting_scores_the_base_once_per_process(tiny_dir, data, tmp_path):
    from balora.evaluation import harness

    harness._BASE_CROSS_ENTROPY.clear()
    said: list[str] = []
    first = evaluate(str(tiny_dir), ["forgetting"], limit=2, out_dir=tmp_path / "a", data=data,
                     base_model=str(tiny_dir), device="cpu", progress=said.append)
    assert any("scoring the base model" in m for m in said)
    said.clear()
    second = evaluate(str(tiny_dir), ["forgetting"], limit=2, out_dir=tmp_path / "b", data=data,
                      base_model=str(tiny_dir), device="cpu", progress=said.append)
    assert not any("scoring the base model" in m for m in said)
    assert any("already scored" in m for m in said)
    m1, m2 = (r["tasks"]["forgetting"]["metrics"] for r in (first, second))
    assert m1["base_cross_entropy"] == m2["base_cross_entropy"]
    said.clear()  # other documents: scored again
    evaluate(str(tiny_dir), ["forgetting"], limit=1, out_dir=tmp_path / "c", data=data,
             base_model=str(tiny_dir), device="cpu", progress=said.append)
    assert any("scoring the base model" in m for m in said)


# ---------------------------------------------------------------- closed-set answers (boolq)

def test_boolq_scores_each_answer_as_the_response(tiny_dir, data, tmp_path):
    """The prediction is the answer word with the larger log-probability after the training-format
    prompt, as a one-text-at-a-time computation gives it; accuracy and shares from the records."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from balora.evaluation.generation import format_prompt
    from balora.training.data import BOOLQ_QUERY, boolq_instruction_records, load_records

    report = evaluate(str(tiny_dir), ["boolq"], out_dir=tmp_path, batch_size=3, data=data, device="cpu")
    metrics = report["tasks"]["boolq"]["metrics"]
    records = [json.loads(x) for x in (tmp_path / "records" / "boolq.jsonl").read_text().splitlines()]
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    rows = boolq_instruction_records(load_records(data["boolq"]))
    assert rows[0]["query"] == BOOLQ_QUERY.format(passage="w5 w6", question="w7") and rows[0]["response"] == "w4"
    for row, rec in zip(rows, records, strict=True):
        prompt = format_prompt(row["query"])
        scores = {}
        for answer in ("w3", "w4"):
            ids = [tok.eos_token_id] + tok(prompt + answer)["input_ids"]
            n = len(tok(prompt + answer)["input_ids"]) - len(tok(prompt)["input_ids"])
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores[answer] = sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert rec["logprobs"] == pytest.approx(scores, abs=1e-4)
        assert rec["predicted"] == max(scores, key=scores.get) and rec["correct"] == (rec["predicted"] == row["response"])
    assert metrics["choices"] == ["w3", "w4"] and metrics["total"] == 6
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in records) / 6)
    assert metrics["majority_answer"] == "w3" and metrics["majority_share"] == pytest.approx(4 / 6)
    assert sum(metrics["predicted_share"].values()) == pytest.approx(1.0)


def test_boolq_words_splits_give_the_answer_as_the_response():
    from balora.training.data import boolq_instruction_records

    rows = boolq_instruction_records([{"passage": "P", "question": "is it? ", "label": "no"}])
    assert rows == [{"query": "P\n\nQuestion: is it?\nAnswer yes or no.", "response": "no"}]
