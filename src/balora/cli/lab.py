"""``balora lab EXPERIMENT SPEC.yaml``: the command line of `balora.experiments.lab`."""

from __future__ import annotations

import argparse
from typing import Any

from balora.experiments.lab import EXPERIMENTS, run_lab


def _cmd_lab(args: argparse.Namespace) -> int:
    run_lab(args.experiment, args.spec, only_report=args.only_report, show_progress=not args.no_progress)
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``balora lab EXPERIMENT SPEC.yaml`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("lab", parents=parents, help="controlled experiments: imbalance, noise, bias, spectrum",
                              description="Run a catastrophic-inheritance experiment from its spec (resumable) "
                                          "and write results.json, README.md and plots/ into its output_dir.")
    p.add_argument("experiment", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("spec", help="YAML spec, e.g. experiments/lab/<experiment>.yaml")
    p.add_argument("--only-report", action="store_true", help="run nothing; rebuild tables and plots from "
                                                              "the stored results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during training")
    p.set_defaults(func=_cmd_lab)
    return p
