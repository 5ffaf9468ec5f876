"""The `balora` command: train, export, info, assets, demo, eval, compare, lab, presets, launch-config, reference.

Each sub-command's parser and handler live in their own module here; the library code they call
lives in `balora.training`, `balora.evaluation` and `balora.experiments`. Heavy imports (torch,
transformers) happen inside the handlers, so ``balora --help`` and ``balora assets list`` stay fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from balora import __version__
from balora.cli import assets, compare, demo, eval, lab, launch_config, presets, push, reference, train


def _shared_options() -> list[argparse.ArgumentParser]:
    """Options every sub-command accepts after its name (``balora train -v ...``)."""
    shared = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a sub-command that is not given -v must not reset the value set before its name
    shared.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="info-level logging")
    shared.add_argument("--threads", type=int, metavar="N", default=argparse.SUPPRESS,
                        help="torch CPU threads (on a shared or busy CPU, 1 per process is often fastest)")
    return [shared]


def build_parser() -> argparse.ArgumentParser:
    """The whole `balora` command line."""
    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning on transformers + PEFT")
    parser.add_argument("--version", action="version", version=f"balora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", required=True)
    parents = _shared_options()
    train.add_parsers(sub, parents)
    assets.add_parser(sub, parents)
    demo.add_parser(sub, parents)
    compare.add_parser(sub, parents)
    eval.add_parser(sub, parents)
    lab.add_parser(sub, parents)
    push.add_parser(sub, parents)
    presets.add_parser(sub, parents)
    launch_config.add_parser(sub, parents)
    reference.add_parser(sub, parents)
    return parser


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise SystemExit(f"balora: --threads must be >= 1, got {threads}")
    import torch  # only when asked: most commands import it anyway, `assets list` does not

    torch.set_num_threads(threads)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, except that ``KEY=VALUE`` overrides may also follow an option
    (``balora train run.yaml --threads 1 training.max_steps=5``): argparse ends a ``nargs="*"``
    positional at the first option, so what comes after it is collected here, in order."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and not any(x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # and when logging was configured before (an embedding program, pytest): -v also shows the libraries'
    # known warnings that balora otherwise silences (balora.training.quiet)
    logging.getLogger("balora").setLevel(logging.INFO if args.verbose else logging.NOTSET)
    _set_threads(getattr(args, "threads", None))
    # imported here so that `balora --help` does not load what this command does not need
    from balora.assets import AssetError
    from balora.core.config import ConfigError
    from balora.training.data import DataError

    expected: tuple[type[BaseException], ...] = (ConfigError, DataError, AssetError, FileNotFoundError,
                                                 FileExistsError, FloatingPointError, OSError)
    try:
        return int(args.func(args) or 0)
    except expected as error:
        print(f"balora {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
