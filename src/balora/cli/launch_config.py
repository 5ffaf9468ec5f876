"""``balora launch-config ENGINE``: the path of the accelerate configuration shipped for ENGINE (ddp, fsdp2,
zero2, zero3), for ``accelerate launch --config_file "$(balora launch-config fsdp2)" -m balora.cli train ...``;
``--show`` prints it instead, to copy and edit. What each engine supports: docs/guide/distributed.md."""

from __future__ import annotations

import argparse
from importlib import resources
from typing import Any

ENGINES = ("ddp", "fsdp2", "zero2", "zero3")


def _cmd(args: argparse.Namespace) -> int:
    path = resources.files("balora") / "configs" / "accelerate" / f"{args.engine}.yaml"
    print(path.read_text(encoding="utf-8") if args.show else str(path), end="" if args.show else "\n")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``launch-config`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("launch-config", parents=parents,
                              help="the packaged accelerate configuration of a distributed engine")
    p.add_argument("engine", choices=ENGINES, help="ddp | fsdp2 | zero2 (DeepSpeed) | zero3 (DeepSpeed)")
    p.add_argument("--show", action="store_true", help="print the YAML instead of its path")
    p.set_defaults(func=_cmd)
    return p
