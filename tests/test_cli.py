"""The `balora` command and its YAML configuration: overrides, exact error messages, and tiny
end-to-end runs (train → artefacts → info → export → resume) on models built from configs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_bert, make_tiny_llama, make_word_tokenizer

from balora.cli import main
from balora.core.config import ConfigError
from balora.training.run_config import apply_overrides, load_run_config, parse_override, run_config_from_dict


# ---------------------------------------------------------------- overrides and checking
@pytest.mark.parametrize(
    "text,path,value",
    [
        ("method=lora", ["method"], "lora"),
        ("training.max_steps=20", ["training", "max_steps"], 20),
        ("balora.lambda_svd=1e-3", ["balora", "lambda_svd"], 1e-3),
        ("eval.tasks=[gsm8k, asdiv]", ["eval", "tasks"], ["gsm8k", "asdiv"]),
        ("adapter.pissa_niter=null", ["adapter", "pissa_niter"], None),
        ("data.source=a=b.jsonl", ["data", "source"], "a=b.jsonl"),
        ("save_merged=true", ["save_merged"], True),
    ],
)
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


@pytest.mark.parametrize(
    "text,message",
    [
        ("training.max_steps", "override 'training.max_steps': expected KEY=VALUE, e.g. training.max_steps=20 or method=lora"),
        ("training..max_steps=3", "override 'training..max_steps=3': empty key part in 'training..max_steps'"),
        ("eval.tasks=[a", "override 'eval.tasks=[a': value is not valid YAML"),
    ],
)
def test_parse_override_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert str(info.value).startswith(message)


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match=r"^override 'method.r=3': method is not a section$"):
        apply_overrides({"method": "lora"}, ["method.r=3"])


@pytest.mark.parametrize(
    "data,message",
    [
        ({"trainng": {}}, "trainng: unknown section; known: adapter, balora, data, divergence_factor, eval, method, "
                          "model, output_dir, reference_cache, save_merged, training"),
        ({"data": {"txt_field": "x"}}, "data.txt_field: unknown option; known options: "),
        ({"data": {"max_length": "long"}}, "data.max_length: expected int, got 'long'"),
        ({"model": {"task": "seq2seq"}}, "model.task: expected Literal['nlg', 'nlu'], got 'seq2seq'"),
        ({"method": "qlora"}, "method: 'qlora' is not one of 'lora', 'pissa', 'ba-lora', 'lora-reg', 'dora', 'rslora'"),
        ({"adapter": {"r": "eight"}}, "adapter.r: must be an integer >= 1, got 'eight'"),
        ({"adapter": {"method": "lora"}}, "adapter.method: unknown option (set it with the top-level `method` / `model.task`)"),
        ({"balora": {"lambda_svd": -1}}, "balora.lambda_svd: must be a finite number >= 0, got -1"),
        ({"balora": {"lamda_svd": 1}}, "balora.lamda_svd: unknown option; known options: "),
        ({"training": {"max_step": 3}}, "training.max_step: not a transformers.TrainingArguments option (did you mean max_steps?)"),
        ({"save_merged": "yes"}, "save_merged: expected bool, got 'yes'"),
    ],
)
def test_config_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(data)
    assert str(info.value).startswith(message), str(info.value)


def test_yaml_typo_names_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: ba-lora\nmodel:\n  name: x\n   task: nlu\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:4: invalid YAML \(mapping values are not allowed here\)"):
        load_run_config(path)
    path.write_text("method: ba-lora\ntraining:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: training\.max_stpes: not a transformers\.TrainingArguments option"):
        load_run_config(path)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("method: ba-lora\n")
    assert main(["train", str(path), "balora.top_k=-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"balora train: error: {path}: balora.top_k: must be an integer >= 0 "
                           "(0 = full vocabulary), got -1")


def test_presets_load_and_switch_method():
    root = Path(__file__).parents[1] / "configs"
    for name in ("nlu-rotten-tomatoes-minilm", "nlu-boolq-minilm", "nlg-asdiv-smollm2", "nlg-metamath-llama2-7b"):
        cfg = load_run_config(root / f"{name}.yaml", ["method=lora"])
        assert cfg.method == "lora" and cfg.balora_config() is None
    assert load_run_config(root / "nlg-asdiv-smollm2.yaml").balora_config().lambdas == (0.025, 0.005, 0.005)


# ---------------------------------------------------------------- tiny end-to-end runs
@pytest.fixture
def tiny_nlu_run(tmp_path):
    model_dir = tmp_path / "tiny-bert"
    make_tiny_bert().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(60)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {
        "method": "ba-lora", "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir), "task": "nlu"},
        "adapter": {"r": 4},
        "data": {"source": str(data), "test_fraction": 0.2, "max_length": 16},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                     "logging_steps": 2, "save_steps": 2, "use_cpu": True},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, tmp_path / "run"


def test_train_writes_artefacts_info_export_and_resume(tiny_nlu_run, capsys):
    config, run = tiny_nlu_run
    assert main(["train", str(config), "eval.before_training=true", "--no-progress"]) == 0
    for name in ("config.yaml", "adapter/adapter_model.safetensors", "adapter/balora_adapter.json",
                 "lora_converted/adapter_config.json", "label_map.json", "log_history.json", "metrics.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    for split in ("test", "untuned"):  # per-item predictions: accuracy recomputed from them
        pred = json.loads((run / "predictions" / f"{split}.json").read_text())
        assert pred["labels"] == ["neg", "pos"] and len(pred["label"]) == len(pred["predicted"]) == 12
        assert len(pred["logits"]) == 12 and all(len(row) == 2 for row in pred["logits"])
        assert all(pred["labels"][max(range(2), key=row.__getitem__)] == p
                   for row, p in zip(pred["logits"], pred["predicted"]))
        correct = sum(t == p for t, p in zip(pred["label"], pred["predicted"])) / 12
        assert correct == pytest.approx(metrics[split]["accuracy"])
    assert metrics["data"]["test"] == 12 and json.loads((run / "label_map.json").read_text()) == {"neg": 0, "pos": 1}
    logged = json.loads((run / "log_history.json").read_text())
    assert any("balora/consistency" in r for r in logged)

    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "method ba-lora" in out and "lora_converted" in out and "test: accuracy" in out

    assert main(["export", str(run), "--merge"]) == 0
    assert (run / "merged" / "config.json").exists()

    # a second run into the same directory must not overwrite the checkpoints silently
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err
    assert main(["train", str(config), "training.max_steps=6", "--resume", "--no-progress"]) == 0
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6


def test_train_nlg_end_to_end(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"question": f"w{i % 30 + 3} w{(i * 3) % 30 + 3}", "answer": f"w{i % 30 + 40} w{i % 5 + 80}"}
            for i in range(40)]
    data = tmp_path / "math.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "ba-lora", "output_dir": str(tmp_path / "run"),
        "model": {"name": str(model_dir), "task": "nlg"}, "adapter": {"r": 4},
        "data": {"source": str(data), "query_field": "question", "response_field": "answer",
                 "template": "plain", "max_length": 16},
        "training": {"max_steps": 3, "per_device_train_batch_size": 4, "logging_steps": 1, "use_cpu": True},
    }))
    assert main(["train", str(config)]) == 0  # with the progress bar (replaces the Trainer's log printer)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "nlg" and metrics["test"]["loss"] > 0
    assert torch.isfinite(torch.tensor(metrics["test"]["perplexity"]))


def test_malformed_data_line_is_reported_by_the_command(tiny_nlu_run, capsys):
    config, run = tiny_nlu_run
    data = Path(yaml.safe_load(config.read_text())["data"]["source"])
    lines = data.read_text().splitlines()
    lines[6] = '{"text": "w3 w4", "label": }'
    data.write_text("\n".join(lines) + "\n")
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "data.jsonl:7: invalid JSON" in capsys.readouterr().err


def test_run_config_sections_are_the_library_dataclasses():
    from balora import AdapterConfig, BALoraConfig

    cfg = run_config_from_dict({"method": "pissa", "model": {"task": "nlu"}, "adapter": {"r": 4},
                                "training": {"seed": 7}})
    assert isinstance(cfg.adapter, AdapterConfig) and isinstance(cfg.balora, BALoraConfig)
    assert cfg.method == cfg.adapter.method == "pissa" and cfg.adapter.alpha == 4.0
    assert cfg.balora.task == "nlu" and cfg.balora.lambdas == (0.15, 0.03, 0.03)  # the task's defaults
    assert cfg.balora_config() is None  # pissa trains with the task loss alone
    # the seed is resolved in one place: the adapter's random parts follow training.seed unless set
    assert cfg.seed == 7 and cfg.init_seed == 7 and cfg.adapter_config().init_seed == 7
    assert run_config_from_dict({"adapter": {"init_seed": 3}}).init_seed == 3
    assert run_config_from_dict({}).seed == 42
    # config.yaml's layout: method on top, no adapter.method or balora.task; it reads back equal
    data = cfg.to_dict()
    assert data["method"] == "pissa" and "method" not in data["adapter"] and "task" not in data["balora"]
    assert run_config_from_dict(data) == cfg


def test_a_mismatched_balora_task_is_refused():
    from balora import BALoraConfig
    from balora.core.config import ConfigError
    from balora.training.run_config import ModelConfig, RunConfig

    with pytest.raises(ConfigError, match="balora.task is 'nlg' but model.task is 'nlu'"):
        RunConfig(model=ModelConfig(task="nlu"), balora=BALoraConfig(task="nlg"))


def test_a_regression_run_trains_and_reports_correlations(tmp_path):
    """Float labels: one output, no label map (transformers refuses id2label=None)."""
    model_dir = tmp_path / "tiny-bert"
    make_tiny_bert(num_labels=1).save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)), "label": float(i % 5) / 4}
            for i in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {"method": "pissa", "output_dir": str(tmp_path / "run"), "model": {"name": str(model_dir), "task": "nlu"},
              "adapter": {"r": 2}, "data": {"source": str(data), "test_fraction": 0.25, "max_length": 12},
              "training": {"max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no", "use_cpu": True}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"pearson", "spearman"}
