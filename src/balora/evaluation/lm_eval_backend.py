"""``balora eval --backend lm-eval``: EleutherAI's lm-evaluation-harness as a second backend.

The model is loaded by balora (:func:`balora.evaluation.generation.load_for_eval`) and handed to
lm-eval as an object, ``HFLM(pretrained=<model>, tokenizer=<tokenizer>)``, rather than as
``--model hf pretrained=BASE,peft=ADAPTER``. PEFT's ``from_pretrained`` does rebuild a PiSSA adapter's
residual from the untouched base, but for the randomised ``pissa_niter_N`` initialisation that rebuild
draws random numbers: balora's :func:`balora.core.export.load_trained` seeds it with the seed recorded
at training time, lm-eval's ``peft=`` path does not, and would evaluate a different model. Loading
through balora also keeps the run's dtype and its base model spec (``asset:NAME``).

Tasks: ``gsm8k`` and ``crows_pairs`` are offline task configs shipped in
``balora/evaluation/lm_eval_tasks/`` (balora's data files, prompt and grading, so both backends agree on
the same items); any other name (``hellaswag``, ``arc_easy``, ...; ``lm-eval:gsm8k`` for lm-eval's own
GSM8K) is one of lm-eval's tasks, loaded by name from the hub (online only).

Writes ``lm_eval.json`` (lm-eval's results per task, versions, settings) and
``records/lm-eval_<task>.jsonl`` (lm-eval's per-item samples) into the output directory.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from balora.utils import versions, write_json, write_jsonl

__all__ = ["LM_EVAL_MISSING", "LOCAL_TASKS", "evaluate_lm_eval", "lm_eval_available", "local_task_config"]

logger = logging.getLogger(__name__)

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
# balora task name -> its offline lm-eval task config in lm_eval_tasks/
LOCAL_TASKS = {"gsm8k": "balora_gsm8k.yaml", "crows_pairs": "balora_crows_pairs.yaml"}
LM_EVAL_MISSING = ("the lm-eval backend needs lm-evaluation-harness: pip install 'balora[lm-eval]' "
                   "(it leaves torch, transformers and peft as they are)")


def lm_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def _default_data(task: str) -> str:
    if task == "gsm8k":
        from balora.evaluation.math_answers import default_gsm8k_path

        return str(default_gsm8k_path())
    from balora.assets import main_file

    return str(main_file("crows-pairs"))


def local_task_config(task: str, data_file: str | None = None) -> dict[str, Any]:
    """The shipped lm-eval config of a balora task (``gsm8k``, ``crows_pairs``) as a dict, its
    ``!function`` entries resolved and its data file set (default: balora's own for that task)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASK_DIR / LOCAL_TASKS[task])
    path = Path(data_file or _default_data(task))
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task {task}: data file not found: {path}")
    config["dataset_kwargs"] = {**config.get("dataset_kwargs", {}), "data_files": {"test": str(path.resolve())}}
    return config


def _task_specs(tasks: Sequence[str], data: dict[str, str]) -> tuple[list[Any], dict[str, str]]:
    specs: list[Any] = []
    names: dict[str, str] = {}  # lm-eval task name -> the name the user gave
    for task in tasks:
        if task in LOCAL_TASKS:
            config = local_task_config(task, data.get(task))
            specs.append(config)
            names[config["task"]] = task
        else:
            name = task.removeprefix("lm-eval:")
            specs.append(name)
            names[name] = task
    return specs, names


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def evaluate_lm_eval(model_spec: Any, tasks: Sequence[str], *, limit: int | None = None,
                     batch_size: int = 8, max_new_tokens: int | None = None, data: dict[str, str] | None = None,
                     out_dir: str | Path | None = None, device: str | None = None, seed: int = 0,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``tasks`` through lm-eval's ``simple_evaluate`` on a model balora loads (a run directory,
    adapter, model directory, hub id or ``asset:NAME``; or an :class:`EvalModel`). Returns (and writes
    as ``lm_eval.json`` when ``out_dir`` is given; default for a run: ``RUN/eval``)
    ``{"model", "model_kind", "backend": "lm-eval", "tasks": {task: {"metrics": {...}}}, ...}``."""
    if not lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from balora.evaluation.generation import EvalModel, load_for_eval

    say = progress or (lambda msg: logger.info("%s", msg))
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise ValueError("no tasks given")
    specs, given = _task_specs(names, data or {})  # data files checked before the model loads
    started = time.perf_counter()
    if isinstance(model_spec, EvalModel):
        ev = model_spec
    else:
        say(f"loading {model_spec}")
        ev = load_for_eval(str(model_spec), device=device)
    lm = HFLM(pretrained=ev.model, tokenizer=ev.tokenizer, batch_size=batch_size)
    gen_kwargs = {"max_gen_toks": max_new_tokens} if max_new_tokens else None
    say(f"lm-eval {lm_eval.__version__ if hasattr(lm_eval, '__version__') else ''}: {', '.join(names)}")
    results = lm_eval.simple_evaluate(model=lm, tasks=specs, limit=limit, gen_kwargs=gen_kwargs,
                                      log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    report: dict[str, Any] = {"model": ev.spec, "model_kind": ev.kind, "base_model": ev.base_spec,
                              "backend": "lm-eval", "tasks": {}, "versions": versions(),
                              "settings": {"limit": limit, "batch_size": batch_size,
                                           "max_new_tokens": max_new_tokens, "seed": seed,
                                           "data": {t: data.get(t) for t in names} if data else {}}}
    samples = results.get("samples", {}) if results else {}
    for name, metrics in (results or {}).get("results", {}).items():
        task = given.get(name, name)
        report["tasks"][task] = {"lm_eval_task": name, "metrics": _jsonable(metrics),
                                 "n_samples": _jsonable(results.get("n-samples", {}).get(name))}
    report["wall_seconds"] = round(time.perf_counter() - started, 3)
    out = Path(out_dir) if out_dir is not None else (Path(ev.spec) / "eval" if ev.kind == "run" else None)
    if out is not None:
        for name, rows in samples.items():
            write_jsonl(out / "records" / f"lm-eval_{given.get(name, name)}.jsonl", [_jsonable(r) for r in rows])
        write_json(out / "lm_eval.json", report)
        report["written"] = str(out / "lm_eval.json")
    return report
