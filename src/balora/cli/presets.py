"""``balora presets``: the run configurations shipped with the package (the repository's ``configs/``).

``balora presets`` lists them with the first line of their leading comment; ``balora presets show NAME``
prints one, to copy and edit. ``balora train NAME`` runs one when no file NAME exists.
"""

from __future__ import annotations

import argparse
from typing import Any


def _first_comment(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def _cmd_presets(args: argparse.Namespace) -> int:
    # imported here so that `balora --help` does not load what this command does not need
    from balora.training.run_config import preset_names, preset_path

    names = preset_names()
    if args.action == "list":
        if args.name is not None:
            raise SystemExit(f"balora presets: list takes no name (did you mean `balora presets show {args.name}`?)")
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {_first_comment(preset_path(f'{name}.yaml').read_text(encoding='utf-8'))}")
        return 0
    if args.name is None:
        raise SystemExit(f"balora presets show: which preset? one of: {', '.join(names)}")
    stem = args.name[: -len(".yaml")] if args.name.endswith(".yaml") else args.name
    if stem not in names:
        raise FileNotFoundError(f"{args.name!r} is not a packaged preset; known: {', '.join(names)}")
    print(preset_path(f"{stem}.yaml").read_text(encoding="utf-8"), end="")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``presets`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("presets", parents=parents,
                              help="the packaged run configurations: list them, or show one")
    p.add_argument("action", nargs="?", choices=["list", "show"], default="list",
                   help="list (default): name and description of each; show NAME: print its YAML")
    p.add_argument("name", nargs="?", help="with show: the preset (as listed, .yaml optional)")
    p.set_defaults(func=_cmd_presets)
    return p
