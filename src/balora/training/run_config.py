"""The YAML run configuration of `balora train`: sections that mirror the library's dataclasses,
``key.path=value`` overrides, and strict checking (unknown keys and wrong types name the key's path).

    method: ba-lora            # lora | pissa | ba-lora | lora-reg | dora | rslora
    model:   {name: asset:minilm, task: nlu}
    adapter: {r: 8, ...}       # AdapterConfig without `method` (the top-level key)
    balora:  {...}             # BALoraConfig without `task` (model.task)
    data:    {...}             # DataConfig
    training: {...}            # any transformers.TrainingArguments field
    eval:    {...}             # EvalConfig
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from balora.core.config import AdapterConfig, BALoraConfig, ConfigError
from balora.utils import set_path, write_yaml

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# Defaults of ours where transformers' do not suit short CPU runs; any may be overridden in `training`.
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 100,
    "save_total_limit": 2,
    "report_to": [],
    "seed": 42,
    "ddp_find_unused_parameters": False,
}


@dataclass
class ModelConfig:
    name: str = "asset:minilm"  # hub id, local path or asset:NAME
    task: Literal["nlg", "nlu"] = "nlu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # 4 | 8: a bitsandbytes base (QLoRA; QPiSSA for pissa / ba-lora), quantised after the adapter's init
    quantize: Literal[4, 8] | None = None
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the examples come from and how they become tensors (see `balora.training.data`)."""

    source: str = "asset:rotten-tomatoes"  # file, directory, asset:NAME or hub id
    splits: str = "auto"  # "auto" (from source) or a dataset of balora.training.data.DATASET_SPLITS
    split_seed: int = 1234
    test_fraction: float = 0.1
    validation_fraction: float = 0.0
    # classification
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    # instruction tuning
    query_field: str = "query"
    response_field: str = "response"
    context_field: str | None = None
    template: Literal["alpaca", "chat", "plain"] = "alpaca"
    max_length: int = 128
    train_limit: int | None = None
    test_limit: int | None = None
    validation_limit: int | None = None  # the first N validation examples (NLG validation loss is slow)
    # classification only (balora lab imbalance): subsample the training split (after train_limit)
    # to minority:majority = imbalance_ratio, a number in (0, 1] or "1:9"; seeded by split_seed
    imbalance_ratio: float | str | None = None
    minority_label: str | int | bool | None = None  # default: the least frequent training label
    balance_test: bool = False  # subsample test and validation to equal class counts (seeded)
    # classification only: a training label in fewer rows is refused (most likely a typo); 0 = no minimum
    min_label_count: int = 2


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # extra evaluations after training (balora eval)
    limit: int | None = None
    before_training: bool = False  # also evaluate the untuned model on the test split
    test: bool = True  # evaluate the test split after training (false while selecting hyper-parameters)
    validation: bool = False  # evaluate the validation split after training (metrics.json "validation")
    batch_size: int = 64
    max_new_tokens: int = 256


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}


@dataclass
class RunConfig:
    """A `balora train` run. Its sections are the library's own dataclasses, built and checked once
    (`run_config_from_dict`); the YAML's top-level ``method`` is ``adapter.method`` and ``model.task``
    is ``balora.task``, so each concept has one value."""

    output_dir: str = "runs/default"
    save_merged: bool = False  # also write merged/ (the full fine-tuned model)
    # stop when a logged task loss exceeds this factor × the median of the previous ones (null = off)
    divergence_factor: float | None = 100.0
    # the consistency term's reference outputs from an on-disk cache (docs/design/reference-cache.md):
    # "off" (the reference forward at every step), "auto" (<output_dir>/reference_cache, built before
    # training when absent), or the path of a cache built for this model and data (refused on a mismatch)
    reference_cache: str = "off"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    balora: BALoraConfig | None = None  # None: the paper's defaults for model.task
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)  # transformers.TrainingArguments options
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise ConfigError(f"divergence_factor: must be > 1, or null to turn the check off; "
                              f"got {self.divergence_factor!r}")
        if not isinstance(self.reference_cache, str) or not self.reference_cache.strip():
            raise ConfigError(f"reference_cache: off, auto or the path of a cache; got {self.reference_cache!r}")
        if self.balora is None:
            self.balora = BALoraConfig(task=self.model.task)
        elif self.balora.task != self.model.task:
            raise ConfigError(f"balora.task is {self.balora.task!r} but model.task is {self.model.task!r}; "
                              "build BALoraConfig(task=model.task)")

    @property
    def method(self) -> str:
        """The adapter method (the YAML's top-level ``method``)."""
        return self.adapter.method

    @property
    def seed(self) -> int:
        """The training seed: ``training.seed``, else balora's default (42)."""
        return int(self.training.get("seed", TRAINING_DEFAULTS["seed"]))

    @property
    def init_seed(self) -> int:
        """The adapter's initialisation seed: ``adapter.init_seed``, else the training seed, so that a
        seed sweep varies the adapter's random parts too."""
        return self.seed if self.adapter.init_seed is None else self.adapter.init_seed

    def training_arguments(self) -> dict[str, Any]:
        """balora's training defaults updated with the configured ``training`` options."""
        return {**TRAINING_DEFAULTS, **self.training}

    def adapter_config(self) -> AdapterConfig:
        """The adapter to build, its initialisation seed resolved (see `init_seed`)."""
        return dataclasses.replace(self.adapter, init_seed=self.init_seed)

    def balora_config(self) -> BALoraConfig | None:
        """The regularisers for ba-lora and lora-reg; ``None`` (task loss alone) for the baselines."""
        return self.balora if self.adapter.regularised else None

    def to_dict(self) -> dict[str, Any]:
        """The YAML layout: ``method`` on top, ``adapter`` without it, ``balora`` without ``task``."""
        adapter = dataclasses.asdict(self.adapter)
        balora = dataclasses.asdict(self.balora)  # type: ignore[arg-type]
        return {"method": adapter.pop("method"), "output_dir": self.output_dir, "save_merged": self.save_merged,
                "divergence_factor": self.divergence_factor, "model": dataclasses.asdict(self.model),
                "adapter": adapter,
                "balora": {k: v for k, v in balora.items() if k != "task"}, "data": dataclasses.asdict(self.data),
                "training": dict(self.training), "eval": dataclasses.asdict(self.eval),
                # written only when used: config.yaml of runs without a cache stays as it was
                **({"reference_cache": self.reference_cache} if self.reference_cache != "off" else {})}


# ---------------------------------------------------------------------------- checking
def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


def _build_dataclass(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}.{key}: unknown option; known options: {', '.join(sorted(known))}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{path}.{key}: expected {_describe(hints[key])}, got {value!r}")
    return cls(**data)


def _check_fields(cls: type, data: dict[str, Any], path: str, exclude: tuple[str, ...]) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    for key in data:
        if key not in known:
            hint = f" (set it with the top-level `{key}` / `model.task`)" if key in exclude else ""
            raise ConfigError(f"{path}.{key}: unknown option{hint}; known options: {', '.join(sorted(known))}")


def _check_training(data: dict[str, Any]) -> None:
    from transformers import TrainingArguments  # heavy; the CLI parses configs before it needs torch

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(key[:6])][:5]
            raise ConfigError(
                f"training.{key}: not a transformers.TrainingArguments option"
                + (f" (did you mean {', '.join(sorted(close))}?)" if close else "")
            )
    _check_training_values(data, typing.get_type_hints(TrainingArguments))


# training options whose value TrainingArguments takes without a check: (test, what is allowed)
def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _steps(v: Any) -> bool:  # a count of steps, or a ratio of the run's steps when < 1 (transformers' rule)
    return _finite(v) and v > 0 and (v < 1 or float(v).is_integer())


_TRAINING_RANGES: dict[str, tuple[Any, str]] = {
    "max_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1),
                  "must be an integer >= 1 (or -1: train for num_train_epochs)"),
    "num_train_epochs": (lambda v: _finite(v) and v > 0, "must be a finite number > 0"),
    "learning_rate": (lambda v: _finite(v) and v > 0, "must be a finite number > 0, e.g. 2e-4"),
    "per_device_train_batch_size": (_positive_int, "must be an integer >= 1"),
    "per_device_eval_batch_size": (_positive_int, "must be an integer >= 1"),
    "gradient_accumulation_steps": (_positive_int, "must be an integer >= 1"),
    "save_steps": (_steps, "must be an integer >= 1 (or a fraction of the run's steps in (0, 1))"),
    "logging_steps": (_steps, "must be an integer >= 1 (or a fraction of the run's steps in (0, 1))"),
    "eval_steps": (lambda v: v is None or _steps(v),
                   "must be an integer >= 1 (or a fraction of the run's steps in (0, 1)), or null"),
    "save_total_limit": (lambda v: v is None or _positive_int(v),
                         "must be an integer >= 1 (checkpoints kept), or null (keep all)"),
    "warmup_steps": (lambda v: _finite(v) and v >= 0 and (v < 1 or float(v).is_integer()),
                     "must be an integer >= 0 (or a fraction of the run's steps in [0, 1))"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0"),
    "max_grad_norm": (lambda v: _finite(v) and v >= 0, "must be a finite number >= 0 (0: no clipping)"),
    "label_smoothing_factor": (lambda v: _finite(v) and 0 <= v < 1, "must be in [0, 1)"),
    "dataloader_num_workers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                               "must be an integer >= 0"),
}
# set by balora itself: a value here would clash with it
_TRAINING_RESERVED = {"output_dir": "it is <output_dir>/checkpoints; set the top-level output_dir",
                      "disable_tqdm": "balora shows its own progress bar; use `balora train --no-progress`",
                      "resume_from_checkpoint": "resume with `balora train CONFIG --resume`, which continues from "
                                                "the latest complete checkpoint of <output_dir>/checkpoints"}


def _check_training_values(data: dict[str, Any], hints: dict[str, Any]) -> None:
    """Types (from TrainingArguments' annotations) and the ranges TrainingArguments does not check."""
    for key, value in data.items():
        if key in _TRAINING_RESERVED:
            raise ConfigError(f"training.{key}: set by balora ({_TRAINING_RESERVED[key]})")
        if key in _TRAINING_RANGES:
            ok, allowed = _TRAINING_RANGES[key]
            if not ok(value):
                raise ConfigError(f"training.{key}: {allowed}, got {value!r}")
        elif not _type_ok(value, hints[key]):
            raise ConfigError(f"training.{key}: expected {_describe(hints[key])}, got {value!r}")


TOP_LEVEL = ("method", "output_dir", "save_merged", "divergence_factor", "reference_cache", "model", "adapter",
             "balora", "data", "training", "eval")


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of options, got {type(value).__name__}")
    return dict(value or {})


def _build_checked(cls: type, options: dict[str, Any], section: str, top_level: dict[str, str]) -> Any:
    """Build `AdapterConfig` / `BALoraConfig`, whose own checks name ``Class.option``; the error is
    re-labelled with the option's YAML path (``top_level`` maps fields set elsewhere in the YAML)."""
    try:
        return cls(**options)
    except ConfigError as error:
        option = error.option or ""
        raise error.located(top_level.get(option, f"{section}.{option}")) from None


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and check a `RunConfig`; errors name the option's path (e.g. ``balora.lambda_svd``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the run configuration must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{key}: unknown section; known: {', '.join(sorted(TOP_LEVEL))}")
    for key in ("output_dir", "save_merged", "divergence_factor", "reference_cache"):
        if key in data:
            annotation = typing.get_type_hints(RunConfig)[key]
            if not _type_ok(data[key], annotation):
                raise ConfigError(f"{key}: expected {_describe(annotation)}, got {data[key]!r}")
    sections = {key: _build_dataclass(cls, data.get(key) or {}, key) for key, cls in SECTIONS.items()}
    adapter, balora, training = _section(data, "adapter"), _section(data, "balora"), _section(data, "training")
    _check_fields(AdapterConfig, adapter, "adapter", exclude=("method",))
    _check_fields(BALoraConfig, balora, "balora", exclude=("task",))
    _check_training(training)
    cfg = RunConfig(
        output_dir=data.get("output_dir", RunConfig.output_dir), save_merged=data.get("save_merged", False),
        divergence_factor=data.get("divergence_factor", RunConfig.divergence_factor),
        reference_cache=data.get("reference_cache", RunConfig.reference_cache),
        adapter=_build_checked(AdapterConfig, {**adapter, "method": data.get("method", "ba-lora")}, "adapter",
                               {"method": "method"}),
        balora=_build_checked(BALoraConfig, {**balora, "task": sections["model"].task}, "balora",
                              {"task": "model.task"}),
        training=training, **sections)
    _check_data(cfg)
    return cfg


def _check_data(cfg: RunConfig) -> None:
    from balora.training.data import DATASET_SPLITS, parse_ratio  # loads torch: only when checking data

    d = cfg.data
    if d.splits != "auto" and d.splits not in DATASET_SPLITS:
        raise ConfigError(f"data.splits: {d.splits!r} is not a known dataset; known: "
                          f"{', '.join(['auto', *sorted(DATASET_SPLITS)])}")
    class_options = [name for name, on in (("imbalance_ratio", d.imbalance_ratio is not None),
                                           ("minority_label", d.minority_label is not None),
                                           ("balance_test", d.balance_test)) if on]
    if class_options and cfg.model.task != "nlu":
        raise ConfigError(f"data.{class_options[0]}: only for classification (model.task: nlu), "
                          f"not {cfg.model.task!r}")
    if d.imbalance_ratio is not None:
        try:
            parse_ratio(d.imbalance_ratio)
        except ValueError as error:
            raise ConfigError(f"data.imbalance_ratio: {error}") from None
    elif d.minority_label is not None:
        raise ConfigError("data.minority_label: set only with data.imbalance_ratio (it names the class to subsample)")
    shortest = 2 if cfg.model.task == "nlg" else 1  # NLG: one prompt token and one response token
    if d.max_length < shortest:
        raise ConfigError(f"data.max_length: must be an integer >= {shortest} (tokens per example), got {d.max_length}")
    for name in ("train_limit", "test_limit", "validation_limit"):
        value = getattr(d, name)
        if value is not None and value < 1:
            raise ConfigError(f"data.{name}: must be an integer >= 1 (the first N examples), or null for all, "
                              f"got {value}")
    for name in ("test_fraction", "validation_fraction"):
        value = getattr(d, name)
        if not (math.isfinite(value) and 0 <= value < 1):
            raise ConfigError(f"data.{name}: must be a fraction in [0, 1), got {value}")
    if d.test_fraction + d.validation_fraction >= 1:
        raise ConfigError(f"data.test_fraction + data.validation_fraction must be < 1 (the rest trains), got "
                          f"{d.test_fraction} + {d.validation_fraction}")
    if d.min_label_count < 0:
        raise ConfigError(f"data.min_label_count: must be an integer >= 0 (0 = no minimum), got {d.min_label_count}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. training.max_steps=20 or method=lora")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error.problem})") from None
    return key.split("."), coerce_numbers(value)


def coerce_numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads "1e-3" as a string; a user who writes it means the number."""
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: coerce_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [coerce_numbers(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw config mapping (checked later with the rest)."""
    result = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(result, ".".join(path), value)
        except ValueError as error:
            raise ConfigError(f"override {text!r}: {str(error).split(' (')[0]}") from None
    return result


def preset_path(name: str) -> Path:
    """A run configuration shipped with the package (the repository's configs/ points at the same files)."""
    return Path(str(resources.files("balora") / "configs" / name))


def preset_names() -> list[str]:
    """The names of the packaged presets (``nlu-rotten-tomatoes-minilm``, ...), sorted."""
    folder = resources.files("balora") / "configs"
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def find_config(name: str | Path) -> Path:
    """``name`` if that file exists, else the packaged preset of that name (``NAME`` or ``NAME.yaml``, as
    ``balora presets`` lists them); a path that is neither is returned as given (its reader says so)."""
    path = Path(name)
    if path.exists() or len(path.parts) != 1:
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    return preset_path(f"{stem}.yaml") if stem in preset_names() else path


def read_yaml(path: str | Path) -> Any:
    """A YAML file with "1e-3"-style strings read as numbers; a syntax error names the file and line."""
    path = Path(path)
    try:
        return coerce_numbers(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(error, 'problem', error)})") from None


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run configuration (a file, or the name of a packaged preset when no such file exists),
    apply overrides, check everything."""
    path = find_config(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such configuration file (nor a packaged preset; `balora presets` lists them: "
                          f"{', '.join(preset_names())})")
    data = read_yaml(path) or {}
    try:
        return run_config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration (every value used) as YAML, atomically."""
    write_yaml(path, cfg.to_dict())
