"""``balora compare SPEC.yaml``: a grid of runs (methods × seeds × any option), run resumably, then
a summary table of mean ± std per group, each group set against the best one, and plots.

SPEC format
-----------
::

    name: rt-methods                               # default: the spec file's stem
    base: nlu-rotten-tomatoes-minilm.yaml          # run config: relative to the spec file, then the
                                                   # cwd, then a packaged preset of that name
    # base_config: {method: lora, model: {...}}    # ... or the run config inline (exactly one of the two)
    output_dir: runs/rt-methods                    # relative to the cwd; default runs/compare-<name>
    grid:                                          # cartesian product, in this order; any key path
      method: [lora, pissa, dora, lora-reg, ba-lora]
      training.seed: [1, 2, 3]
    overrides: [training.max_steps=150]            # KEY=VALUE, applied to every cell before the grid
    metrics: [test.accuracy, test.mcc]             # summary columns; default: every number in `test`
    lower_is_better: [forgetting]                  # default: loss, perplexity, cross_entropy, forgetting, *_seconds
    per_method:                                    # optional: options for one method's cells, after the
      lora: {training.learning_rate: 1e-3}         #   grid values (e.g. the rate selected in another spec)
      pissa: {training.learning_rate: 5e-4}
    variants:                                      # optional: named sets of options, one grid axis
      cr-only: {balora.lambda_diversity: 0, balora.lambda_svd: 0}
      dr-only: {balora.lambda_consistency: 0, balora.lambda_svd: 0}
    selection:                                     # optional: tune each group on the validation split first
      metric: validation.accuracy                  # must be a validation.* metric
      seeds: [1]                                   # default: the grid's first training.seed
      search:                                      # per method, or `all` for the methods not named
        all: {training.learning_rate: [2e-4, 5e-4, 1e-3, 2e-3]}
        dora: {training.learning_rate: [1e-3, 2e-3, 5e-3]}
    paired:                                        # optional: groups compared seed by seed (below)
      pairs: [[ba-lora, pissa], [ba-lora, lora], [pissa, lora]]  # group labels, or values of one grid axis
      metric: test.accuracy                        # default: the spec's first metric; a list: each
      bootstrap: 2000                              # item-bootstrap replicates; 0: the t interval only
      # reference: cr-only                         # instead of pairs: every other variant (or method) vs it
    reuse: [results/nlu-main-rotten-tomatoes]      # optional: other comparisons' output_dirs whose finished
                                                   #   runs of a cell's exact training it adopts (below)

``selection`` (`balora.experiments.selection`): before the grid, every group (the non-seed grid values,
e.g. one method) trains each candidate of its search space on the selection seeds with
``eval.validation: true, eval.test: false`` — the validation split (carved from the training data by
``data.split_seed``; the run config must have one) is read, the test split is not. The best mean
validation metric wins (ties: the candidate listed first); the grid's cells of that group then run
with it. The search cells live in ``<output_dir>/selection/cells/``, resume and shard like the grid's;
the choice is in ``selection/selection.json`` and the summary (a table and ``plots/selection.png``).

A cell is not trained twice (`balora.experiments.reuse`): the final cell of a selection seed, and a
cell whose exact training a finished cell of a ``reuse`` comparison did (same method, seed and every
option that changes training), starts from that run's final checkpoint and only evaluates; its
result.json says where (``trained_in``). Without such a checkpoint (a fresh clone keeps none) it trains.

``variants`` is for rows that are not a cartesian product (an ablation: each term alone). It adds a
grid axis named ``variant``, placed first, whose values are the variant names; a cell applies its
variant's options after the overrides and before the other grid keys. An empty mapping (``{}``) is
the base configuration.

A metric path is looked up in a cell's ``metrics`` first, then at the top of its ``result.json``:
``test.accuracy``, ``eval.asdiv.accuracy`` (evaluation harness), ``forgetting``, ``train_seconds``.
A ``lower_is_better`` entry matches a path equal to it or ending in ``.<entry>``.

Every cell's configuration (base → overrides → grid values) is checked before anything runs; an
error names the spec, the grid key and the option's path. ``output_dir`` cannot be set by the grid or
the overrides: a cell always trains into ``<output_dir>/cells/<id>/run``.

Layout and resumption
---------------------
::

    <output_dir>/cells/<id>/result.json   one per finished cell (ok or failed), written atomically
    <output_dir>/cells/<id>/run/          the run directory of `balora train`
    <output_dir>/summary.md, summary.json, plots/{metrics,curves,cost}.png
    <output_dir>/selection/cells/<id>/, selection/selection.json   with a selection block

Several processes may share one spec (one per GPU or core; or ``--shard I/N``): a process claims a
cell by creating ``cells/<id>/running.pid`` atomically and skips cells claimed by a live process.
Cells run sequentially in grid order. A cell with a ``result.json`` is skipped (``--retry-failed``
re-runs the failed ones). A cell killed mid-training has no ``result.json``: the next invocation
*resumes* it from its latest checkpoint in ``run/checkpoints`` (steps already done are not redone);
a cell whose ``run/metrics.json`` exists finished training and only its evaluation is redone. An
exception in a cell is retried ``retries`` times (default 1; a retry resumes the same way) and then
recorded as failed, with the error, in ``result.json`` and in the summary. If the spec changed so
that a cell's stored configuration differs from the new one, compare stops and names the differing
keys instead of mixing results of two configurations.

``result.json`` (``schema_version`` 1)
--------------------------------------
::

    schema_version        1
    cell_id               "method=pissa,training.seed=2" (sanitised to a directory name)
    grid                  {"method": "pissa", "training.seed": 2}: this cell's grid values
    group                 "method=pissa": the grid values except the seed keys
    seed                  training.seed as trained (the Trainer's default when unset)
    method                adapter method
    status                "ok" | "failed"
    error                 null | {"type", "message", "traceback"} of the last attempt
    attempts              attempts made by the invocation that wrote this file
    metrics               {"validation": {...} (eval.validation), "test": {...}, "untuned": {...}
                          (eval.before_training), "eval": {task: {...}}}
    forgetting            eval.forgetting.forgetting = CE(tuned) - CE(base), or null
    trainable_parameters  int | null;  total_parameters: int | null
    adapter_bytes         bytes under run/adapter/, or null
    peak_rss_mb           metrics.json's peak_rss_mb: this *process's* peak, so with several cells in
                          one process it never decreases from cell to cell
    cell_peak_rss_mb      the process's peak RSS during this cell (Linux: VmHWM, reset through
                          /proc/self/clear_refs when the cell starts; what earlier cells left resident
                          is included), or null where that is unavailable; the summary uses it
    peak_gpu_mb           torch.cuda.max_memory_allocated during the cell, or null without CUDA
    train_seconds         metrics.json's train time (a resumed run counts its last leg only)
    wall_seconds          the cell's wall time in this invocation, all attempts and evaluation included
    global_step           int | null
    train_tokens          prompt + response tokens of the training split (NLG data statistics) or null
    data                  metrics.json's data statistics
    run_dir               "cells/<id>/run", relative to output_dir
    trained_in            "selection/cells/<id>" when the cell started from the final checkpoint of the
                          search cell that trained its exact configuration (then only its evaluation ran
                          here; train_seconds is that search's), else null
    config                the full resolved run configuration
    versions              library versions
    finished_at           ISO 8601 UTC

Summary rule
------------
Cells are grouped by all grid keys except the seed keys (``training.seed`` and any key ending in
``seed``). Each column is the mean ± the sample standard deviation (n − 1) over the group's ok cells
that have the metric. The best mean of each metric column is in bold. Each group gets one line: the
best group of a metric is compared with the runner-up, every other group with the best. Two means are
separated *beyond the seed spread* when the difference of the means is larger than the larger of the
two standard deviations; with fewer than 2 values on either side the comparison is undetermined. This
is a heuristic that flags differences the seeds alone do not explain, not a significance test.

Paired differences (`balora.experiments.paired`): cells with the same seed share data order, head
and adapter initialisation, so each pair of ``paired:`` (A, B) is compared per seed: Δ = A − B on
``paired.metric`` for every seed both have, its mean, a 95 % t interval over the seeds (mean ±
t(0.975, n − 1)·sd/√n) and a 95 % paired bootstrap over the test items (``bootstrap`` replicates; each
resamples the item indices once for every seed; per-item scores from ``run/predictions/test.json`` for
``test.accuracy``, ``run/eval/records/<task>.jsonl`` for ``eval.<task>.accuracy``). The rule: A beats
B only when both 95 % intervals (t over seeds, paired bootstrap over test items) exclude 0 on the
positive side; 'is beaten by' when both exclude it on the negative side; otherwise inconclusive (sides
swapped for a lower-is-better metric; without per-item scores the t interval decides alone and the
summary says ``bootstrap: null``). A name in ``pairs`` is a group label (``method=pissa``) or a value
of one grid axis (``pissa``): with other non-seed axes, A and B are paired per value of those (e.g.
per task); a name matching no group is an error before anything runs. Without ``pairs``: with
``reference``, every other variant (no variants: method) against it; else (ba-lora, pissa), (ba-lora,
lora), (pissa, lora) among the methods of a ``method`` grid axis; else no pairs (and no section).

Modules
-------
`balora.experiments.spec` (reading and checking the spec), `.grid` (the cells), `.store` (result.json,
the stale check, pid claims), `.runner` (running cells, `run_compare`), `.stats` (mean ± std, the
seed-spread rule), `.paired` (paired differences per seed, the verdict rule), `.report` (summary.json,
summary.md), `.plots` (PNG plots). This module documents
the format and re-exports the names callers use.
"""

from __future__ import annotations

from balora.experiments.grid import Cell, build_cells
from balora.experiments.report import render_markdown, summarize, write_summary
from balora.experiments.runner import CallbackFactory, run_cell, run_compare
from balora.experiments.spec import CompareSpec, load_spec, spec_from_dict
from balora.experiments.stats import lookup
from balora.experiments.store import SCHEMA_VERSION, cell_state, check_stale

__all__ = ["SCHEMA_VERSION", "CallbackFactory", "Cell", "CompareSpec", "build_cells", "cell_state", "check_stale",
           "load_spec", "lookup", "render_markdown", "run_cell", "run_compare", "spec_from_dict", "summarize",
           "write_summary"]
