"""``balora train``, ``balora export`` and ``balora info``: a run directory from a YAML configuration,
its artefacts, and what it holds."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def _cmd_train(args: argparse.Namespace) -> int:
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    from balora.training.run import train_run
    from balora.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    if cfg.eval.tasks:  # eval.tasks: names, model kind and data checked before training, run after it
        from balora.core.config import ConfigError
        from balora.evaluation.harness import EvalError, check_run_tasks

        try:
            check_run_tasks(cfg.eval, cfg.model.task)
        except EvalError as error:
            raise ConfigError(f"eval.tasks: {error}") from None
    metrics = train_run(cfg, resume=args.resume, force=args.force, show_progress=not args.no_progress)
    from balora.training.process_group import release_process_group

    release_process_group()  # all collectives are done; what follows runs on rank 0 alone
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate launch / torchrun rank 0 reports and evaluates
        return 0
    print(compact_json({k: metrics[k] for k in ("method", "global_step", "train_seconds", "validation", "test")
                        if k in metrics}))
    print(f"artefacts: {Path(cfg.output_dir).resolve()}")
    if cfg.eval.tasks:
        return _run_eval_tasks(cfg)
    return 0


def _run_eval_tasks(cfg: Any) -> int:
    """``eval.tasks`` on the finished run (and its untuned base with ``eval.before_training``), as
    `balora compare` does for a cell: RUN/eval/eval.json (RUN/eval/untuned/eval.json)."""
    import sys

    from balora.evaluation.run_tasks import evaluate_run_tasks

    run = Path(cfg.output_dir)
    try:
        result = evaluate_run_tasks(run, cfg.eval, device="cpu" if cfg.training.get("use_cpu") else None,
                                    progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    except Exception as error:  # the trained run is kept; say how to redo only the evaluation
        print(f"balora train: eval.tasks failed after training: {type(error).__name__}: {error}\n"
              f"  the run is complete; redo the evaluation with: balora eval {run} --tasks "
              f"{','.join(cfg.eval.tasks)}", file=sys.stderr)
        return 1
    print(json.dumps({"eval": result}, indent=2, default=str))
    print(f"eval: {(run / 'eval' / 'eval.json').resolve()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if not (args.merge or args.convert):  # before anything loads: nothing to do is said at once
        raise SystemExit("balora export: say what to write: --merge (full model) and/or --convert (plain LoRA)")
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    from balora.core.export import load_trained, save_converted_lora, save_merged
    from balora.training.quiet import quiet_warnings
    from balora.training.run import load_base_model, load_tokenizer
    from balora.training.run_config import load_run_config
    from balora.utils import describe_incomplete

    run = Path(args.run_dir)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run}: not a balora run directory (no config.yaml)")
    problem = _adapter_problem(run / "adapter")
    if problem is not None:
        state = describe_incomplete(run) or "the run did not finish"
        raise FileNotFoundError(f"{run / 'adapter'}: no trained adapter to export ({problem}; {state}). "
                                "Finish the run first: balora train CONFIG --resume")
    cfg = load_run_config(run / "config.yaml")
    label_map = json.loads((run / "label_map.json").read_text()) if (run / "label_map.json").exists() else None
    with quiet_warnings():  # PEFT's advice to convert the PiSSA adapter: this is that conversion
        model = load_trained(load_base_model(cfg, label_map), run / "adapter")
        if args.convert:
            print(f"converted LoRA: {save_converted_lora(model, Path(args.out or run) / 'lora_converted')}")
        if args.merge:
            print(f"merged model: {save_merged(model, Path(args.out or run) / 'merged', load_tokenizer(cfg))}")
    return 0


def compact_json(value: Any, indent: int = 2, level: int = 0) -> str:
    """JSON with one key per line, but every list on one line (a confusion matrix as ``[[6, 2], [1, 3]]``,
    not one number per line)."""
    if isinstance(value, dict) and value:
        pad = " " * indent * (level + 1)
        items = [f"{pad}{json.dumps(str(k))}: {compact_json(v, indent, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent * level + "}"
    return json.dumps(value, default=str)


def _adapter_problem(adapter: Path) -> str | None:
    """Why ``adapter/`` cannot be loaded (missing, empty, no weights, an empty file), or None."""
    if not adapter.is_dir():
        return "missing"
    files = [f for f in adapter.iterdir() if f.is_file()]
    if not files:
        return "empty"
    if not (adapter / "adapter_config.json").is_file() or not any(f.name.startswith("adapter_model.") for f in files):
        return "no adapter_config.json or adapter weights"
    empty = [f.name for f in files if f.stat().st_size == 0]
    return f"empty file(s): {', '.join(sorted(empty))}" if empty else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _cmd_info(args: argparse.Namespace) -> int:
    # imported here so that `balora --help` does not load what this command does not need
    import yaml

    from balora.utils import CorruptFileError, describe_incomplete, read_json

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not a balora run directory (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    print(f"run: {run.resolve()}")
    print(f"  method {cfg['method']}  model {cfg['model']['name']} ({cfg['model']['task']})  "
          f"data {cfg['data']['source']}")
    incomplete = describe_incomplete(run)
    if incomplete is not None:
        print(f"  {incomplete}")
    for name, what in [("adapter", "PEFT adapter: balora.load_trained(untouched_base, path)"),
                       ("lora_converted", "plain LoRA for the untouched base: PeftModel.from_pretrained"),
                       ("merged", "full fine-tuned model: AutoModel*.from_pretrained"),
                       ("checkpoints", "Trainer checkpoints: balora train ... --resume"),
                       ("metrics.json", "metrics"), ("log_history.json", "training log")]:
        path = run / name
        if path.is_dir() and not any(path.iterdir()):
            print(f"  {name:<17} {'empty':>12}  incomplete (written when the run finishes)")
        elif path.exists():
            print(f"  {name:<17} {_size(path) / 1e6:9.2f} MB  {what}")
    metrics = None
    if (run / "metrics.json").exists():
        try:
            metrics = read_json(run / "metrics.json")
        except CorruptFileError as error:
            print(f"  {error}: the run was stopped while writing it; `balora train CONFIG --resume` redoes "
                  "the evaluation and the final save")
    if isinstance(metrics, dict):
        print(f"  steps {metrics.get('global_step')}  train {metrics.get('train_seconds', 0):.0f} s  "
              f"peak RSS {metrics.get('peak_rss_mb', 0):.0f} MB")
        for split in ("untuned", "validation", "test"):
            if split in metrics:
                shown = {k: v for k, v in metrics[split].items() if isinstance(v, (int, float))}
                print(f"  {split}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return 0


def add_parsers(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``train``, ``export`` and ``info`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("train", parents=parents, help="fine-tune from a YAML run configuration")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, before or after the options, e.g. "
                                                "method=lora training.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue even though the configuration differs from the stored config.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("export", parents=parents, help="convert a run's adapter to plain LoRA and/or merge it")
    p.add_argument("run_dir")
    p.add_argument("--merge", action="store_true", help="write merged/: the full fine-tuned model")
    p.add_argument("--convert", action="store_true", help="write lora_converted/: LoRA for the untouched base")
    p.add_argument("--out", help="directory to write into (default: the run directory)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("info", parents=parents, help="what a run directory contains")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_info)
