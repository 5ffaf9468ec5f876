"""Every bad value is refused up front (issue 14, part B): before the model loads and before config.yaml
is written, with a message that names the option (its YAML path), or the file, the line and the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_bert, make_tiny_llama, make_word_tokenizer

from balora.cli import main
from balora.core.config import AdapterConfig, BALoraConfig, ConfigError
from balora.training import preflight
from balora.training import run as run_module
from balora.training.data import DataError, load_records
from balora.training.run_config import apply_overrides, run_config_from_dict


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_tiny_bert().save_pretrained(root / "bert")
    make_word_tokenizer().save_pretrained(root / "bert")
    make_tiny_llama().save_pretrained(root / "llama")
    make_word_tokenizer().save_pretrained(root / "llama")
    return root


def _text(i: int) -> str:
    return " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6))


def _nlu_rows(n: int = 40) -> list[dict]:
    return [{"text": _text(i), "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def nlu_run(tmp_path, tiny_models):
    """(write(rows=None, **data options) -> config path, run directory) for a tiny NLU run."""
    run = tmp_path / "run"

    def write(rows: list | None = None, **data: object) -> Path:
        source = _write_jsonl(tmp_path / "data.jsonl", _nlu_rows() if rows is None else rows)
        config = {"method": "lora", "output_dir": str(run), "model": {"name": str(tiny_models / "bert"), "task": "nlu"},
                  "adapter": {"r": 2},
                  "data": {"source": str(source), "test_fraction": 0.25, "max_length": 16, **data},
                  "training": {"max_steps": 2, "per_device_train_batch_size": 8, "use_cpu": True,
                               "logging_steps": 1, "save_steps": 2}}
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write, run


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading a tokenizer or a model fails the test: every check below must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model (or its tokenizer) was loaded before the bad value was refused")

    monkeypatch.setattr(run_module, "load_tokenizer", refuse)
    monkeypatch.setattr(run_module, "load_base_model", refuse)


def _refused(capsys, config: Path, run: Path, *overrides: str) -> str:
    assert main(["train", str(config), "--no-progress", *overrides]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert not (run / "config.yaml").exists(), "config.yaml written before the check"
    return err.strip()


# ---------------------------------------------------------------- 6, 7: static checks of the YAML
@pytest.mark.parametrize("override,message", [
    ("training.max_steps=abc", "training.max_steps: must be an integer >= 1 (or -1: train for num_train_epochs), "
                               "got 'abc'"),
    ("training.max_steps=2.5", "training.max_steps: must be an integer >= 1 (or -1: train for num_train_epochs), "
                               "got 2.5"),
    ("training.max_steps=0", "training.max_steps: must be an integer >= 1 (or -1: train for num_train_epochs), got 0"),
    ("training.max_steps=-5", "training.max_steps: must be an integer >= 1 (or -1: train for num_train_epochs), "
                              "got -5"),
    ("training.learning_rate=-1", "training.learning_rate: must be a finite number > 0, e.g. 2e-4, got -1"),
    ("training.learning_rate=fast", "training.learning_rate: must be a finite number > 0, e.g. 2e-4, got 'fast'"),
    ("training.learning_rate=0", "training.learning_rate: must be a finite number > 0, e.g. 2e-4, got 0"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size: must be an integer >= 1, got 0"),
    ("training.save_steps=0", "training.save_steps: must be an integer >= 1 (or a fraction of the run's steps in "
                              "(0, 1)), got 0"),
    ("training.seed=abc", "training.seed: expected int, got 'abc'"),
    ("training.bf16=maybe", "training.bf16: expected bool, got 'maybe'"),
    ("training.output_dir=x", "training.output_dir: set by balora (it is <output_dir>/checkpoints; set the "
                              "top-level output_dir)"),
    ("adapter.init_seed=abc", "adapter.init_seed: must be None or an integer, got 'abc'"),
    ("adapter.alpha=true", "adapter.alpha: must be a finite number > 0 (true/false is not a number), got True"),
    ("balora.temperature=.inf", "balora.temperature: must be a finite number > 0, got inf"),
    ("data.max_length=-5", "data.max_length: must be an integer >= 1 (tokens per example), got -5"),
    ("data.max_length=0", "data.max_length: must be an integer >= 1 (tokens per example), got 0"),
    ("data.train_limit=-1", "data.train_limit: must be an integer >= 1 (the first N examples), or null for all, "
                            "got -1"),
    ("data.test_limit=0", "data.test_limit: must be an integer >= 1 (the first N examples), or null for all, got 0"),
    ("data.validation_limit=0",
     "data.validation_limit: must be an integer >= 1 (the first N examples), or null for all, got 0"),
    ("data.test_fraction=1.5", "data.test_fraction: must be a fraction in [0, 1), got 1.5"),
    ("data.min_label_count=-1", "data.min_label_count: must be an integer >= 0 (0 = no minimum), got -1"),
])
def test_bad_values_are_refused_when_the_yaml_is_read(override, message):
    with pytest.raises(ConfigError) as info:
        run_config_from_dict(apply_overrides({}, [override]))
    assert str(info.value) == message


def test_nlg_needs_room_for_a_prompt_and_a_response_token():
    with pytest.raises(ConfigError, match=r"^data.max_length: must be an integer >= 2 \(tokens per example\), got 1$"):
        run_config_from_dict({"model": {"task": "nlg"}, "data": {"max_length": 1}})


def test_valid_training_values_still_pass():
    cfg = run_config_from_dict(apply_overrides({}, ["training.max_steps=-1", "training.num_train_epochs=2",
                                                    "training.save_steps=0.5", "training.warmup_steps=10",
                                                    "training.report_to=[]", "data.min_label_count=0"]))
    assert cfg.training["max_steps"] == -1 and cfg.data.min_label_count == 0
    assert run_config_from_dict({}).data.min_label_count == 2


def test_library_dataclasses_refuse_bools_and_infinities():
    with pytest.raises(ConfigError, match=r"^AdapterConfig.alpha: must be a finite number > 0"):
        AdapterConfig(alpha=True)
    with pytest.raises(ConfigError, match=r"^BALoraConfig.temperature: must be a finite number > 0, got inf$"):
        BALoraConfig(temperature=math.inf)
    with pytest.raises(ConfigError, match=r"^BALoraConfig.temperature: must be a finite number > 0, got nan$"):
        BALoraConfig(temperature=math.nan)


# ---------------------------------------------------------------- 6, 7: before the model loads (preflight)
@pytest.mark.parametrize("override,message", [
    ("adapter.target_modules=[nonexistent]", "adapter.target_modules: 'nonexistent' matches no module of "),
    ("adapter.modules_to_save=[head]", "adapter.modules_to_save: 'head' matches no module of "),
    ("model.name=asset:nosuch", "model.name: unknown asset(s) 'nosuch'"),
    ("model.name=./no/such/model", "model.name: './no/such/model' is neither a local directory nor a hub id"),
    ("training.fp16=true", "training.fp16: half-precision training needs a GPU, and this run is on the CPU "
                           "(training.use_cpu is true); remove training.fp16 (the CPU trains in float32)"),
    ("training.bf16_full_eval=true", "training.bf16_full_eval: half-precision training needs a GPU, and this run "
                                     "is on the CPU (training.use_cpu is true); remove training.bf16_full_eval"),
    ("model.dtype=bfloat16", "model.dtype: bfloat16 weights need a GPU, and this run is on the CPU "
                             "(training.use_cpu is true); set model.dtype: float32"),
    ("training.report_to=wandb", "training.report_to: 'wandb' is not installed here"),
    ("training.report_to=[nosuch]", "training.report_to: 'nosuch' is not a transformers integration"),
    ("training.lr_scheduler_type=nope", "training.lr_scheduler_type: nope is not a valid SchedulerType"),
    ("training.logging_steps=2.5", "training.logging_steps: must be an integer >= 1"),
])
def test_bad_values_are_refused_before_the_model_loads(nlu_run, no_model_loading, capsys, monkeypatch,
                                                       override, message):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "get_available_reporting_integrations", lambda: [])
    write, run = nlu_run
    err = _refused(capsys, write(), run, override)
    assert message in err, err


def test_half_precision_on_a_cpu_only_machine(nlu_run, no_model_loading, capsys, monkeypatch):
    monkeypatch.setattr(preflight, "accelerator", lambda: None)
    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: False)
    write, run = nlu_run
    err = _refused(capsys, write(), run, "training.use_cpu=false", "training.bf16=true")
    assert "training.bf16: half-precision training needs a GPU or a CPU with bfloat16, and this run is on the CPU " \
           "(this machine has no GPU) and this CPU lacks native bfloat16 (AVX512-BF16 / AMX)" in err
    from balora.training.run_config import load_run_config

    monkeypatch.setattr(preflight, "cpu_has_bf16", lambda: True)  # bf16 autocast on such a CPU: allowed
    preflight._check_device(load_run_config(write(), ["training.use_cpu=false", "training.bf16=true"]))
    with pytest.raises(ConfigError, match="training.fp16: half-precision training needs a GPU, and this run"):
        preflight._check_device(load_run_config(write(), ["training.use_cpu=false", "training.fp16=true"]))
    monkeypatch.setattr(preflight, "accelerator", lambda: "cuda")  # a GPU: allowed, up to TrainingArguments

    preflight._check_device(load_run_config(write(), ["training.use_cpu=false", "training.bf16=true"]))


def test_target_modules_use_peft_suffix_matching(nlu_run, no_model_loading):
    from balora.training.run_config import load_run_config

    write, _ = nlu_run
    preflight.check_before_loading(load_run_config(write(), ["adapter.target_modules=[query, attention.self.value]",
                                                             "adapter.modules_to_save=[classifier]"]))
    with pytest.raises(ConfigError, match=r"adapter.target_modules: 'self.valu' matches no module .* its module "
                                          r"names end in: .*query"):
        preflight.check_before_loading(load_run_config(write(), ["adapter.target_modules=[query, self.valu]"]))


def test_a_nlg_run_checks_the_causal_lm(tmp_path, tiny_models, no_model_loading, capsys):
    rows = [{"query": _text(i), "response": _text(i + 1)} for i in range(20)]
    rows[5]["response"] = 42
    source = _write_jsonl(tmp_path / "sft.jsonl", rows)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "method": "lora", "output_dir": str(tmp_path / "run"), "model": {"name": str(tiny_models / "llama"),
                                                                          "task": "nlg"},
        "data": {"source": str(source), "template": "plain", "max_length": 16},
        "training": {"max_steps": 1, "use_cpu": True}}))
    err = _refused(capsys, config, tmp_path / "run", "adapter.target_modules=[q_proj, gate_proj]")
    assert err == (f"balora train: error: {source}:6: field 'response' must be a string, got int 42 "
                   "(data.response_field names the text field)")
    err = _refused(capsys, config, tmp_path / "run", "adapter.target_modules=[query]")
    assert "adapter.target_modules: 'query' matches no module of" in err and "q_proj" in err


# ---------------------------------------------------------------- 8: broken data
@pytest.mark.parametrize("value,message", [
    (5, "field 'text' must be a string, got int 5 (data.text_field names the text field)"),
    (["w3", "w4"], "field 'text' must be a string, got list ['w3', 'w4'] (data.text_field names the text field)"),
    ({"a": 1}, "field 'text' must be a string, got dict {'a': 1} (data.text_field names the text field)"),
    ("  ", "field 'text' is empty; remove the record or fill it in (data.text_field names the text field)"),
])
def test_texts_must_be_non_empty_strings(nlu_run, no_model_loading, capsys, value, message):
    rows = _nlu_rows()
    rows[6]["text"] = value
    write, run = nlu_run
    err = _refused(capsys, write(rows), run)
    assert err == f"balora train: error: {run.parent / 'data.jsonl'}:7: {message}"


def test_a_label_typo_is_refused_with_the_counts(nlu_run, no_model_loading, capsys):
    rows = _nlu_rows()
    rows[9]["label"] = "pso"
    write, run = nlu_run
    err = _refused(capsys, write(rows, test_fraction=0.0), run)
    data = run.parent / "data.jsonl"
    assert err.startswith(f"balora train: error: {data}:10: label 'pso' occurs in only 1 training row of "
                          f"{data}[train] (counts: 'neg': 20, 'pos': 19, 'pso': 1)")
    assert "'pso': 1" in err and "data.min_label_count=2" in err and "data.min_label_count=0" in err
    # data.min_label_count: 0 accepts it: the data checks pass
    from balora.training.run_config import load_run_config

    preflight._check_data(load_run_config(write(rows, test_fraction=0.0, min_label_count=0)))


def test_a_single_class_training_split_is_refused(nlu_run, no_model_loading, capsys):
    rows = [{**r, "label": "pos"} for r in _nlu_rows()]
    write, run = nlu_run
    err = _refused(capsys, write(rows), run)
    assert "every one of the 30 training rows has label 'pos'" in err
    assert "a classifier needs at least two classes; check data.label_field" in err


@pytest.mark.parametrize("odd,kind", [(0.5, "float"), ("1", "string"), (True, "bool")])
def test_labels_must_be_of_one_type(nlu_run, no_model_loading, capsys, odd, kind):
    rows = [{**r, "label": i % 2} for i, r in enumerate(_nlu_rows())]
    rows[12]["label"] = odd
    write, run = nlu_run
    err = _refused(capsys, write(rows, test_fraction=0.0), run)
    assert f"{run.parent / 'data.jsonl'}:13: label {odd!r} is a {kind}, but 39 of the 40 labels are " in err, err
    assert "of field 'label' (data.label_field) must be of one type" in err
    assert "data.labels" not in err


def test_bool_labels_alone_are_classes(nlu_run, no_model_loading):
    from balora.training.run_config import load_run_config

    rows = [{**r, "label": bool(i % 2)} for i, r in enumerate(_nlu_rows())]
    write, _ = nlu_run
    preflight._check_data(load_run_config(write(rows)))


def test_an_evaluation_label_unseen_in_training_is_refused_up_front(nlu_run, no_model_loading, capsys):
    rows = _nlu_rows()
    write, run = nlu_run
    # data.splits auto with a directory: train.jsonl and test.jsonl
    (run.parent / "split").mkdir()
    _write_jsonl(run.parent / "split" / "train.jsonl", rows)
    _write_jsonl(run.parent / "split" / "test.jsonl", [{"text": _text(1), "label": "pos"},
                                                      {"text": _text(2), "label": "meh"}])
    err = _refused(capsys, write(source=str(run.parent / "split")), run)
    assert f"{run.parent / 'split' / 'test.jsonl'}:2: label 'meh' of the test split never occurs" in err


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 1}\n{"text": "caf\xe9", "label": 0}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(invalid continuation byte, "
                                        r"byte b'\\xe9'\); re-save the file as UTF-8"):
        load_records(str(path))
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"text,label\nok,1\nok,0\ncaf\xe9,1\n")
    with pytest.raises(DataError, match=r"latin1\.csv:4: not valid UTF-8"):
        load_records(str(csv))


def test_unknown_format_names_the_option(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(DataError) as info:
        load_records(str(path))
    assert "unknown data format '.txt'; data.source must be a .jsonl" in str(info.value)


# ---------------------------------------------------------------- 11: the command line
def test_overrides_may_follow_options(nlu_run, no_model_loading, capsys):
    write, run = nlu_run
    err = _refused(capsys, write(), run, "--threads", "1", "training.max_steps=abc")
    assert "training.max_steps: must be an integer >= 1" in err
    with pytest.raises(SystemExit):
        main(["train", str(write()), "--threads", "1", "training.max_steps=3", "--bogus"])
    assert "unrecognized arguments: training.max_steps=3 --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["info", str(run), "x=1"])  # only train takes overrides


def test_overrides_after_options_train(nlu_run):
    import torch

    write, run = nlu_run
    threads = torch.get_num_threads()
    try:
        assert main(["train", str(write()), "--no-progress", "--threads", "1", "training.max_steps=1"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 1


PROBLEMS = [{"task_id": "toy/0", "prompt": "def add(a, b):\n", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}]


@pytest.mark.parametrize("body,message", [
    (b'{"task_id": "toy/0", "completion": "    return a + b\\n"}\n{"task_id": "toy/0"}\n',
     ":2: sample lacks field 'completion'"),
    (b'{"task_id": "toy/9", "completion": "x"}\n', ":1: unknown task_id 'toy/9'; the problems file has 1 task_ids: toy/0"),
    (b'{"task_id": "toy/0", "completion": "x"}\n{oops\n', ":2: invalid JSON"),
    (b'{"task_id": "toy/0", "completion": "caf\xe9"}\n', ":1: not valid UTF-8"),
    (b'{"task_id": null, "completion": "x"}\n', ":1: 'task_id' must be a string such as 'HumanEval/0', got None"),
    (b"\n", ": no samples"),
], ids=["missing-field", "unknown-task-id", "invalid-json", "not-utf8", "null-task-id", "empty"])  # plain ids: the
#  bodies hold newlines and non-UTF-8 bytes, which make unreadable test names
def test_eval_samples_errors_name_file_and_line(tmp_path, capsys, body, message):
    problems = _write_jsonl(tmp_path / "problems.jsonl", PROBLEMS)
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(body)
    assert main(["eval", "humaneval", "--samples", str(samples), "--problems", str(problems)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{samples}{message}" in err, err


def test_evaluate_samples_names_the_sample():
    from balora.evaluation.code import evaluate_samples

    with pytest.raises(KeyError, match="sample 2 has unknown task_id 'nope'; the problems file has 1 task_ids"):
        evaluate_samples([{"task_id": "toy/0", "completion": ""}, {"task_id": "nope", "completion": ""}],
                         {p["task_id"]: p for p in PROBLEMS})
    with pytest.raises(KeyError, match="sample 1 lacks 'completion'"):
        evaluate_samples([{"task_id": "toy/0"}], {p["task_id"]: p for p in PROBLEMS})


@pytest.mark.parametrize("env, match", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"},
     "fsdp_cpu_ram_efficient_loading: false"),
])
def test_engines_balora_cannot_serve_are_refused_before_loading(env, match):
    from balora.training.preflight import _check_engine
    from balora.training.run_config import run_config_from_dict

    cfg = run_config_from_dict({"method": "ba-lora", "model": {"name": "m", "task": "nlg"}})
    with pytest.raises(ConfigError, match=match):
        _check_engine(cfg, env)
    _check_engine(cfg, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})  # the shipped fsdp2 config
    for stage in ("2", "3"):  # both served, BA-LoRA included
        _check_engine(cfg, {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": stage})


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "zero2", "zero3"])
def test_shipped_launch_configs_parse_as_accelerate_configs(engine, capsys):
    from accelerate.commands.config.config_args import load_config_from_file

    assert main(["launch-config", engine]) == 0
    path = capsys.readouterr().out.strip()
    config = load_config_from_file(path)
    assert str(config.distributed_type).endswith({"ddp": "MULTI_GPU", "fsdp2": "FSDP"}.get(engine, "DEEPSPEED"))
    if engine == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2 and not config.fsdp_config["fsdp_cpu_ram_efficient_loading"]


def test_model_quantize_values_and_requirements(monkeypatch):
    import importlib.util

    from balora.training.preflight import _check_engine
    from balora.training.run_config import run_config_from_dict

    with pytest.raises(ConfigError, match=r"model.quantize: expected"):
        run_config_from_dict({"method": "pissa", "model": {"name": "m", "task": "nlg", "quantize": 3}})
    cfg = run_config_from_dict({"method": "pissa", "model": {"name": "m", "task": "nlg", "quantize": 4}})
    _check_engine(cfg, {})
    with pytest.raises(ConfigError, match="DDP only"):
        _check_engine(cfg, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"balora\[quantization\]"):
        _check_engine(cfg, {})
