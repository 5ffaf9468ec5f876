"""One training run, end to end: config → model + data → trainer → artefacts → evaluation → metrics.json.

The run directory holds::

    config.yaml          the resolved configuration (every default filled in)
    checkpoints/         Trainer checkpoints (resume with --resume)
    adapter/             the PEFT adapter (PiSSA: load with balora.load_trained on the untouched base)
    lora_converted/      plain LoRA for the untouched base model (PeftModel.from_pretrained)
    merged/              the full fine-tuned model (only with save_merged: true, or later with balora export --merge)
    label_map.json       NLU: label → class id
    log_history.json     every logged step (task loss, each raw and λ-weighted term, λ)
    metrics.json         test metrics, train time, peak memory, data statistics, versions
    predictions/         NLU classification: per-item test predictions, test.json (untuned.json too with
                         eval.before_training): {"labels": class names in label_map order, "label": true
                         label per item, "predicted": predicted label per item, "logits": [[...], ...]
                         (5 significant digits)}, items in test-split order (paired statistics, AUROC)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from balora.assets import resolve
from balora.core.adapters import build_peft_model, trainable_parameter_count
from balora.core.config import ConfigError
from balora.core.export import save_adapter, save_converted_lora, save_merged
from balora.training import data as D
from balora.training.callbacks import BALoraProgressCallback
from balora.training.metrics import classification_metrics, regression_metrics
from balora.training.run_config import RunConfig, dump_run_config
from balora.training.trainer import BALoraTrainer
from balora.utils import peak_rss_mb, versions, write_json

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    train: list[dict]
    test: list[dict]
    validation: list[dict]
    collator: Any
    label_map: dict[str, int] | None
    stats: dict[str, Any]


# ---------------------------------------------------------------------------- data
def raw_splits(cfg: RunConfig, info: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """The configured splits after limits and class (im)balancing; ``info`` receives what the
    balancing did."""
    d = cfg.data
    if d.splits == "auto":
        parts = D.load_splits(d.source, seed=d.split_seed, validation_fraction=d.validation_fraction,
                              test_fraction=d.test_fraction)
    else:  # a registered dataset (D.DATASET_SPLITS) with splits of its own
        parts = D.dataset_splits(d.splits, seed=d.split_seed)
    if d.train_limit is not None:
        parts["train"] = parts["train"][: d.train_limit]
    if d.test_limit is not None:
        parts["test"] = parts["test"][: d.test_limit]
    balance = balance_splits(parts, d)
    if info is not None:
        info.update(balance)
    return parts


def balance_splits(parts: dict[str, list[dict]], d: Any) -> dict[str, Any]:
    """data.imbalance_ratio on the training split, data.balance_test on test and validation (in
    place, after the limits); returns what was done, for the run's data statistics."""
    info: dict[str, Any] = {}
    if d.imbalance_ratio is not None and parts.get("train"):
        parts["train"], info["imbalance"] = D.imbalance_subsample(
            parts["train"], label_field=d.label_field, ratio=D.parse_ratio(d.imbalance_ratio),
            minority_label=d.minority_label, seed=d.split_seed, source_name=f"{d.source}[train]")
        info["imbalance"]["requested"] = d.imbalance_ratio
    if d.balance_test:
        for name in ("test", "validation"):
            if parts.get(name):  # a separate random stream per split
                parts[name], _ = D.balance_classes(parts[name], label_field=d.label_field, seed=d.split_seed,
                                                   purpose=name, source_name=f"{d.source}[{name}]")
        info["balanced"] = [name for name in ("test", "validation") if parts.get(name)]
    return info


def prepare_data(cfg: RunConfig, tokenizer: Any) -> PreparedData:
    d = cfg.data
    balance: dict[str, Any] = {}
    parts = raw_splits(cfg, balance)
    if not parts["train"]:
        raise D.DataError(f"{d.source}: the training split is empty")
    stats: dict[str, Any] = {name: len(rows) for name, rows in parts.items()}
    stats.update(balance)
    if cfg.model.task == "nlu":
        if d.imbalance_ratio is not None or d.balance_test:  # what the model saw and was scored on
            stats["class_counts"] = {name: D.class_counts(rows, d.label_field) for name, rows in parts.items() if rows}
        ccfg = D.ClassificationDataConfig(text_field=d.text_field, text_pair_field=d.text_pair_field,
                                          label_field=d.label_field, max_length=d.max_length)
        train, label_map = D.build_classification_dataset(parts["train"], tokenizer, ccfg,
                                                          source_name=f"{d.source}[train]")
        built = {name: D.build_classification_dataset(parts[name], tokenizer, ccfg, label_map, f"{d.source}[{name}]")[0]
                 for name in ("validation", "test") if parts.get(name)}
        collator = D.classification_collator(tokenizer)
    else:
        icfg = D.InstructionDataConfig(query_field=d.query_field, response_field=d.response_field,
                                       context_field=d.context_field, template=d.template, max_length=d.max_length)
        train, train_stats = D.build_instruction_dataset(parts["train"], tokenizer, icfg,
                                                         source_name=f"{d.source}[train]")
        stats["train_tokens"] = train_stats
        built = {}
        for name in ("validation", "test"):
            if parts.get(name):
                built[name], stats[f"{name}_tokens"] = D.build_instruction_dataset(
                    parts[name], tokenizer, icfg, source_name=f"{d.source}[{name}]")
        label_map = None
        collator = D.InstructionCollator(tokenizer)
    return PreparedData(train, built.get("test", []), built.get("validation", []), collator, label_map, stats)


# ---------------------------------------------------------------------------- model
def load_tokenizer(cfg: RunConfig) -> Any:
    path = resolve(cfg.model.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.model.revision,
                                                  trust_remote_code=cfg.model.trust_remote_code)
    except OSError as error:
        raise OSError(f"model.name={cfg.model.name!r}: cannot load its tokenizer ({error}). Offline, use "
                      "asset:smollm2 or asset:minilm after `balora assets fetch`, or a local directory.") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: RunConfig, label_map: dict[str, int] | None = None) -> torch.nn.Module:
    """The pre-trained model (a fresh, seeded classification head for NLU)."""
    path = resolve(cfg.model.name)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, cfg.model.dtype), "revision": cfg.model.revision,
                              "trust_remote_code": cfg.model.trust_remote_code}
    try:
        if cfg.model.task == "nlu":
            num_labels = len(label_map) if label_map else 1
            id2label = {i: str(lab) for lab, i in (label_map or {}).items()} or None
            set_seed(cfg.seed)  # the head's initialisation
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, id2label=id2label,
                label2id={v: k for k, v in id2label.items()} if id2label else None, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise OSError(f"model.name={cfg.model.name!r}: cannot load the model ({error}). Offline, use "
                      "asset:smollm2 or asset:minilm after `balora assets fetch`, or a local directory.") from error


# ---------------------------------------------------------------------------- evaluation
def _significant(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


@torch.no_grad()
def evaluate_split(trainer: Any, dataset: list[dict], task: str, label_map: dict[str, int] | None,
                   predictions: dict[str, Any] | None = None) -> dict[str, Any]:
    """NLU: accuracy, macro-F1, MCC, per-class recall. NLG: mean per-token loss of the responses.

    ``predictions`` (NLU classification): filled with the per-item record of ``predictions/<split>.json``
    (labels, label, predicted, logits; see the module doc)."""
    if not dataset:
        return {}
    if task == "nlu":
        output = trainer.predict(dataset)
        logits = torch.as_tensor(output.predictions)
        labels = torch.as_tensor(output.label_ids)
        if label_map is None:
            return regression_metrics(labels.tolist(), logits.reshape(-1).tolist())
        names = {i: lab for lab, i in label_map.items()}
        preds = logits.argmax(-1).tolist()
        true = [names[int(i)] for i in labels.tolist()]
        predicted = [names[int(i)] for i in preds]
        if predictions is not None:
            predictions.update(labels=list(label_map), label=true, predicted=predicted,
                               logits=[[_significant(v) for v in row] for row in logits.float().tolist()])
        return classification_metrics(true, predicted, labels=list(label_map))
    metrics = trainer.evaluate(dataset, metric_key_prefix="test")
    return {"loss": metrics["test_loss"], "perplexity": float(torch.exp(torch.tensor(metrics["test_loss"])))}


# ---------------------------------------------------------------------------- the run
def latest_checkpoint(checkpoints: Path) -> str | None:
    found = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(found[-1]) if found else None


def train_run(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True,
              callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, save the artefacts and evaluate; returns what it writes to ``metrics.json``.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. ``balora lab spectrum``'s
    snapshots)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoints = out / "checkpoints"
    resume_from = latest_checkpoint(checkpoints) if resume else None
    if resume and resume_from is None:
        logger.warning("--resume: no checkpoint in %s; starting from step 0", checkpoints)
    elif not resume and latest_checkpoint(checkpoints):
        raise FileExistsError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run, "
                              f"or choose another output_dir=...")
    if int(os.environ.get("RANK", "0")) == 0:
        dump_run_config(cfg, out / "config.yaml")

    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    if data.label_map is not None:
        write_json(out / "label_map.json", data.label_map)
    model = load_base_model(cfg, data.label_map)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    training = cfg.training_arguments()
    adapter = cfg.adapter_config()
    peft_model = build_peft_model(model, adapter, cfg.model.task)
    trainable, total = trainable_parameter_count(peft_model)

    args = TrainingArguments(output_dir=str(checkpoints), disable_tqdm=True, **training)
    trainer = BALoraTrainer(model=peft_model, args=args, train_dataset=data.train,
                            eval_dataset=data.validation or None, data_collator=data.collator,
                            balora_config=cfg.balora_config())
    if show_progress:  # our bar shows the loss and each term; the Trainer's printer would repeat whole dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(BALoraProgressCallback())
    for callback in callbacks:
        trainer.add_callback(callback)

    metrics: dict[str, Any] = {"method": cfg.method, "model": cfg.model.name, "task": cfg.model.task,
                               "trainable_parameters": trainable, "total_parameters": total, "data": data.stats}
    if cfg.eval.validation and not data.validation:
        raise ConfigError(f"eval.validation: {cfg.data.source} gives no validation split; set "
                          "data.validation_fraction (carved from the training data, seeded by data.split_seed)")
    predictions: dict[str, dict[str, Any]] = {"untuned": {}, "test": {}}  # NLU classification: per item
    if cfg.eval.before_training and cfg.eval.test:
        metrics["untuned"] = evaluate_split(trainer, data.test, cfg.model.task, data.label_map,
                                            predictions["untuned"])
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    metrics["train_seconds"] = time.perf_counter() - train_started
    metrics["train_loss"] = result.training_loss
    metrics["global_step"] = trainer.state.global_step

    if cfg.eval.validation:  # model selection reads this split, never the test split
        metrics["validation"] = evaluate_split(trainer, data.validation, cfg.model.task, data.label_map)
    if cfg.eval.test:  # every rank takes part
        metrics["test"] = evaluate_split(trainer, data.test, cfg.model.task, data.label_map, predictions["test"])
    if not trainer.is_world_process_zero():  # under accelerate launch, rank 0 alone writes the artefacts
        return metrics
    save_adapter(peft_model, out / "adapter", {"method": cfg.method, "init_seed": adapter.init_seed,
                                                "pissa_niter": adapter.pissa_niter, "base_model": cfg.model.name})
    tokenizer.save_pretrained(out / "adapter")
    save_converted_lora(peft_model, out / "lora_converted")
    if cfg.save_merged:
        save_merged(peft_model, out / "merged", tokenizer)
    write_json(out / "log_history.json", trainer.state.log_history)
    for split, items in predictions.items():
        if items:
            write_json(out / "predictions" / f"{split}.json", items)
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["versions"] = versions()
    metrics["command"] = " ".join(sys.argv)
    write_json(out / "metrics.json", metrics)
    return metrics
