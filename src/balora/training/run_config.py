"""The YAML run configuration of `balora train`: sections that mirror the library's dataclasses,
``key.path=value`` overrides, and strict checking (unknown keys and wrong types name the key's path).

    method: ba-lora            # lora | pissa | ba-lora | lora-reg | dora | rslora
    model:   {name: asset:minilm, task: nlu}
    adapter: {r: 8, ...}       # AdapterConfig without `method`
    balora:  {...}             # BALoraConfig without `task` (taken from model.task)
    data:    {...}             # DataConfig
    training: {...}            # any transformers.TrainingArguments field
    eval:    {...}             # EvalConfig
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from balora.core.config import AdapterConfig, BALoraConfig, ConfigError

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class ModelConfig:
    name: str = "asset:minilm"  # hub id, local path or asset:NAME
    task: Literal["nlg", "nlu"] = "nlu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Where the examples come from and how they become tensors (see `balora.training.data`)."""

    source: str = "asset:rotten-tomatoes"  # file, directory, asset:NAME or hub id
    splits: Literal["auto", "rotten-tomatoes", "boolq", "asdiv"] = "auto"
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
    # classification only (balora lab imbalance): subsample the training split (after train_limit)
    # to minority:majority = imbalance_ratio, a number in (0, 1] or "1:9"; seeded by split_seed
    imbalance_ratio: float | str | None = None
    minority_label: str | int | bool | None = None  # default: the least frequent training label
    balance_test: bool = False  # subsample test and validation to equal class counts (seeded)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # extra evaluations after training (balora eval)
    limit: int | None = None
    before_training: bool = False  # also evaluate the untuned model on the test split
    batch_size: int = 64
    max_new_tokens: int = 256


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "eval": EvalConfig}


@dataclass
class RunConfig:
    method: str = "ba-lora"
    output_dir: str = "runs/default"
    save_merged: bool = False  # also write merged/ (the full fine-tuned model)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: dict[str, Any] = field(default_factory=dict)
    balora: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(method=self.method, **self.adapter)  # type: ignore[arg-type]

    def balora_config(self) -> BALoraConfig | None:
        """The regularisers for ba-lora and lora-reg; ``None`` (task loss alone) for the baselines."""
        if not self.adapter_config().regularised:
            return None
        return BALoraConfig(task=self.model.task, **self.balora)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(key[:6])][:5]
            raise ConfigError(
                f"training.{key}: not a transformers.TrainingArguments option"
                + (f" (did you mean {', '.join(sorted(close))}?)" if close else "")
            )


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and check a `RunConfig`; errors name the option's path (e.g. ``balora.lambda_svd``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the run configuration must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown section; known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            kwargs[key] = _build_dataclass(SECTIONS[key], value or {}, key)
        elif key in ("adapter", "balora", "training"):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of options, got {type(value).__name__}")
            kwargs[key] = dict(value or {})
        else:
            annotation = typing.get_type_hints(RunConfig)[key]
            if not _type_ok(value, annotation):
                raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
            kwargs[key] = value
    cfg = RunConfig(**kwargs)
    _check_fields(AdapterConfig, cfg.adapter, "adapter", exclude=("method",))
    _check_fields(BALoraConfig, cfg.balora, "balora", exclude=("task",))
    _check_training(cfg.training)
    _check_data(cfg)
    try:
        cfg.adapter_config()
        BALoraConfig(task=cfg.model.task, **cfg.balora)
    except ConfigError as error:  # re-label the dataclass name with the YAML path
        message = str(error).replace("AdapterConfig.method", "method").replace("AdapterConfig.", "adapter.")
        raise ConfigError(message.replace("BALoraConfig.", "balora.")) from None
    return cfg


def _check_data(cfg: RunConfig) -> None:
    from balora.training.data import parse_ratio

    d = cfg.data
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
    return key.split("."), _numbers(value)


def _numbers(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads "1e-3" as a string; a user who writes it means the number."""
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw config mapping (checked later with the rest)."""
    result = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(path[: depth + 1])} is not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return result


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run configuration, apply overrides, check everything."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        data = _numbers(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(error, 'problem', error)})") from None
    try:
        return run_config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def dump_run_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
