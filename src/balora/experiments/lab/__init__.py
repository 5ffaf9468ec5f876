"""``balora lab EXPERIMENT SPEC.yaml``: controlled experiments on what fine-tuning inherits.

* ``imbalance`` (`balora.experiments.lab.imbalance`): minority recall when the training split is subsampled to
  minority:majority ratios;
* ``noise`` (`balora.experiments.lab.noise`): checkpoints that differ only in the label noise of their continued
  pre-training, each adapted to a clean task; BA-LoRA's gain over PiSSA per noise level;
* ``bias`` (`balora.experiments.lab.bias`): CrowS-Pairs, StereoSet and BBQ before and after fine-tuning;
* ``spectrum`` (`balora.experiments.lab.spectrum`): singular-value spectra, effective rank and t-SNE of the
  features and logits during training.

Each writes ``results.json``, ``README.md`` and ``plots/*.png`` into its spec's ``output_dir``
(default ``docs/results/lab/<experiment>``); ``--only-report`` rebuilds them from stored results.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError

__all__ = ["EXPERIMENTS", "add_lab_parser", "run_lab"]

EXPERIMENTS = ("imbalance", "noise", "bias", "spectrum")


def run_lab(experiment: str, spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
            say: Any = None) -> dict[str, Any]:
    """Run one experiment from its spec; returns what its results.json holds."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown lab experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(f"{__name__}.{experiment}")
    kwargs: dict[str, Any] = {"only_report": only_report, "show_progress": show_progress}
    if say is not None:
        kwargs["say"] = say
    return module.run(spec_path, **kwargs)


def _cmd_lab(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_lab(args.experiment, args.spec, only_report=args.only_report, show_progress=not args.no_progress)
    return 0


def add_lab_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``balora lab EXPERIMENT SPEC.yaml`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("lab", help="controlled experiments: imbalance, noise, bias, spectrum",
                              description="Run a catastrophic-inheritance experiment from its spec (resumable) "
                                          "and write results.json, README.md and plots/ into its output_dir.")
    p.add_argument("experiment", help=f"one of: {', '.join(EXPERIMENTS)}")
    p.add_argument("spec", help="YAML spec, e.g. docs/results/lab/<experiment>/spec.yaml")
    p.add_argument("--only-report", action="store_true", help="run nothing; rebuild tables and plots from "
                                                              "the stored results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during training")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (on a shared or busy CPU, 1 per process is often fastest)")
    p.set_defaults(func=_cmd_lab)
    return p
