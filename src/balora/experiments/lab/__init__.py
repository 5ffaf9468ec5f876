"""``balora lab EXPERIMENT SPEC.yaml``: controlled experiments on what fine-tuning inherits.

* ``imbalance`` (`balora.experiments.lab.imbalance`): minority recall when the training split is subsampled to
  minority:majority ratios;
* ``noise`` (`balora.experiments.lab.noise`): checkpoints that differ only in the label noise of their continued
  pre-training, each adapted to a clean task; BA-LoRA's gain over PiSSA per noise level;
* ``bias`` (`balora.experiments.lab.bias`): CrowS-Pairs, StereoSet and BBQ before and after fine-tuning;
* ``spectrum`` (`balora.experiments.lab.spectrum`): singular-value spectra, effective rank and t-SNE of the
  features and logits during training.

Each writes ``results.json``, ``README.md`` and ``plots/*.png`` into its spec's ``output_dir``
(default ``runs/lab-<experiment>``); ``--only-report`` rebuilds them from stored results. A README
holds the setup, the computed tables and what each column is; the optional ``paper:`` text of a spec
(reference numbers) is shown next to them. Spec reading: `balora.experiments.spec`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from balora.core.config import ConfigError
from balora.experiments.report import Say, say_print

__all__ = ["EXPERIMENTS", "run_lab"]

EXPERIMENTS = ("imbalance", "noise", "bias", "spectrum")


def run_lab(experiment: str, spec_path: str | Path, *, only_report: bool = False, show_progress: bool = True,
            say: Say = say_print) -> dict[str, Any]:
    """Run one experiment from its spec; returns what its results.json holds."""
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown lab experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    # each experiment's module is imported only when it runs: spectrum pulls in torch and transformers
    module = importlib.import_module(f"{__name__}.{experiment}")
    return module.run(spec_path, only_report=only_report, show_progress=show_progress, say=say)
