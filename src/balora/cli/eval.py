"""``balora eval``: benchmark a model or run directory, or score a HumanEval samples file.

    balora eval MODEL_OR_RUN --tasks gsm8k,asdiv,humaneval,forgetting,crows_pairs [--limit N]
    balora eval humaneval --samples samples.jsonl [--k 1,10]
    balora eval MODEL_OR_RUN --backend lm-eval --tasks gsm8k,crows_pairs,hellaswag [--limit N]

"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from balora.evaluation.tasks import TASKS

__all__ = ["add_parser"]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _data_pairs(pairs: list[str]) -> dict[str, str]:
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    from balora.evaluation.harness import EvalError

    out = {}
    for pair in pairs:
        task, sep, path = pair.partition("=")
        if not sep or not task or not path:
            raise EvalError(f"--data expects TASK=PATH, got {pair!r}")
        out[task] = path
    return out


def _summary(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in shown.items())


def _score_samples(args: argparse.Namespace) -> int:
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    from balora.assets import main_file
    from balora.evaluation.code import evaluate_samples, load_humaneval, read_samples
    from balora.evaluation.harness import EvalError

    problems_file = args.problems or main_file("humaneval")
    if not Path(args.samples).is_file():
        raise EvalError(f"--samples {args.samples}: no such file")
    try:
        problems = load_humaneval(problems_file)
    except ValueError as error:  # a malformed line: the message names the file and the line
        raise EvalError(str(error)) from None
    try:
        samples = read_samples(args.samples, problems)
    except ValueError as error:  # names the file and the line
        raise EvalError(str(error)) from None
    if not samples:
        raise EvalError(f"--samples {args.samples}: no samples (one JSON object per line: "
                        '{"task_id": "HumanEval/0", "completion": "..."})')
    k = args.k or (1, 10, 100)
    result = evaluate_samples(samples, problems, k=k, timeout=args.timeout)
    attempted = {s["task_id"] for s in samples}
    metrics = {**result["pass_at_k"], "num_problems": result["num_problems"],
               "num_samples": result["num_samples"]}
    if args.out:
        out = Path(args.out)
        (out / "records").mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(
            {"samples": str(args.samples), "tasks": {"humaneval": {"metrics": metrics}}},
            indent=2))
        with open(out / "records" / "humaneval.jsonl", "w", encoding="utf-8") as fh:
            for rec in result["records"]:
                fh.write(json.dumps(rec) + "\n")
    print(json.dumps(metrics, indent=2))
    if len(attempted) < len(problems):
        print(f"note: samples cover {len(attempted)} of {len(problems)} problems; pass@k is over "
              "those", file=sys.stderr)
    return 0


def _run_lm_eval(args: argparse.Namespace) -> int:
    """``--backend lm-eval``: lm-evaluation-harness on the model balora loads (see lm_eval_backend)."""
    from balora.evaluation.harness import EvalError
    from balora.evaluation.lm_eval_backend import LM_EVAL_MISSING, evaluate_lm_eval, lm_eval_available

    if not lm_eval_available():
        raise EvalError(LM_EVAL_MISSING)
    unsupported = [flag for flag, value, default in [
        ("--prompt", args.prompt, "alpaca"), ("--n-samples", args.n_samples, 1),
        ("--temperature", args.temperature, 0.0), ("--top-p", args.top_p, 1.0), ("--k", args.k, None),
        ("--math-file", args.math_file, None), ("--base", args.base, None), ("--samples", args.samples, None)]
        if value != default]
    if unsupported:
        raise EvalError(f"{', '.join(unsupported)}: options of the balora backend; the lm-eval backend takes "
                        "--tasks, --limit, --batch-size, --max-new-tokens, --data, --out, --device, --seed")
    report = evaluate_lm_eval(args.model, args.tasks.split(","), limit=args.limit, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, data=_data_pairs(args.data), out_dir=args.out,
                              device=args.device, seed=args.seed,
                              progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    for task, entry in report["tasks"].items():
        print(f"{task:<12} {_summary(entry['metrics'])}")
    if report.get("written"):
        print(f"written: {report['written']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    # imported here so that `balora --help` does not load what this command does not need
    from balora.assets import AssetError, AssetMissingError
    from balora.evaluation.harness import EvalError, evaluate

    try:
        if args.backend == "lm-eval":
            if not args.tasks:
                raise EvalError("say which tasks to run: --tasks gsm8k,crows_pairs or lm-eval task names")
            return _run_lm_eval(args)
        if args.samples:
            if args.model != "humaneval":
                raise EvalError("--samples scores a HumanEval samples file: balora eval humaneval "
                                "--samples FILE")
            return _score_samples(args)
        if not args.tasks:
            raise EvalError("say which tasks to run: --tasks gsm8k,asdiv,humaneval,forgetting,"
                            "crows_pairs,stereoset,bbq,math")
        data = _data_pairs(args.data)
        if args.math_file:
            data["math"] = args.math_file
        options: dict[str, Any] = {"n_samples": args.n_samples, "temperature": args.temperature,
                                   "top_p": args.top_p, "seed": args.seed, "prompt": args.prompt,
                                   "data": data, "base_model": args.base}
        if args.k:
            options["k"] = args.k
        report = evaluate(args.model, args.tasks.split(","), limit=args.limit, out_dir=args.out,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          device=args.device,
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True),
                          **options)
    except (EvalError, AssetError, AssetMissingError, FileNotFoundError) as error:
        # AssetMissingError already says which `balora assets fetch` to run.
        print(f"balora eval: error: {error}", file=sys.stderr)
        return 2
    for task, entry in report["tasks"].items():
        if task in args.tasks.split(","):
            print(f"{task:<12} {_summary(entry['metrics'])}  ({entry['wall_seconds']:.0f} s)")
    out = args.out or (Path(args.model) / "eval" if report["model_kind"] == "run" else None)
    if out is not None:
        print(f"written: {Path(out) / 'eval.json'}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to a ``balora`` sub-parser set; returns its parser."""
    p = subparsers.add_parser(
        "eval", parents=parents, help="benchmark a model or run directory (math, code, forgetting, bias)",
        description="Run benchmark tasks on MODEL_OR_RUN (a run directory, model directory, hub id "
                    "or asset:NAME), or score an existing HumanEval samples file with "
                    "`balora eval humaneval --samples FILE`.")
    p.add_argument("model", metavar="MODEL_OR_RUN")
    p.add_argument("--tasks", help=f"comma-separated, from: {','.join(TASKS)} (--backend lm-eval: gsm8k, "
                                   "crows_pairs offline, or any lm-eval task name)")
    p.add_argument("--backend", choices=["balora", "lm-eval"], default="balora",
                   help="balora's harness (default) or lm-evaluation-harness (pip install lm-eval) on the "
                        "model balora loads")
    p.add_argument("--limit", type=int, help="first N items of each task (deterministic subset)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: 256 for math tasks, 384 for humaneval")
    p.add_argument("--out", help="output directory (default for a run: RUN/eval)")
    p.add_argument("--n-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", choices=["alpaca", "chat", "plain"], default="alpaca",
                   help="math prompt format (alpaca = the NLG training format)")
    p.add_argument("--k", type=_ints, help="pass@k values, e.g. 1,10 (default 1,10,100 where n allows)")
    p.add_argument("--math-file", help="MATH-style JSONL (problem, solution) for task math")
    p.add_argument("--data", action="append", default=[], metavar="TASK=PATH",
                   help="use this file for a task instead of its default data")
    p.add_argument("--base", help="base model for the forgetting delta when MODEL is not a run")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--samples", help="with MODEL 'humaneval': score this samples JSONL, no model")
    p.add_argument("--problems", help="HumanEval problems file for --samples (default: the asset)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per program (--samples)")
    p.set_defaults(func=_cmd_eval)
    return p
