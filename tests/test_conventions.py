"""Conventions and a quiet, predictable command line (issue 15, part C): target_modules forms, presets by
name, clear refusals (unknown asset, export without a flag, resume_from_checkpoint, a missing extra),
absolute run directories, and the libraries' known warnings silenced unless -v."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_bert, make_word_tokenizer

from balora.cli import main
from balora.core.adapters import build_peft_model, lora_config_for
from balora.core.config import AdapterConfig, ConfigError
from balora.training import preflight
from balora.training import run as run_module
from balora.training.quiet import KNOWN_WARNINGS
from balora.training.run_config import load_run_config, preset_names, preset_path, run_config_from_dict

PRESETS = ["nlg-asdiv-smollm2", "nlg-metamath-llama2-7b", "nlg-privacy-policy-smollm2", "nlu-boolq-minilm",
           "nlu-privacy-policy-minilm", "nlu-rotten-tomatoes-minilm"]


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A tiny BERT classifier, and a tiny BERT base without a head (its load reports the fresh head)."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("models")
    make_tiny_bert().save_pretrained(root / "bert")
    make_word_tokenizer().save_pretrained(root / "bert")
    bert = make_tiny_bert()
    BertModel(bert.config).save_pretrained(root / "bert-base")
    make_word_tokenizer().save_pretrained(root / "bert-base")
    return root


@pytest.fixture
def tiny_config(tmp_path, tiny_models):
    """(write(**top-level options) -> config path) for a 2-step NLU run."""
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)), "label": "pos" if i % 2 else "neg"}
            for i in range(40)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def write(model: str = "bert", **top: object) -> Path:
        config = {"method": "ba-lora", "output_dir": str(tmp_path / "run"),
                  "model": {"name": str(tiny_models / model), "task": "nlu"}, "adapter": {"r": 2},
                  "data": {"source": str(data), "test_fraction": 0.25, "max_length": 16},
                  "training": {"max_steps": 2, "per_device_train_batch_size": 8, "logging_steps": 1,
                               "save_steps": 2}, **top}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write


# ---------------------------------------------------------------- adapter.target_modules
def _adapted(model) -> set[str]:
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def test_all_linear_and_regex_target_modules_reach_peft():
    config = lora_config_for(AdapterConfig(method="lora", r=2, target_modules="all-linear"), make_tiny_bert(), "nlu")
    assert config.target_modules == "all-linear"
    model = build_peft_model(make_tiny_bert(), AdapterConfig(method="lora", r=2, target_modules="ALL-LINEAR"), "nlu")
    adapted = _adapted(model)
    assert any(name.endswith("attention.self.query") for name in adapted)
    assert any(name.endswith("output.dense") for name in adapted)
    assert not any("classifier" in name for name in adapted)  # not the head (trained in full instead)

    regex = r".*\.attention\.self\.(query|value)"
    assert lora_config_for(AdapterConfig(target_modules=regex), make_tiny_bert(), "nlu").target_modules == regex
    adapted = _adapted(build_peft_model(make_tiny_bert(), AdapterConfig(method="lora", r=2, target_modules=regex),
                                        "nlu"))
    assert adapted and all(name.endswith(("self.query", "self.value")) for name in adapted)
    assert len(adapted) == 4  # 2 layers × query, value

    adapted = _adapted(build_peft_model(make_tiny_bert(), AdapterConfig(method="lora", r=2, target_modules=["key"]),
                                        "nlu"))
    assert len(adapted) == 2 and all(name.endswith("self.key") for name in adapted)  # a list: suffix matching


def test_target_modules_strings_in_the_yaml_and_the_preflight(tiny_config, monkeypatch):
    for value in ("all-linear", r".*\.self\.(query|value)"):
        cfg = load_run_config(tiny_config(adapter={"r": 2, "target_modules": value}))
        assert cfg.adapter.target_modules == value
        preflight._check_modules(cfg, preflight._model_config(cfg))
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: the regular expression 'query' matches no "
                                          r"module .*a string must match a whole name"):
        cfg = load_run_config(tiny_config(adapter={"r": 2, "target_modules": "query"}))
        preflight._check_modules(cfg, preflight._model_config(cfg))
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: '\(query' is not a valid regular expression"):
        load_run_config(tiny_config(adapter={"r": 2, "target_modules": "(query"}))
    with pytest.raises(ConfigError, match=r"adapter\.target_modules: must be a list of module names"):
        load_run_config(tiny_config(adapter={"r": 2, "target_modules": [1, 2]}))


# ---------------------------------------------------------------- presets
def test_presets_list_show_and_train_by_name(capsys, tmp_path, monkeypatch):
    assert preset_names() == PRESETS
    assert main(["presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == PRESETS
    first = preset_path("nlu-boolq-minilm.yaml").read_text().splitlines()[0].lstrip("# ")
    assert any(line.startswith("nlu-boolq-minilm") and line.endswith(first) for line in out)

    for name in ("nlu-boolq-minilm", "nlu-boolq-minilm.yaml"):
        assert main(["presets", "show", name]) == 0
        assert capsys.readouterr().out == preset_path("nlu-boolq-minilm.yaml").read_text()
    assert main(["presets", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope' is not a packaged preset; known: nlg-asdiv-smollm2" in err and "Traceback" not in err

    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged presets are found by name
    for name in ("nlu-rotten-tomatoes-minilm", "nlu-rotten-tomatoes-minilm.yaml"):
        assert load_run_config(name).data.source == "asset:rotten-tomatoes"
    (tmp_path / "nlu-rotten-tomatoes-minilm.yaml").write_text("method: lora\nmodel: {task: nlg}\n")
    assert load_run_config("nlu-rotten-tomatoes-minilm.yaml").model.task == "nlg"  # a file of that name wins
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such configuration file \(nor a packaged preset"):
        load_run_config("nope.yaml")


# ---------------------------------------------------------------- clear refusals
def test_unknown_asset_is_refused_without_traceback(capsys):
    assert main(["assets", "fetch", "nope"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("balora assets: error: unknown asset 'nope'; known: smollm2, minilm, rotten-tomatoes")


def test_export_without_a_flag_complains_before_loading(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing flag was reported")

    monkeypatch.setattr(run_module, "load_base_model", refuse)
    monkeypatch.setattr(run_module, "load_tokenizer", refuse)
    monkeypatch.setattr("balora.core.export.load_trained", refuse)
    (tmp_path / "config.yaml").write_text("method: lora\n")
    with pytest.raises(SystemExit, match=r"say what to write: --merge \(full model\) and/or --convert"):
        main(["export", str(tmp_path)])


def test_resume_from_checkpoint_is_refused_pointing_to_resume(tiny_config, capsys):
    with pytest.raises(ConfigError, match=r"training\.resume_from_checkpoint: set by balora \(resume with "
                                          r"`balora train CONFIG --resume`"):
        run_config_from_dict({"training": {"resume_from_checkpoint": "runs/x/checkpoints/checkpoint-2"}})
    assert main(["train", str(tiny_config()), "training.resume_from_checkpoint=true"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_a_missing_report_to_package_names_the_extra(monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    for name in ("tensorboard", "wandb"):
        cfg = run_config_from_dict({"training": {"report_to": [name]}})
        with pytest.raises(ConfigError, match=rf"training\.report_to: '{name}' is not installed here; install it "
                                              rf"\(pip install 'balora\[{name}\]'\)"):
            preflight._check_report_to(cfg)


# ---------------------------------------------------------------- absolute run directories
def test_config_yaml_stores_an_absolute_output_dir_and_resumes_from_elsewhere(tiny_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(output_dir="relative/run")
    assert main(["train", str(config), "--no-progress"]) == 0
    stored = yaml.safe_load((tmp_path / "relative" / "run" / "config.yaml").read_text())
    assert stored["output_dir"] == str((tmp_path / "relative" / "run").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(tmp_path / "relative" / "run" / "config.yaml"), "training.max_steps=3", "--resume",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "relative" / "run" / "metrics.json").read_text())["global_step"] == 3
    assert not (elsewhere / "relative").exists()


# ---------------------------------------------------------------- quiet by default
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _train_capturing(config: Path, tmp_path: Path, *options: str) -> tuple[list[str], list[str]]:
    """(warning messages, transformers log messages) of one `balora train` run."""
    handler = _Records()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["train", str(config), *options]) == 0
    finally:
        hf_logger.removeHandler(handler)
    return [str(w.message) for w in caught], handler.messages


def _silenced(messages: list[str]) -> list[str]:
    import re

    return [m for m in messages if any(re.match(pattern, m) for _, pattern in KNOWN_WARNINGS)]


def test_a_tiny_run_is_quiet_by_default_and_not_with_v(tiny_config, tmp_path, capsys):
    config = tiny_config(model="bert-base")  # no head in the checkpoint: transformers' load report
    caught, logged = _train_capturing(config, tmp_path)
    assert _silenced(caught) == []
    assert not any("LOAD REPORT" in m for m in logged)
    captured = capsys.readouterr()
    assert "evaluate" in captured.err and "train" in captured.err  # one bar for training, one per evaluation
    assert "Warning" not in captured.err and "LOAD REPORT" not in captured.err
    assert '"confusion_matrix": [\n' not in captured.out  # tables are not printed one number per line

    caught, logged = _train_capturing(tiny_config(model="bert-base", output_dir=str(tmp_path / "run-v")), tmp_path,
                                      "-v")
    shown = _silenced(caught)
    assert any(m.startswith("`is_gradient_checkpointing` is deprecated") for m in shown)
    assert any(m.startswith("PiSSA changes the base weights") for m in shown)
    assert any("LOAD REPORT" in m for m in logged)
    logging.getLogger("balora").setLevel(logging.NOTSET)


@pytest.mark.parametrize("package, imports, notice, absent", [
    ("bitsandbytes", "peft, bitsandbytes", "gemm_4bit_forward", "bitsandbytes logs it only on AVX-512 BF16 CPUs"),
    ("deepspeed", "accelerate, deepspeed", "Setting accelerator to CPU", "DeepSpeed found an accelerator here"),
])
def test_a_package_notice_on_import_is_dropped_unless_verbose(package, imports, notice, absent):
    import subprocess
    import sys

    pytest.importorskip(package)
    code = ("import logging, sys; import balora\n"
            "if len(sys.argv) > 1: logging.getLogger('balora').setLevel(logging.INFO)\n"
            f"import {imports}")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and notice not in quiet.stderr + quiet.stdout
    loud = subprocess.run([sys.executable, "-c", code, "-v"], capture_output=True, text=True, timeout=300)
    if notice not in loud.stderr + loud.stdout:  # nothing to drop on this machine: the check above proves nothing
        pytest.skip(absent)
