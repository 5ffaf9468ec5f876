"""``evaluate``: run benchmark tasks on one model and write ``eval.json`` + per-item records.

Tasks (``TASKS``):

* ``gsm8k``: the first ``limit`` problems of the GSM8K test file (deterministic subset).
* ``asdiv``: the held-out test split of ``balora.training.data.asdiv_splits`` (500 problems; never trained on).
* ``math``: a user JSONL file (``problem``, ``solution`` with ``\\boxed{}``, optional ``answer``),
  compared with sympy (``symbolic=True``).
* ``humaneval``: raw prompts (code completion), Codex stop strings, sandboxed pass@k.
* ``forgetting``, ``piqa``, ``crows_pairs``, ``stereoset``, ``bbq``: likelihood scoring, see
  :mod:`balora.evaluation.likelihood`.
* ``boolq``: BoolQ's held-out questions (``dev.jsonl``, never trained on) in the training prompt format,
  answered by comparing the log-probability of each answer word ("yes", "no": the distinct answers of
  the data) as the response; accuracy against the majority answer's share.
* ``privacy_policy``: the privacy-policy QA test split (clauses unseen in training, 1,092 pairs), scored
  like ``boolq`` ("is the clause relevant to the question? yes / no").

Math prompts use the Alpaca format of the NLG training (``balora.training.data.ALPACA_PROMPT``; query = the
GSM8K question, or ASDiv passage + " " + question), so a fine-tuned model is evaluated in its
training format, and so is the untuned model it is compared with, Instruct models included
(``prompt="chat"`` uses the tokenizer's chat template instead).

ASDiv answers look like "9 apples". About 213 of its 2,305 answers are not a single number; those
are matched as follows (the numeric ones go through ``answers_equal``):

* several quantities ("36 years old; 12 years old"): the list of numbers in the answer text must
  equal the gold's, in order;
* times and ratios ("3:30 p.m.", "7:4"): the first ``h:mm[ am/pm]`` / ``a:b`` in the answer text,
  spaces and dots dropped, must equal the gold's;
* words (names, "Yes", "They are equal"): the normalised answer text (lower case, punctuation and
  a leading "the" dropped) must equal the gold's or start with it followed by more words.

The answer text is what follows the last "answer is[:]" up to the end of that line, else the
last non-empty line of the completion.

``limit`` takes the first N items of every task (for ``forgetting``: N documents, default 200).
``data`` maps a task to a file used instead of its default (for ``asdiv``: the problems to
evaluate, as they are, without the split).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from balora.assets import main_file
from balora.evaluation import likelihood
from balora.evaluation.code import evaluate_samples, load_humaneval
from balora.evaluation.generation import (
    ALPACA_STOP,
    HUMANEVAL_STOP,
    EvalModel,
    GenerationSettings,
    format_prompt,
    generate,
    load_for_eval,
)
from balora.evaluation.likelihood import corpus_cross_entropy, load_xsum_texts
from balora.evaluation.math_answers import (
    answers_equal,
    default_gsm8k_path,
    extract_answer,
    load_gsm8k,
    math_verify_available,
    normalize_number,
)
from balora.evaluation.tasks import DEFAULT_MAX_NEW_TOKENS, GENERATIVE, TASKS
from balora.training.data import (
    asdiv_splits,
    boolq_instruction_records,
    dataset_splits,
    load_records,
    privacy_policy_instruction_records,
)
from balora.utils import versions, write_json, write_jsonl

__all__ = ["TASKS", "EvalError", "EvalOptions", "asdiv_match", "check_run_tasks", "evaluate"]

logger = logging.getLogger(__name__)



class EvalError(ValueError):
    """A request that cannot be run as given (unknown task, missing data file, ...)."""


@dataclass
class EvalOptions:
    """Settings shared by the tasks; recorded in ``eval.json``."""

    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS per task
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prompt: str = "alpaca"  # alpaca | chat | plain (math tasks)
    k: tuple[int, ...] = (1, 10, 100)
    data: dict[str, str] = field(default_factory=dict)
    forgetting_docs: int = 200
    forgetting_max_tokens: int = 256
    base_model: str | None = None  # forgetting baseline for a plain model spec

    def generation(self, task: str, stop: Sequence[str], add_special_tokens: bool = True
                   ) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[task],
            batch_size=self.batch_size, n_samples=self.n_samples, temperature=self.temperature,
            top_p=self.top_p, seed=self.seed, stop=tuple(stop),
            add_special_tokens=add_special_tokens)


@dataclass
class TaskOutput:
    metrics: dict[str, Any]
    records: list[dict[str, Any]]
    throughput: dict[str, float] | None = None
    extra_files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


Progress = Callable[[str], None]

# ---------------------------------------------------------------- ASDiv matching

_TIME_RATIO = re.compile(r"\d+(?::\d+)+(?:\s*[ap]\.?\s*m\b\.?)?", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def _answer_text(completion: str) -> str:
    marks = list(_ANSWER_IS.finditer(completion))
    if marks:
        rest = completion[marks[-1].end():].strip()
        return rest.split("\n", 1)[0].strip()
    lines = [ln.strip() for ln in completion.split("\n") if ln.strip()]
    return lines[-1] if lines else ""


def _numbers(text: str) -> list[Fraction]:
    out = []
    for m in _PLAIN_NUMBER.finditer(text):
        s = m.group(0).replace(",", "").rstrip(".")
        try:
            out.append(Fraction(s))
        except (ValueError, ZeroDivisionError):  # "3/0": not a quantity the model stated
            continue
    return out


def _time_ratio(text: str) -> str | None:
    m = _TIME_RATIO.search(text)
    return re.sub(r"[\s.]", "", m.group(0)).lower() if m else None


def _words(text: str) -> str:
    s = re.sub(r"[^\w\s]", " ", text.lower())
    s = re.sub(r"\s+", " ", s).strip()
    return re.sub(r"^the ", "", s)


def asdiv_match(completion: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) for an ASDiv gold answer (rules in the module doc)."""
    if normalize_number(gold) is not None:
        pred = extract_answer(completion)
        return pred, answers_equal(pred, gold)
    text = _answer_text(completion)
    if ";" in gold:
        want = [normalize_number(part) for part in gold.split(";")]
        if all(w is not None for w in want):
            return text, _numbers(text) == want
    gold_tr = _time_ratio(gold)
    if gold_tr is not None and _TIME_RATIO.match(gold.strip()):
        return text, _time_ratio(text) == gold_tr
    got, want_words = _words(text), _words(gold)
    return text, bool(want_words) and (got == want_words or got.startswith(want_words + " "))


# ---------------------------------------------------------------- generative tasks

def _math_records(items: list[dict[str, Any]], prompts: list[str], result: Any,
                  match: Callable[[str, str], tuple[str | None, bool]]) -> TaskOutput:
    records = []
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        for j, (completion, n) in enumerate(zip(result.completions[i], result.num_tokens[i])):
            extracted, correct = match(completion, item["gold"])
            records.append({"index": i, "sample": j, "question": item["question"],
                            "prompt": prompt, "completion": completion, "extracted": extracted,
                            "gold": item["gold"], "correct": correct, "tokens": n})
    correct = sum(r["correct"] for r in records)
    metrics = {"accuracy": correct / len(records) if records else float("nan"),
               "correct": correct, "total": len(records), "problems": len(items)}
    return TaskOutput(metrics, records, result.throughput())


def _run_math(ev: EvalModel, items: list[dict[str, Any]], task: str, opts: EvalOptions,
              match: Callable[[str, str], tuple[str | None, bool]], progress: Progress
              ) -> TaskOutput:
    prompts = [format_prompt(it["query"], opts.prompt, ev.tokenizer) for it in items]
    stop = ALPACA_STOP if opts.prompt == "alpaca" else ()
    settings = opts.generation(task, stop, add_special_tokens=opts.prompt != "chat")
    result = generate(ev.model, ev.tokenizer, prompts, settings,
                      progress=lambda d, n: progress(f"  {task}: {d}/{n} prompts"))
    output = _math_records(items, prompts, result, match)
    if task == "math":  # symbolic answers: which grader decided (see math_answers.answers_equal)
        output.metrics["grader"] = ("math-verify" if math_verify_available()
                                    else "balora-sympy (math-verify not installed)")
    return output


def _numeric_match(symbolic: bool) -> Callable[[str, str], tuple[str | None, bool]]:
    def match(completion: str, gold: str) -> tuple[str | None, bool]:
        pred = extract_answer(completion)
        return pred, answers_equal(pred, gold, symbolic=symbolic)
    return match


def _load_gsm8k(opts: EvalOptions) -> list[dict[str, Any]]:
    path = opts.data.get("gsm8k")
    if path is None and not default_gsm8k_path().exists():
        raise EvalError(f"GSM8K test file not found at {default_gsm8k_path()}; pass "
                        "--data gsm8k=FILE (or set $BALORA_GSM8K)")
    rows = load_gsm8k(path, limit=opts.limit)
    return [{"question": r["question"], "query": r["question"], "gold": r["gold"]} for r in rows]


def _load_asdiv(opts: EvalOptions) -> list[dict[str, Any]]:
    path = opts.data.get("asdiv")
    rows = list(load_records(path)) if path else asdiv_splits()["test"]
    rows = rows[:opts.limit] if opts.limit is not None else rows
    items = []
    for r in rows:
        query = " ".join(str(r[f]).strip() for f in ("passage", "question"))
        items.append({"question": query, "query": query, "gold": str(r["answer"]).strip()})
    return items


def _load_math(opts: EvalOptions) -> list[dict[str, Any]]:
    path = opts.data.get("math")
    if not path:
        raise EvalError("task 'math' needs a JSONL file: --math-file FILE (fields problem and "
                        "solution with \\boxed{...}, or answer)")
    items = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "problem" not in row or not ("solution" in row or "answer" in row):
                raise EvalError(f"{path}:{lineno}: a MATH row needs 'problem' and 'solution' "
                                "(or 'answer')")
            gold = row.get("answer") or extract_answer(row["solution"])
            if gold is None:
                raise EvalError(f"{path}:{lineno}: no \\boxed{{...}} answer in the solution")
            items.append({"question": row["problem"], "query": row["problem"], "gold": str(gold)})
            if opts.limit is not None and len(items) >= opts.limit:
                break
    return items


def _load_humaneval(opts: EvalOptions) -> dict[str, dict[str, Any]]:
    problems = load_humaneval(opts.data.get("humaneval") or main_file("humaneval"))
    ids = list(problems)[:opts.limit] if opts.limit is not None else list(problems)
    return {tid: problems[tid] for tid in ids}


def _run_humaneval(ev: EvalModel, problems: dict[str, dict[str, Any]], opts: EvalOptions,
                   progress: Progress) -> TaskOutput:
    ids = list(problems)
    result = generate(ev.model, ev.tokenizer, [problems[t]["prompt"] for t in ids],
                      opts.generation("humaneval", HUMANEVAL_STOP),
                      progress=lambda d, n: progress(f"  humaneval: {d}/{n} prompts"))
    samples = [{"task_id": tid, "completion": c}
               for tid, cs in zip(ids, result.completions) for c in cs]
    progress(f"  humaneval: executing {len(samples)} samples")
    scored = evaluate_samples(samples, problems, k=opts.k)
    tokens = {(tid, j): n for tid, ns in zip(ids, result.num_tokens) for j, n in enumerate(ns)}
    records = [{**rec, "completion": s["completion"], "tokens": tokens[(rec["task_id"],
                                                                        rec["completion_id"])]}
               for rec, s in zip(scored["records"], samples)]
    metrics = {**scored["pass_at_k"], "num_problems": scored["num_problems"],
               "num_samples": scored["num_samples"]}
    return TaskOutput(metrics, records, result.throughput(), {"humaneval_samples": samples})


# ---------------------------------------------------------------- likelihood tasks

# The untouched base model's cross-entropy on the same documents is the same for every run of a
# comparison; one process (a `balora compare` grid) scores it once.
_BASE_CROSS_ENTROPY: dict[tuple[Any, ...], dict[str, Any]] = {}


def _run_forgetting(ev: EvalModel, texts: list[str], opts: EvalOptions,
                    progress: Progress) -> TaskOutput:
    kw = {"max_tokens": opts.forgetting_max_tokens, "batch_size": opts.batch_size}
    after = corpus_cross_entropy(ev.model, ev.tokenizer, texts, **kw,
                                 progress=_every_tenth(progress, "documents"))
    metrics: dict[str, Any] = {k: after[k] for k in ("cross_entropy", "perplexity", "documents",
                                                     "tokens", "max_tokens")}
    records = [{"index": i, "cross_entropy": ce} for i, ce in enumerate(after["per_document"])]
    loader = ev.load_base
    if opts.base_model:
        device = str(next(ev.model.parameters()).device)
        loader = lambda: load_for_eval(opts.base_model, device=device)  # noqa: E731
    if loader is None:
        metrics["forgetting"] = None
        metrics["note"] = ("no base model: evaluate a run directory (or pass base_model) to get "
                           "forgetting = CE(tuned) - CE(base)")
        return TaskOutput(metrics, records)
    base_key = (opts.base_model or ev.base_spec, hashlib.sha256("\0".join(texts).encode()).hexdigest(),
                opts.forgetting_max_tokens, str(next(ev.model.parameters()).device))
    before = _BASE_CROSS_ENTROPY.get(base_key)
    if before is None:
        progress("  forgetting: scoring the base model")
        base = loader()
        before = corpus_cross_entropy(base.model, base.tokenizer, texts, **kw,
                                      progress=_every_tenth(progress, "documents (base)"))
        del base
        _BASE_CROSS_ENTROPY[base_key] = before
    else:
        progress("  forgetting: base model already scored on these documents in this process")
    metrics.update(base_model=opts.base_model or ev.base_spec,
                   base_cross_entropy=before["cross_entropy"], base_perplexity=before["perplexity"],
                   forgetting=after["cross_entropy"] - before["cross_entropy"])
    for rec, ce in zip(records, before["per_document"]):
        rec["base_cross_entropy"] = ce
    return TaskOutput(metrics, records)


def _every_tenth(progress: Progress, what: str) -> Callable[[int, int], None]:
    """A (done, total) callback that reports at each further tenth of the work."""
    reported = [0]

    def report(done: int, total: int) -> None:
        if done == total or done * 10 // total > reported[0]:
            reported[0] = done * 10 // total
            progress(f"  {done}/{total} {what} scored")
    return report


def _likelihood_task(scorer_name: str) -> Callable[..., TaskOutput]:
    def run(ev: EvalModel, rows: list[dict[str, Any]], opts: EvalOptions,
            progress: Progress) -> TaskOutput:
        out = getattr(likelihood, scorer_name)(ev.model, ev.tokenizer, rows,
                                               batch_size=opts.batch_size,
                                               progress=_every_tenth(progress, "texts"))
        records = out.pop("records")
        return TaskOutput(out, records)
    return run


def _likelihood_loader(loader_name: str, task: str) -> Callable[[EvalOptions], list]:
    def load(opts: EvalOptions) -> list[dict[str, Any]]:
        rows = getattr(likelihood, loader_name)(opts.data.get(task))
        return rows[:opts.limit] if opts.limit is not None else rows
    return load


def _load_boolq(opts: EvalOptions) -> list[dict[str, Any]]:
    path = opts.data.get("boolq")
    rows = boolq_instruction_records(load_records(path) if path else dataset_splits("boolq")["test"])
    return rows[:opts.limit] if opts.limit is not None else rows


def _load_privacy_policy(opts: EvalOptions) -> list[dict[str, Any]]:
    path = opts.data.get("privacy_policy")
    rows = (privacy_policy_instruction_records(load_records(path)) if path
            else dataset_splits("privacy-policy-words")["test"])
    return rows[:opts.limit] if opts.limit is not None else rows


def _run_choice(ev: EvalModel, items: list[dict[str, Any]], opts: EvalOptions, progress: Progress) -> TaskOutput:
    """Closed-set answers scored as responses: the prompt in the training format, each distinct answer
    of the data as the continuation; the most likely one is the prediction (ties: the first in order)."""
    choices = sorted({it["response"] for it in items})
    prompts = [format_prompt(it["query"], opts.prompt, ev.tokenizer) for it in items]
    scores = likelihood.continuation_logprobs(ev.model, ev.tokenizer, [(p, c) for p in prompts for c in choices],
                                              batch_size=opts.batch_size, progress=_every_tenth(progress, "answers"))
    records = []
    for i, item in enumerate(items):
        logprobs = [scores[i * len(choices) + j][0] for j in range(len(choices))]
        predicted = choices[max(range(len(choices)), key=lambda j: logprobs[j])]
        records.append({"index": i, "gold": item["response"], "predicted": predicted,
                        "correct": predicted == item["response"], "logprobs": dict(zip(choices, logprobs))})
    n = len(records)
    golds = [r["gold"] for r in records]
    majority = max(choices, key=golds.count) if records else None
    metrics = {"accuracy": sum(r["correct"] for r in records) / n if n else float("nan"), "total": n,
               "choices": choices, "majority_answer": majority,
               "majority_share": golds.count(majority) / n if n else float("nan"),
               "predicted_share": {c: sum(r["predicted"] == c for r in records) / n if n else float("nan")
                                   for c in choices}}
    return TaskOutput(metrics, records)


def _load_xsum(opts: EvalOptions) -> list[str]:
    return load_xsum_texts(opts.data.get("forgetting"), limit=opts.limit or opts.forgetting_docs)


# task -> (load data: opts -> items, run: (model, items, opts, progress) -> TaskOutput)
_REGISTRY: dict[str, tuple[Callable[[EvalOptions], Any], Callable[..., TaskOutput]]] = {
    "gsm8k": (_load_gsm8k, lambda ev, d, o, p: _run_math(ev, d, "gsm8k", o, _numeric_match(False), p)),
    "asdiv": (_load_asdiv, lambda ev, d, o, p: _run_math(ev, d, "asdiv", o, asdiv_match, p)),
    "math": (_load_math, lambda ev, d, o, p: _run_math(ev, d, "math", o, _numeric_match(True), p)),
    "humaneval": (_load_humaneval, _run_humaneval),
    "forgetting": (_load_xsum, _run_forgetting),
    "crows_pairs": (_likelihood_loader("load_crows_pairs", "crows_pairs"),
                    _likelihood_task("crows_pairs_score")),
    "stereoset": (_likelihood_loader("load_stereoset", "stereoset"),
                  _likelihood_task("stereoset_scores")),
    "bbq": (_likelihood_loader("load_bbq", "bbq"), _likelihood_task("bbq_scores")),
    "piqa": (_likelihood_loader("load_piqa", "piqa"), _likelihood_task("piqa_scores")),
    "boolq": (_load_boolq, _run_choice),
    "privacy_policy": (_load_privacy_policy, _run_choice),
}


# ---------------------------------------------------------------- driver

def _check_tasks(tasks: Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks if t.strip()]
    unknown = [t for t in names if t not in _REGISTRY]
    if unknown or not names:
        raise EvalError(f"unknown task(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"known: {', '.join(TASKS)}")
    return list(dict.fromkeys(names))


def _device_info(ev: EvalModel) -> dict[str, Any]:
    device = next(ev.model.parameters()).device
    info: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def evaluate(model_spec: str | EvalModel, tasks: Sequence[str], *, limit: int | None = None,
             out_dir: str | Path | None = None, batch_size: int = 8,
             max_new_tokens: int | None = None, progress: Progress | None = None,
             device: str | None = None, **options: Any) -> dict[str, Any]:
    """Run ``tasks`` (see ``TASKS``) on a model and return what ``eval.json`` holds.

    ``model_spec``: a run directory, adapter directory, model directory, hub id or ``asset:NAME``
    (see :func:`load_for_eval`), or an already loaded :class:`EvalModel`. Further keyword options
    are the fields of :class:`EvalOptions` (n_samples, temperature, top_p, seed, prompt, k, data,
    forgetting_docs, forgetting_max_tokens, base_model).

    Writes, when ``out_dir`` is given (default for a run directory: ``<run>/eval``):
    ``eval.json`` (per task: metrics, settings, wall time, generation throughput; plus versions),
    updated after every task and merged with an existing one for the same model, and
    ``records/<task>.jsonl`` with one line per item (``humaneval_samples.jsonl`` too, which
    ``balora eval humaneval --samples`` can re-score).
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    names = _check_tasks(tasks)
    opts = EvalOptions(limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       **options)
    if opts.k:
        opts.k = tuple(sorted(set(opts.k)))
    # Load every task's data first: a missing asset or file fails before the slow model load.
    data = {t: _REGISTRY[t][0](opts) for t in names}

    started = time.perf_counter()
    if isinstance(model_spec, EvalModel):
        ev = model_spec
    else:
        say(f"loading {model_spec}")
        ev = load_for_eval(model_spec, device=device)
    load_seconds = time.perf_counter() - started
    if out_dir is None and ev.kind == "run":
        out_dir = Path(ev.spec) / "eval"
    out = Path(out_dir) if out_dir is not None else None

    report: dict[str, Any] = {"model": ev.spec, "model_kind": ev.kind, "base_model": ev.base_spec,
                              "tasks": {}}
    if out is not None and (out / "eval.json").is_file():
        previous = json.loads((out / "eval.json").read_text())
        if previous.get("model") == ev.spec:
            report["tasks"] = previous.get("tasks", {})
    report.update(versions=versions(), **_device_info(ev), load_seconds=round(load_seconds, 3),
                  command=" ".join(sys.argv))
    settings = {k: v for k, v in asdict(opts).items() if k != "data"}
    for task in names:
        say(f"{task}: {len(data[task])} items")
        t0 = time.perf_counter()
        result = _REGISTRY[task][1](ev, data[task], opts, say)
        wall = time.perf_counter() - t0
        entry: dict[str, Any] = {"metrics": result.metrics, "wall_seconds": round(wall, 3),
                                 "items": len(data[task]),
                                 "settings": {**settings, "data": opts.data.get(task)},
                                 "finished_at": datetime.now(timezone.utc).isoformat(
                                     timespec="seconds")}
        if task in GENERATIVE:
            entry["settings"]["max_new_tokens"] = (opts.max_new_tokens
                                                   or DEFAULT_MAX_NEW_TOKENS[task])
        if result.throughput is not None:
            entry["throughput"] = result.throughput
        report["tasks"][task] = entry
        say(f"{task}: done in {wall:.1f} s: " + json.dumps(
            {k: v for k, v in result.metrics.items() if not isinstance(v, (dict, list))},
            default=str))
        if out is not None:
            write_jsonl(out / "records" / f"{task}.jsonl", result.records)
            for name, rows in result.extra_files.items():
                write_jsonl(out / f"{name}.jsonl", rows)
            write_json(out / "eval.json", report)  # NaN/inf become null: eval.json stays strict JSON
    report["wall_seconds"] = round(time.perf_counter() - started, 3)
    if out is not None:
        write_json(out / "eval.json", report)
    return report


# ---------------------------------------------------------------- after training

def check_run_tasks(eval_cfg: Any, model_task: str = "nlg") -> list[str]:
    """Check a run configuration's ``eval.tasks`` before training: known names, a causal LM, and
    every task's data present (a missing asset or file fails now, not after training)."""
    if not eval_cfg.tasks:
        return []
    names = _check_tasks(list(eval_cfg.tasks))
    if model_task != "nlg":
        raise EvalError(f"eval.tasks ({', '.join(names)}) need a causal LM (model.task: nlg), "
                        f"not model.task: {model_task}")
    opts = EvalOptions(limit=eval_cfg.limit, batch_size=eval_cfg.batch_size,
                       max_new_tokens=eval_cfg.max_new_tokens)
    for task in names:
        _REGISTRY[task][0](opts)
    return names

