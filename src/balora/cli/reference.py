"""``balora reference build CONFIG``: the reference cache of a run configuration (docs/design/reference-cache.md),
built before training, e.g. once for several runs, or on a machine with more memory. ``reference_cache: auto``
in that configuration, or its path, then uses it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _cmd_build(args: argparse.Namespace) -> int:
    # torch, transformers and PEFT load here, when the command runs, not for `balora --help`
    import dataclasses

    import torch

    from balora.core.adapters import build_peft_model
    from balora.training.reference_store import store_for_run
    from balora.training.run import load_base_model, load_tokenizer, prepare_data
    from balora.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, output_dir=str(Path(cfg.output_dir).expanduser().resolve()))
    tokenizer = load_tokenizer(cfg)
    data = prepare_data(cfg, tokenizer)
    model = load_base_model(cfg, data.label_map)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = build_peft_model(model, cfg.adapter_config(), cfg.model.task)
    device = "cpu" if cfg.training.get("use_cpu") or not torch.cuda.is_available() else "cuda"
    path = Path(args.out).expanduser().resolve() if args.out else Path(cfg.output_dir) / "reference_cache"
    max_bytes = None if args.max_gb is None else int(args.max_gb * 1e9)
    store = store_for_run(dataclasses.replace(cfg, reference_cache="auto"), peft_model, tokenizer, data.train,
                          data.collator, Path(cfg.output_dir), device, path=path,
                          **({} if max_bytes is None else {"max_bytes": max_bytes}))
    if store is None:
        print("balora reference build: this configuration trains without the reference forward or cannot use a "
              "cache (see the log); nothing built")
        return 1
    print(f"reference cache: {store.path} ({len(store)} examples, task {store.task}); use it with "
          f"reference_cache: {'auto' if args.out is None else store.path}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``reference build`` to the `balora` command's subparsers."""
    p = subparsers.add_parser("reference", parents=parents, help="the pre-trained model's outputs, cached on disk")
    sub = p.add_subparsers(dest="reference_command", required=True)
    b = sub.add_parser("build", parents=parents, help="build (or resume) the reference cache of a run configuration")
    b.add_argument("config", help="YAML run configuration")
    b.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, as for balora train")
    b.add_argument("--out", help="where to write it (default: <output_dir>/reference_cache, what "
                                 "reference_cache: auto reads)")
    b.add_argument("--max-gb", type=float, help="refuse above this estimated size (default 20)")
    b.set_defaults(func=_cmd_build)
