"""`balora train` runs the configuration's ``eval.tasks`` after training (issue 15): RUN/eval/eval.json,
and RUN/eval/untuned/eval.json for the untouched base with ``eval.before_training``."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import make_tiny_llama, make_word_tokenizer

from balora.cli import main


@pytest.fixture
def nlg_config(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"question": f"w{i % 30 + 3} w{(i * 3) % 30 + 3}", "answer": f"w{i % 30 + 40} w{i % 5 + 80}"}
            for i in range(24)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    gsm8k = tmp_path / "gsm8k.jsonl"  # a tiny GSM8K file, through $BALORA_GSM8K
    gsm8k.write_text("".join(json.dumps({"question": f"w{i} w2", "answer": "w3\n#### 4"}) + "\n" for i in range(3)))
    monkeypatch.setenv("BALORA_GSM8K", str(gsm8k))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "ba-lora", "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir), "task": "nlg"}, "adapter": {"r": 4},
        "data": {"source": str(data), "query_field": "question", "response_field": "answer",
                 "template": "plain", "max_length": 16},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "use_cpu": True},
        "eval": {"tasks": ["gsm8k"], "limit": 2, "max_new_tokens": 3, "batch_size": 2},
    }))
    return config, tmp_path / "run"


def test_train_runs_eval_tasks(nlg_config, capsys):
    config, run = nlg_config
    assert main(["train", str(config), "--no-progress", "eval.before_training=true"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["model_kind"] == "run" and report["tasks"]["gsm8k"]["metrics"]["total"] == 2
    assert len((run / "eval" / "records" / "gsm8k.jsonl").read_text().splitlines()) == 2
    assert (run / "metrics.json").is_file()  # beside the training metrics
    untuned = json.loads((run / "eval" / "untuned" / "eval.json").read_text())
    assert untuned["model_kind"] == "model" and untuned["tasks"]["gsm8k"]["metrics"]["total"] == 2
    assert '"untuned"' in out and str((run / "eval" / "eval.json").resolve()) in out


def test_unknown_eval_task_fails_before_training(nlg_config, capsys):
    config, run = nlg_config
    assert main(["train", str(config), "--no-progress", "eval.tasks=[gsm9k]"]) == 2
    assert "eval.tasks: unknown task(s) 'gsm9k'" in capsys.readouterr().err
    assert not (run / "adapter").exists()
