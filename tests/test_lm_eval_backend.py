"""`balora eval --backend lm-eval` (issue 15): lm-evaluation-harness on a model balora loads, with the
offline task configs shipped in balora/evaluation/lm_eval_tasks/, scores the same items as balora's own
harness and gets the same accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_tiny_llama

from balora.cli import main
from balora.evaluation.harness import evaluate
from balora.evaluation.lm_eval_backend import LM_EVAL_MISSING, evaluate_lm_eval, lm_eval_available

pytestmark = pytest.mark.skipif(not lm_eval_available(), reason=LM_EVAL_MISSING)


def _digit_tokenizer():
    """Word-level: specials, the digits 0-9 (so that generations hold numbers), w0..w82."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    model = make_tiny_llama(seed=3)
    with torch.no_grad():  # sharper logits: greedy choices far from ties
        model.lm_head.weight.mul_(8)
    model.save_pretrained(d / "model")
    _digit_tokenizer().save_pretrained(d / "model")
    gsm8k = d / "gsm8k.jsonl"  # this model answers item 2 with "5" (and no number to most others)
    gsm8k.write_text("".join(json.dumps({"question": f"w{i} {i % 10} w{i + 20}", "answer": f"w3\n#### {5 if i % 4 == 2 else i % 4}"})
                             + "\n" for i in range(12)))
    crows = d / "crows.jsonl"
    crows.write_text("".join(json.dumps({"id": i, "bias_type": "age", "sentence": f"w{i} [MASK] w{i + 1}",
                                         "mask1": f"w{i + 30}", "mask2": f"w{(i * 7) % 40 + 20}"}) + "\n"
                             for i in range(16)))
    return d, {"gsm8k": str(gsm8k), "crows_pairs": str(crows)}


def test_same_accuracy_as_balora_harness(setup):
    d, data = setup
    kw = {"batch_size": 4, "max_new_tokens": 6, "device": "cpu"}
    ours = evaluate(str(d / "model"), ["gsm8k", "crows_pairs"], data=data, out_dir=d / "ours", **kw)
    theirs = evaluate_lm_eval(str(d / "model"), ["gsm8k", "crows_pairs"], data=data, out_dir=d / "lm", **kw)
    # GSM8K: the same completions item by item, hence the same accuracy
    records = [json.loads(x) for x in (d / "ours" / "records" / "gsm8k.jsonl").read_text().splitlines()]
    samples = sorted((json.loads(x) for x in (d / "lm" / "records" / "lm-eval_gsm8k.jsonl").read_text().splitlines()),
                     key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == [r["completion"] for r in records]
    accuracy = ours["tasks"]["gsm8k"]["metrics"]["accuracy"]
    assert 0 < accuracy < 1, "the check is only meaningful when some answers are right and some wrong"
    assert theirs["tasks"]["gsm8k"]["metrics"]["exact_match,none"] == pytest.approx(accuracy)
    # CrowS-Pairs (pair 15 is a tie: not counted, by either): acc (stereotyped sentence preferred) x 100 = score
    score = ours["tasks"]["crows_pairs"]["metrics"]["score"]
    assert 0 < score < 100
    assert 100 * theirs["tasks"]["crows_pairs"]["metrics"]["acc,none"] == pytest.approx(score)
    assert json.loads((d / "lm" / "lm_eval.json").read_text())["backend"] == "lm-eval"


def test_cli_backend_lm_eval(setup, capsys):
    d, data = setup
    out = d / "cli"
    assert main(["eval", str(d / "model"), "--backend", "lm-eval", "--tasks", "crows_pairs", "--limit", "5",
                 "--data", f"crows_pairs={data['crows_pairs']}", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads((out / "lm_eval.json").read_text())
    assert report["tasks"]["crows_pairs"]["n_samples"]["effective"] == 5
    assert "crows_pairs" in capsys.readouterr().out


def test_cli_backend_lm_eval_refuses_balora_only_options(setup, capsys):
    d, _ = setup
    assert main(["eval", str(d / "model"), "--backend", "lm-eval", "--tasks", "gsm8k", "--prompt", "chat"]) == 2
    assert "--prompt" in capsys.readouterr().err
