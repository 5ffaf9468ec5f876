"""Checks that need more than the YAML itself, run by `train_run` before the model loads and before
anything is written, so that a bad value costs seconds, not a model load, and leaves no run directory
behind. Each failure names the option (its YAML path) and what to do.

* ``training``: the options go through ``transformers.TrainingArguments`` itself (with a throwaway
  output directory), and ``training.report_to`` must name installed integrations.
* device and precision: ``training.bf16`` / ``fp16`` and a half-precision ``model.dtype`` need an
  accelerator; on a CPU-only machine (or with ``training.use_cpu``) they are refused.
* ``model.name``: an asset that exists, a local directory, or something that looks like a hub id; its
  configuration (``AutoConfig``, no weights) must load.
* ``adapter.target_modules`` / ``modules_to_save``: every entry must match a module of the model, built
  on the ``meta`` device from its configuration (no memory, no weights), with PEFT's suffix matching.
* the data: every split is read and checked without a tokenizer (texts are non-empty strings, labels of
  one type, every class in at least ``data.min_label_count`` training rows, evaluation labels known).

The cheap checks of types and ranges live in `balora.training.run_config` (they run when the YAML is
read); these are the ones that need transformers, the model's configuration or the data.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from balora.core.config import ALL_LINEAR, ConfigError
from balora.training.quiet import quiet_warnings
from balora.training.run_config import TRAINING_DEFAULTS, RunConfig

__all__ = ["check_before_loading"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HALF_PRECISION = ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval")
#: report_to integrations with an extra of their own in pyproject.toml (``pip install 'balora[NAME]'``)
REPORT_EXTRAS = ("tensorboard", "wandb")


def check_before_loading(cfg: RunConfig) -> None:
    """Refuse, with a ``ConfigError`` (or a ``DataError`` naming file and line), every configured value
    that would otherwise fail after the model has loaded or train something other than what was asked."""
    _check_device(cfg)
    _check_engine(cfg, os.environ)
    _check_training_arguments(cfg)
    _check_report_to(cfg)
    model_config = _model_config(cfg)
    _check_modules(cfg, model_config)
    _check_data(cfg)


# ---------------------------------------------------------------------------- distributed engine
def _check_engine(cfg: RunConfig, env: Mapping[str, str]) -> None:
    """What `accelerate launch` set up (its environment variables), against what balora can do there."""
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("FSDP version 1 is not supported (its flat parameters hide the adapter's tensors from "
                          "the reference snapshot); set fsdp_version: 2 in the accelerate config, as "
                          "`balora launch-config fsdp2` does")
    if fsdp and env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ConfigError("fsdp_cpu_ram_efficient_loading: true leaves the weights of ranks > 0 on the meta device "
                          "while the adapter is built, so PiSSA's SVD and the step-0 reference would be wrong there; "
                          "set fsdp_cpu_ram_efficient_loading: false in the accelerate config")
    # DeepSpeed ZeRO-3 is served: the snapshot is swapped in through DeepSpeed's own gather
    # (balora.core.reference.zero3_swapped_in) and the logit-free path falls back to full logits.
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if cfg.model.quantize is not None:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"model.quantize: {cfg.model.quantize}-bit bases need bitsandbytes: "
                              "pip install 'balora[quantization]' (or remove model.quantize)")
        if fsdp or deepspeed:
            raise ConfigError("model.quantize: a quantised base is supported in one process or under DDP only "
                              "(balora's FSDP2 / DeepSpeed paths are not tested with bitsandbytes layers); "
                              "launch with `balora launch-config ddp` or remove model.quantize")

# ---------------------------------------------------------------------------- device and precision
def accelerator() -> str | None:
    """The accelerator torch can train on here (``cuda``, ``xpu``, ``mps``), or ``None``: CPU only."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX), so that
    ``training.bf16`` (autocast to bfloat16 around float32 weights) speeds CPU training up."""
    import torch  # preflight runs before the model loads, torch is already imported by then

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


def _check_device(cfg: RunConfig) -> None:
    training = cfg.training_arguments()
    if training.get("use_cpu"):
        where = "training.use_cpu is true"
    elif accelerator() is None:
        where = "this machine has no GPU"
    else:
        return
    for key in _HALF_PRECISION:
        if not training.get(key):
            continue
        if key == "bf16" and cpu_has_bf16():
            continue  # mixed precision, float32 weights: ~1.9x faster steps on such a CPU (docs/benchmarks.md)
        needs, lacks = "a GPU", ""
        if key == "bf16":
            needs, lacks = "a GPU or a CPU with bfloat16", " and this CPU lacks native bfloat16 (AVX512-BF16 / AMX)"
        raise ConfigError(f"training.{key}: half-precision training needs {needs}, and this run is on the CPU "
                          f"({where}){lacks}; remove training.{key} (the CPU trains in float32)")
    if cfg.model.dtype != "float32":
        raise ConfigError(f"model.dtype: {cfg.model.dtype} weights need a GPU, and this run is on the CPU ({where}); "
                          "set model.dtype: float32")


# ---------------------------------------------------------------------------- TrainingArguments
def _check_training_arguments(cfg: RunConfig) -> None:
    """Build ``TrainingArguments`` once, as `train_run` will; its ValueError / TypeError names the option."""
    from transformers import TrainingArguments

    options = cfg.training_arguments()
    with tempfile.TemporaryDirectory(prefix="balora-preflight-") as scratch:
        def build(**kwargs: Any) -> None:
            with quiet_warnings():  # `train_run` builds them again: its warnings, once
                TrainingArguments(output_dir=scratch, disable_tqdm=True, **kwargs)

        try:
            build(**options)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"{_training_key(str(error), cfg.training, build)}: {_first_line(error)}") from None


def _training_key(message: str, configured: dict[str, Any], build: Any) -> str:
    """``training.<key>``: the configured option the message names (the longest match), else the first
    one that fails on its own (with balora's defaults), else ``training``."""
    named = [key for key in configured
             if re.search(rf"(?<![A-Za-z0-9_]){re.escape(key)}(?![A-Za-z0-9_])", message)]
    if named:
        return f"training.{max(named, key=len)}"
    for key, value in configured.items():
        try:
            build(**{**TRAINING_DEFAULTS, key: value})
        except (ValueError, TypeError):
            return f"training.{key}"
    return "training"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _check_report_to(cfg: RunConfig) -> None:
    report_to = cfg.training_arguments().get("report_to")
    if report_to is None:
        return
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n for n in names if n not in ("none", "all")]  # "all": whatever is installed
    if not names:
        return
    from transformers.integrations import integration_utils

    known = getattr(integration_utils, "INTEGRATION_TO_CALLBACK", {})
    available = set(integration_utils.get_available_reporting_integrations())
    for name in names:
        if known and name not in known:
            raise ConfigError(f"training.report_to: {name!r} is not a transformers integration; known: "
                              f"{', '.join(sorted(known))} (or [] for none)")
        if name not in available:
            extra = f"pip install 'balora[{name}]'" if name in REPORT_EXTRAS else f"pip install {name}"
            raise ConfigError(f"training.report_to: {name!r} is not installed here; install it ({extra}) "
                              "or drop it from training.report_to ([] reports nowhere)")


# ---------------------------------------------------------------------------- the model
def _model_config(cfg: RunConfig) -> Any:
    """``model.name`` resolved and its configuration loaded (no weights)."""
    from transformers import AutoConfig

    from balora.assets import AssetError, resolve

    name = cfg.model.name
    offline = ("Offline, use asset:smollm2 or asset:minilm after `balora assets fetch`, or a local "
               "directory of a saved model")
    try:
        path = resolve(name)
    except ValueError as error:  # an unknown asset name; an unfetched one is AssetMissingError (OSError)
        raise ConfigError(f"model.name: {error}") from None
    except (AssetError, OSError) as error:
        raise ConfigError(f"model.name: {error}") from None
    local = Path(path).expanduser()
    if not local.exists():
        if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
            raise ConfigError(f"model.name: {name!r} is neither a local directory nor a hub id "
                              f"(organisation/model). {offline}")
    elif not local.is_dir():
        raise ConfigError(f"model.name: {name!r} is a file; give the directory of a saved model "
                          "(config.json, weights, tokenizer)")
    try:
        return AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name: cannot load the configuration of {name!r} ({_first_line(error)}). "
                          f"{offline}") from None


def _module_names(cfg: RunConfig, model_config: Any) -> list[str]:
    """The model's module names, from a copy built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if cfg.model.task == "nlu" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    except ValueError as error:  # e.g. an encoder-only configuration for a causal LM
        kind = "sequence classification" if cfg.model.task == "nlu" else "causal language modelling"
        raise ConfigError(f"model.task: {cfg.model.name!r} cannot be built for {kind} ({_first_line(error)}); "
                          "check model.task (nlu: classification, nlg: generation) and model.name") from None
    return [name for name, _ in model.named_modules() if name]


def matches_module(target: str, names: list[str]) -> bool:
    """PEFT's matching of a ``target_modules`` entry: a module name equal to it, or ending in ``.target``."""
    return any(name == target or name.endswith(f".{target}") for name in names)


def _check_modules(cfg: RunConfig, model_config: Any) -> None:
    adapter = cfg.adapter
    targets = adapter.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        targets = None  # PEFT finds the linear layers itself (every model has some)
    if not targets and not adapter.modules_to_save:
        return
    names = _module_names(cfg, model_config)
    if isinstance(targets, str):  # PEFT: a regular expression that must match a whole module name
        if not any(re.fullmatch(targets, name) for name in names):
            raise ConfigError(f"adapter.target_modules: the regular expression {targets!r} matches no module of "
                              f"{cfg.model.name!r} (a string must match a whole name, e.g. "
                              f"'.*\\.(query|value)'; a list matches name suffixes); its module names "
                              f"end in: {', '.join(_leaves(names))}")
    for option in ("target_modules", "modules_to_save"):
        wanted = getattr(adapter, option)
        missing = [t for t in (wanted if isinstance(wanted, list) else []) if not matches_module(t, names)]
        if missing:
            raise ConfigError(f"adapter.{option}: {', '.join(map(repr, missing))} "
                              f"{'matches' if len(missing) == 1 else 'match'} no module of {cfg.model.name!r}; "
                              f"its module names end in: {', '.join(_leaves(names))}")


def _leaves(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})


# ---------------------------------------------------------------------------- the data
def _check_data(cfg: RunConfig) -> None:
    """Read the configured splits and check their records (no tokenizer needed); `train_run` reads them
    again when it builds the examples."""
    from balora.training import data as D
    from balora.training.data.classification import check_label_counts, classification_fields
    from balora.training.data.instruction import instruction_fields
    from balora.training.data.readers import check_label_kinds, record_where
    from balora.training.run import raw_splits

    d = cfg.data
    parts = raw_splits(cfg)
    if not parts["train"]:
        raise D.DataError(f"{d.source}: the training split is empty")
    names = [name for name in ("train", "validation", "test") if parts.get(name)]
    if cfg.model.task == "nlg":
        icfg = D.InstructionDataConfig(query_field=d.query_field, response_field=d.response_field,
                                       context_field=d.context_field, template=d.template,
                                       max_length=max(d.max_length, 2))
        for name in names:
            instruction_fields(parts[name], icfg, f"{d.source}[{name}]")
        return
    ccfg = D.ClassificationDataConfig(text_field=d.text_field, text_pair_field=d.text_pair_field,
                                      label_field=d.label_field, max_length=d.max_length)
    labels = {}
    for name in names:
        _, _, labels[name] = classification_fields(parts[name], ccfg, f"{d.source}[{name}]")
    check_label_kinds(parts["train"], labels["train"], f"{d.source}[train]", d.label_field, mixed_numbers=False)
    check_label_counts(parts["train"], labels["train"], d.min_label_count, f"{d.source}[train]", d.label_field)
    if any(isinstance(x, float) for x in labels["train"]):
        return  # regression: any number is a valid target
    known = set(labels["train"])
    for name in names[1:]:
        for i, lab in enumerate(labels[name]):
            if lab not in known:
                where = record_where(parts[name], i, f"{d.source}[{name}]")
                raise D.DataError(f"{where}: label {lab!r} of the {name} split never occurs in the training split "
                                  f"(its labels: {', '.join(map(repr, sorted(known, key=str)))}); check the "
                                  "label, or data.label_field")
