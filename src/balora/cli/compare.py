"""``balora compare SPEC.yaml``: the command line of `balora.experiments.compare`."""

from __future__ import annotations

import argparse
import re
from typing import Any


def _parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with 1 <= I <= N, e.g. 1/2; got {text!r}")
    return int(match[1]), int(match[2])


def _cmd_compare(args: argparse.Namespace) -> int:
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    from balora.experiments.compare import run_compare

    summary = run_compare(args.spec, retries=args.retries, dry_run=args.dry_run, only_summary=args.only_summary,
                          retry_failed=args.retry_failed, show_progress=not args.no_progress, shard=args.shard)
    if args.dry_run:
        return 0
    return 1 if summary["cells"]["failed"] else 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``balora compare SPEC.yaml`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("compare", parents=parents,
                              help="run a grid of configurations (methods × seeds) and summarise it",
                              description="Run every cell of a comparison spec (resumably), then write "
                                          "summary.md, summary.json and plots/. Exit status 1 if a cell failed.")
    p.add_argument("spec", help="YAML comparison spec (base, grid, overrides, metrics; see balora.experiments.compare)")
    p.add_argument("--retries", type=int, default=1, help="retries of a crashed cell before it is recorded as "
                                                          "failed (default 1)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--only-summary", action="store_true", help="rebuild summary and plots from result.json files")
    p.add_argument("--retry-failed", action="store_true", help="run the cells recorded as failed again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar during training")
    p.add_argument("--shard", type=_parse_shard, metavar="I/N",
                   help="run only every N-th cell starting at the I-th, so N processes can share the grid; "
                        "then --only-summary once all are done")
    p.set_defaults(func=_cmd_compare)
    return p
