"""One training run, end to end: config → model + data → trainer → artefacts → evaluation → metrics.json.

The run directory holds::

    config.yaml          the resolved configuration (every default filled in), written once the checks pass
    status.json          running / finished / failed, the phase (preparing, training, evaluating, saving),
                         the reason of a failure, timestamps; written atomically at each phase
    .lock                pid, host and start time of the process using the directory (O_EXCL; a second
                         run is refused, a dead process's lock is taken over)
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

import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, TrainerState

from balora.assets import resolve
from balora.core.adapters import build_peft_model, trainable_parameter_count
from balora.core.config import ConfigError
from balora.core.export import (
    load_trained,
    save_adapter,
    save_converted_lora,
    save_converted_lora_from_adapter,
    save_merged,
)
from balora.core.reference import ReferenceSnapshot
from balora.core.sharded import full_state_dict, is_sharded
from balora.training import data as D
from balora.training.callbacks import BALoraProgressCallback
from balora.training.faults import maybe_fail
from balora.training.metrics import classification_metrics, regression_metrics
from balora.training.model_card import adapter_metadata, build_model_card, hub_model_id_default
from balora.training.preflight import accelerator, check_before_loading
from balora.training.quantized import quantize_base
from balora.training.quiet import quiet_transformers, quiet_warnings
from balora.training.reference_store import IndexedCollator, store_for_run, with_example_index
from balora.training.run_config import TRAINING_DEFAULTS, RunConfig, dump_run_config, run_config_from_dict
from balora.training.trainer import (
    BALoraTrainer,
    latest_complete_checkpoint,
    nonfinite_trainable,
    sorted_checkpoints,
)
from balora.utils import (
    LOCK_FILE,
    STATUS_FILE,
    CorruptFileError,
    FileLock,
    now_iso,
    peak_rss_mb,
    read_json,
    read_status,
    versions,
    write_json,
    write_status,
    write_text_atomic,
)

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
    if d.validation_limit is not None and parts.get("validation"):
        parts["validation"] = parts["validation"][: d.validation_limit]
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
            # regression (no label map): no id2label at all; transformers refuses id2label=None
            id2label = {i: str(lab) for lab, i in (label_map or {}).items()}
            if id2label:
                kwargs.update(id2label=id2label, label2id={v: k for k, v in id2label.items()})
            set_seed(cfg.seed)  # the head's initialisation
            with quiet_transformers():  # its load report: the fresh head is "missing", by design
                return AutoModelForSequenceClassification.from_pretrained(
                    path, num_labels=num_labels, **kwargs)
        with quiet_transformers():
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
    """NLU: accuracy, balanced accuracy, macro-F1, MCC, per-class recall, AUROC. NLG: mean per-token loss
    of the responses.

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
        return classification_metrics(true, predicted, labels=list(label_map), scores=logits.float().tolist())
    metrics = trainer.evaluate(dataset, metric_key_prefix="test")
    return {"loss": metrics["test_loss"], "perplexity": float(torch.exp(torch.tensor(metrics["test_loss"])))}


# ---------------------------------------------------------------------------- the run
def latest_checkpoint(checkpoints: Path) -> str | None:
    """The latest *complete* checkpoint (`balora.training.trainer.checkpoint_problem`): one left
    incomplete by a kill during its save is passed over."""
    found, _ = latest_complete_checkpoint(checkpoints)
    return str(found) if found is not None else None


# What may differ from the stored config.yaml on --resume: where the run lives, how it is logged,
# saved and evaluated, not what is trained. RESUME_MAY_GROW may only increase (train for longer).
RESUME_MAY_CHANGE = ("output_dir", "save_merged", "divergence_factor", "reference_cache", "eval",
                     "training.logging_steps", "training.save_steps", "training.save_total_limit",
                     "training.report_to", "training.logging_dir", "training.disable_tqdm",
                     "training.dataloader_num_workers", "training.per_device_eval_batch_size")
RESUME_MAY_GROW = ("training.max_steps", "training.num_train_epochs")


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix[:-1], old, new)]


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    config = {**config, "training": {**TRAINING_DEFAULTS, **(config.get("training") or {})}}
    return json.loads(json.dumps(config, default=str))  # tuples vs lists


def resume_differences(cfg: RunConfig, run_dir: Path) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between ``cfg`` and the run's stored config.yaml, as
    ``"key.path: old -> new"``; see RESUME_MAY_CHANGE and RESUME_MAY_GROW."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return [], []
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
        stored = run_config_from_dict(stored).to_dict()  # an option added since, with its default, is no change
    except (yaml.YAMLError, ConfigError, TypeError) as error:
        return [f"{path}: cannot be read back ({error})"], []
    refused: list[str] = []
    allowed: list[str] = []
    for key, old, new in _differences(_comparable(stored), _comparable(cfg.to_dict())):
        text = f"{key}: {old!r} -> {new!r}"
        grows = (key in RESUME_MAY_GROW and isinstance(old, (int, float)) and isinstance(new, (int, float))
                 and 0 < old < new)
        if grows or any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE):
            allowed.append(text)
        else:
            refused.append(text)
    return refused, allowed


def finished_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """A finished run's metrics.json (status.json says finished, or there is none: an older run), or
    None: not finished, killed during its last writes, or a metrics.json that does not parse."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    if status is not None and status.get("state") != "finished":
        return None
    try:
        metrics = read_json(run_dir / "metrics.json")
    except (FileNotFoundError, CorruptFileError):
        return None
    return metrics if isinstance(metrics, dict) else None


def _save_dir(target: Path, save: Any) -> None:
    """``save(directory)`` into a temporary sibling, then swapped in: a kill never leaves a half-written
    ``target`` (at worst the previous one, or none)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)


def refuse_trainer_push(cfg: RunConfig) -> None:
    """``training.push_to_hub`` is refused: the Trainer's own push uploads ``checkpoints/`` (optimizer
    states included, no converted LoRA, PEFT's blank card) to a repository named after that folder
    unless ``hub_model_id`` is set. ``balora push`` shares the finished run instead."""
    if cfg.training.get("push_to_hub"):
        repo = cfg.training.get("hub_model_id") or f"<user>/{hub_model_id_default(cfg)}"
        raise ConfigError(f"training.push_to_hub: not supported: the Trainer would upload checkpoints/ (optimizer "
                          f"states included) rather than the adapter and its model card. Remove it, train, then "
                          f"share the run with `balora push {cfg.output_dir} {repo}` (adapter/, lora_converted/ "
                          "and the model card)")


def train_run(cfg: RunConfig, *, resume: bool = False, force: bool = False, show_progress: bool = True,
              callbacks: Sequence[Any] = (), reference_cache_root: Path | None = None) -> dict[str, Any]:
    """Train, save the artefacts and evaluate; returns what it writes to ``metrics.json``.

    The run directory is locked (``.lock``) for the whole run; ``status.json`` says running / finished /
    failed. ``resume``: continue from the latest complete checkpoint (incomplete ones are removed, with
    a warning); a configuration that differs from the stored config.yaml is refused unless ``force``
    (see RESUME_MAY_CHANGE); a finished run is not trained again.
    ``callbacks``: extra ``transformers.TrainerCallback`` objects (e.g. ``balora lab spectrum``'s
    snapshots). ``reference_cache_root``: with ``reference_cache: auto``, keep the cache in
    ``<root>/<identity digest>`` (shared by runs with the same model and data: ``balora compare``)
    instead of ``<output_dir>/reference_cache``. ``cfg.output_dir`` is made absolute (config.yaml stores
    it so: resuming from that file from another working directory continues the same run)."""
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).expanduser().resolve()))
    refuse_trainer_push(cfg)
    check_before_loading(cfg)  # every bad value refused before the model loads and before anything is written
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"output_dir={cfg.output_dir!r}: cannot create the run directory "
                      f"({error.strerror or error})") from None
    rank0 = int(os.environ.get("RANK", "0")) == 0
    lock = FileLock(out / LOCK_FILE, f"output_dir={cfg.output_dir!r}") if rank0 else None
    if lock is not None:
        try:
            lock.acquire()
        except FileExistsError:
            raise
        except OSError as error:
            raise OSError(f"output_dir={cfg.output_dir!r}: cannot lock the run directory "
                          f"({error.strerror or error})") from None
        if lock.took_over is not None:
            logger.warning("%s: took over the lock of process %s, which is no longer running", out,
                           lock.took_over.get("pid"))
    try:
        return _train_locked(cfg, out, rank0, resume=resume, force=force, show_progress=show_progress,
                             callbacks=callbacks, reference_cache_root=reference_cache_root)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: RunConfig, out: Path, rank0: bool, *, resume: bool, force: bool, show_progress: bool,
                  callbacks: Sequence[Any], reference_cache_root: Path | None) -> dict[str, Any]:
    checkpoints = out / "checkpoints"
    previous = read_status(out) or {}
    grew = False
    resume_from: Path | None = None
    if resume:
        refused, allowed = resume_differences(cfg, out)
        if refused and not force:
            raise ConfigError(f"--resume: the configuration differs from {out / 'config.yaml'}: "
                              f"{'; '.join(refused[:8])}. Resume with the stored configuration, choose another "
                              "output_dir=..., or pass --force to continue with the new one")
        if refused:
            logger.warning("--resume --force: continuing with a changed configuration: %s", "; ".join(refused))
        if allowed:
            logger.warning("--resume: changed since the run started: %s", "; ".join(allowed))
        grew = any(text.split(":")[0] in RESUME_MAY_GROW for text in allowed + refused)
        finished = finished_metrics(out)
        if finished is not None and not refused and not allowed:
            logger.warning("--resume: %s already finished (global_step %s); nothing to do", out,
                           finished.get("global_step"))
            return finished
        found, skipped = latest_complete_checkpoint(checkpoints)
        for path, problem in skipped:
            logger.warning("--resume: skipping the incomplete %s (%s: killed during its save); removing it",
                           path, problem)
            if rank0:
                shutil.rmtree(path, ignore_errors=True)
        resume_from = found
        if found is None:
            logger.warning("--resume: no complete checkpoint in %s; starting from step 0", checkpoints)
        else:
            logger.warning("--resume: continuing from %s", found)
    elif sorted_checkpoints(checkpoints):
        raise FileExistsError(f"{checkpoints} already holds checkpoints; pass --resume to continue that run, "
                              f"or choose another output_dir=...")

    def status(state: str, **fields: Any) -> None:
        if rank0:
            write_status(out, state, **fields)

    if rank0:  # only now: a refused command leaves the stored configuration as it was
        dump_run_config(cfg, out / "config.yaml")
        write_json(out / STATUS_FILE, {  # a fresh record, never merged with a previous run's
            "state": "running", "phase": "preparing", "reason": None, "started_at": now_iso(), "updated_at": now_iso(),
            "finished_at": None, "pid": os.getpid(), "host": socket.gethostname(),
            "resumed_from": str(resume_from) if resume_from else None,
            "trained": previous.get("trained") if resume else None})
    try:
        with quiet_warnings():  # the libraries' known, handled warnings (balora.training.quiet); -v shows them
            metrics = _run(cfg, out, resume_from, previous.get("trained") if resume else None, grew, status,
                           show_progress, callbacks, reference_cache_root)
    except BaseException as error:
        status("failed", reason=f"{type(error).__name__}: {error}"[:2000], finished_at=now_iso())
        raise
    status("finished", phase="done", finished_at=now_iso())
    return metrics


def _run(cfg: RunConfig, out: Path, resume_from: Path | None, trained: dict[str, Any] | None, grew: bool,
         status: Any, show_progress: bool, callbacks: Sequence[Any],
         reference_cache_root: Path | None = None) -> dict[str, Any]:
    checkpoints = out / "checkpoints"
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
    if cfg.model.quantize is not None:  # QLoRA / QPiSSA: the base quantised after the adapter's init
        auto = AutoModelForSequenceClassification if cfg.model.task == "nlu" else AutoModelForCausalLM
        device = accelerator() or "cpu"
        peft_model = quantize_base(peft_model, cfg.model.quantize,
                                   lambda path, **kw: auto.from_pretrained(path, device_map=device, **kw),
                                   compute_dtype=getattr(torch, cfg.model.dtype))
    trainable, total = trainable_parameter_count(peft_model)

    if "dataloader_pin_memory" not in cfg.training and accelerator() is None:
        training["dataloader_pin_memory"] = False  # nothing to pin for on a CPU-only machine (torch warns)
    # training.output_dir and training.disable_tqdm are refused when the YAML is read (run_config): balora sets them
    args = TrainingArguments(output_dir=str(checkpoints), disable_tqdm=True, **training)
    # reference_cache (docs/design/reference-cache.md): examples carry their index to fetch their entries
    cache_started = time.perf_counter()
    store = store_for_run(cfg, peft_model, tokenizer, data.train, data.collator, out, args.device,
                          shared_root=reference_cache_root)
    cache_seconds = time.perf_counter() - cache_started
    train_data, collator = ((with_example_index(data.train), IndexedCollator(data.collator)) if store is not None
                            else (data.train, data.collator))
    trainer = BALoraTrainer(model=peft_model, args=args, train_dataset=train_data,
                            eval_dataset=data.validation or None, data_collator=collator,
                            balora_config=cfg.balora_config(), divergence_factor=cfg.divergence_factor,
                            reference_cache=store)
    if show_progress:  # our bar shows the loss and each term; the Trainer's printer would repeat whole dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(BALoraProgressCallback())
    for callback in callbacks:
        trainer.add_callback(callback)

    metrics: dict[str, Any] = {"method": cfg.method, "model": cfg.model.name, "task": cfg.model.task,
                               "trainable_parameters": trainable, "total_parameters": total, "data": data.stats}
    if store is not None:  # seconds: building it here, or only opening one that another run built
        metrics["reference_cache"] = {"path": str(store.path), "seconds": cache_seconds}
    if cfg.eval.validation and not data.validation:
        raise ConfigError(f"eval.validation: {cfg.data.source} gives no validation split; set "
                          "data.validation_fraction (carved from the training data, seeded by data.split_seed)")
    predictions: dict[str, dict[str, Any]] = {"untuned": {}, "test": {}}  # NLU classification: per item
    if cfg.eval.before_training and cfg.eval.test:
        metrics["untuned"] = evaluate_split(trainer, data.test, cfg.model.task, data.label_map,
                                            predictions["untuned"])
    status("running", phase="training")
    saved = TrainerState.load_from_json(str(resume_from / "trainer_state.json")) if resume_from else None
    if saved is not None and not grew and saved.max_steps > 0 and saved.global_step >= saved.max_steps:
        # Training had finished (killed during evaluation or the final save): the Trainer would add a
        # step; load the final checkpoint instead and redo only what follows.
        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = saved
        same = trained is not None and trained.get("global_step") == saved.global_step
        metrics["train_seconds"] = trained.get("train_seconds") if same else 0.0
        metrics["train_loss"] = trained.get("train_loss") if same else None
        if same and trained.get("final_log"):
            trainer.state.log_history.append(trained["final_log"])
    else:
        train_started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        metrics["train_seconds"] = time.perf_counter() - train_started
        metrics["train_loss"] = result.training_loss
    metrics["global_step"] = trainer.state.global_step
    bad, total_tensors = nonfinite_trainable(peft_model)
    if bad:
        raise FloatingPointError(f"BA-LoRA: {bad} of {total_tensors} trainable tensors are non-finite after "
                                 f"training (step {trainer.state.global_step}); nothing saved. Lower the learning "
                                 "rate; checkpoints already written hold finite weights.")
    log = trainer.state.log_history
    status("running", phase="evaluating", trained={
        "global_step": metrics["global_step"], "train_loss": metrics["train_loss"],
        "train_seconds": metrics["train_seconds"], "final_log": log[-1] if log and "train_loss" in log[-1] else None})

    if cfg.eval.validation:  # model selection reads this split, never the test split
        maybe_fail("evaluate")  # testing hook (balora.training.faults)
        metrics["validation"] = evaluate_split(trainer, data.validation, cfg.model.task, data.label_map)
    if cfg.eval.test:  # every rank takes part
        maybe_fail("evaluate")
        metrics["test"] = evaluate_split(trainer, data.test, cfg.model.task, data.label_map, predictions["test"])
    # Under FSDP2 (accelerate launch with an fsdp2 config) the parameters are sharded: every rank gathers
    # the whole state dict (a collective) before rank 0 writes from it.
    sharded = any(is_sharded(p) for p in peft_model.parameters())
    state = full_state_dict(trainer.accelerator.unwrap_model(trainer.model)) if sharded else None
    if not trainer.is_world_process_zero():  # under accelerate launch, rank 0 alone writes the artefacts
        return metrics
    status("running", phase="saving")
    # adapter_config.json names the base by its hub id (asset:NAME → its upstream id), balora_adapter.json
    # keeps model.name too (asset:NAME loads offline); each folder gets the model card (model_card.py)
    meta = adapter_metadata(cfg)
    hub_id = meta["base_model_hub_id"]
    card = build_model_card(cfg, metrics, label_map=data.label_map,
                            target_modules=peft_model.peft_config[peft_model.active_adapter].target_modules)
    _save_dir(out / "adapter", lambda d: (save_adapter(peft_model, d, meta, base_model_name_or_path=hub_id,
                                                       state_dict=state),
                                          tokenizer.save_pretrained(d), write_text_atomic(d / "README.md", card)))
    maybe_fail("final-save")  # testing hook (balora.training.faults)
    if sharded:  # PEFT's conversion and merge change the model: done on a reloaded, unsharded copy
        initial = ReferenceSnapshot.for_peft_model(peft_model)
        _save_dir(out / "lora_converted", lambda d: (save_converted_lora_from_adapter(
            load_base_model(cfg, data.label_map), out / "adapter", d, initial, base_model_name_or_path=hub_id),
            write_text_atomic(d / "README.md", card)))
        if cfg.save_merged:
            _save_dir(out / "merged", lambda d: save_merged(
                load_trained(load_base_model(cfg, data.label_map), out / "adapter"), d, tokenizer))
    else:
        _save_dir(out / "lora_converted", lambda d: (save_converted_lora(peft_model, d, base_model_name_or_path=hub_id),
                                                     write_text_atomic(d / "README.md", card)))
        if cfg.save_merged:
            _save_dir(out / "merged", lambda d: save_merged(peft_model, d, tokenizer))
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
