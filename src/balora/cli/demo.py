"""The embedded default: MiniLM-L6 fine-tuned on Rotten Tomatoes with BA-LoRA and with PiSSA (same
seed, same steps, same data), then their test accuracy side by side with the untuned model's."""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from balora.training.run_config import preset_path

PRESET = "nlu-rotten-tomatoes-minilm.yaml"
DEFAULT_STEPS = 100


def _row(name: str, metrics: dict[str, Any], seconds: float | None) -> str:
    time_text = f"{seconds:8.0f}" if seconds is not None else "       -"
    return (f"| {name:<22} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} | {metrics['mcc']:+.4f} | "
            f"{metrics['minority_recall']:.4f} | {time_text} |")


class _KnownNotes(logging.Filter):
    """The demo's two known conditions, logged as warnings by balora at every run (a few Rotten Tomatoes
    texts longer than max_length=64; the NLU SVD term, constant with 2 classes): kept for one line under
    the table instead of WARNING lines between the progress bars. ``-v`` shows them as they come."""

    PATTERNS = {"truncated": re.compile(r".*: (\d+) of \d+ texts truncated to max_length=(\d+)$"),
                "svd": re.compile(r"BA-LoRA NLU SVD term: ")}
    LOGGERS = ("balora.training.data", "balora.training.trainer")

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[str]] = {name: set() for name in self.PATTERNS}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for name, pattern in self.PATTERNS.items():
            if pattern.match(message):
                self.seen[name].add(message)
                return False
        return True

    def line(self) -> str | None:
        notes = []
        found = [self.PATTERNS["truncated"].match(m) for m in sorted(self.seen["truncated"])]
        if found:
            notes.append(f"{sum(int(m.group(1)) for m in found if m)} long texts truncated to "
                         f"max_length={found[0].group(2) if found[0] else '?'}")
        if self.seen["svd"]:
            notes.append("ba-lora's NLU SVD term is constant with 2 classes (docs/method.md §4)")
        return f"notes (-v for details): {'; '.join(notes)}" if notes else None


def run_demo(output_dir: Path, steps: int = 100, methods: list[str] | None = None) -> dict[str, Any]:
    # imported here so that `balora --help` does not load what this command does not need
    from balora import assets
    from balora.training.run import train_run
    from balora.training.run_config import load_run_config

    methods = methods or ["ba-lora", "pissa"]
    started = time.perf_counter()
    assets.fetch(["minilm", "rotten-tomatoes"])
    results: dict[str, Any] = {}
    notes = _KnownNotes()
    quiet = not logging.getLogger("balora").isEnabledFor(logging.INFO)
    if quiet:
        for name in notes.LOGGERS:
            logging.getLogger(name).addFilter(notes)
    try:
        for i, method in enumerate(methods):
            cfg = load_run_config(preset_path(PRESET), [
                f"method={method}", f"output_dir={output_dir / method}", f"training.max_steps={steps}",
                f"eval.before_training={'true' if i == 0 else 'false'}",
            ])
            print(f"\n== {method}: MiniLM-L6, Rotten Tomatoes, {steps} steps → {cfg.output_dir}")
            results[method] = train_run(cfg, resume=False)
    finally:
        for name in notes.LOGGERS:
            logging.getLogger(name).removeFilter(notes)
    untuned = results[methods[0]].get("untuned")
    lines = [
        f"Rotten Tomatoes test split ({results[methods[0]]['data']['test']} texts), all-MiniLM-L6-v2, "
        f"r = 8, {steps} steps, seed 42",
        "",
        "| model                  | acc    | macroF1 | MCC     | min.rec | train s  |",
        "|------------------------|--------|---------|---------|---------|----------|",
    ]
    if untuned:
        lines.append(_row("untuned (fresh head)", untuned, None))
    for method in methods:
        lines.append(_row(method, results[method]["test"], results[method]["train_seconds"]))
    if notes.line():
        lines += ["", notes.line()]
    lines += ["", f"total wall time {time.perf_counter() - started:.0f} s; artefacts under {output_dir.resolve()}",
              *(f"  {m}: {output_dir / m}/adapter, lora_converted/, metrics.json" for m in methods)]
    summary = "\n".join(lines)
    print("\n" + summary)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.md").write_text(summary + "\n")
    (output_dir / "summary.json").write_text(json.dumps(
        {m: {"test": r["test"], "train_seconds": r["train_seconds"]} for m, r in results.items()}
        | {"untuned": untuned}, indent=2))
    return results


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(Path(args.output_dir), steps=args.steps, methods=args.methods.split(","))
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``demo`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("demo", parents=parents,
                              help="the embedded default: MiniLM-L6 on Rotten Tomatoes, BA-LoRA vs PiSSA")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--methods", default="ba-lora,pissa")
    p.set_defaults(func=_cmd_demo)
    return p
