"""``balora push RUN_DIR REPO_ID``: share a finished run on the hub — ``adapter/`` and ``lora_converted/``
as sub-folders, the model card (`balora.training.model_card`) at the repository root.

What is uploaded is assembled in a staging folder first: the artefacts as saved, their
``adapter_config.json`` naming the base model by its hub id (``asset:NAME`` → its upstream id), the
card in each folder. ``--dry-run OUT_DIR`` writes that folder and uploads nothing. Never uploaded:
``checkpoints/`` (optimizer states), logs, the configuration's local paths.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ARTEFACTS = ("adapter", "lora_converted")
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class PushError(RuntimeError):
    """A run that cannot be shared (not finished, an artefact incomplete) or a refused destination."""


def _artefact_problem(folder: Path) -> str | None:
    if not folder.is_dir():
        return "missing"
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_config.json").stat().st_size:
        return "no adapter_config.json"
    if not any((folder / w).is_file() and (folder / w).stat().st_size for w in WEIGHTS):
        return "no adapter weights"
    return None


def _complete_converted(adapter: Path, converted: Path) -> list[str]:
    """A ``lora_converted/`` written before balora carried ``modules_to_save`` (the classification head)
    through PEFT's PiSSA conversion lacks those tensors; they are the same as in ``adapter/`` (same
    names), so they are added from there. Returns the names added."""
    from safetensors.torch import load_file, save_file

    config = json.loads((converted / "adapter_config.json").read_text(encoding="utf-8"))
    weights, source = converted / WEIGHTS[0], adapter / WEIGHTS[0]
    if not config.get("modules_to_save") or not weights.is_file() or not source.is_file():
        return []
    tensors, trained = load_file(weights), load_file(source)
    missing = {k: v for k, v in trained.items() if k not in tensors and "lora_" not in k}
    if missing:
        save_file({**tensors, **missing}, weights, metadata={"format": "pt"})
        print(f"lora_converted/: added the trained {', '.join(sorted(missing))} from adapter/ (saved by an "
              "older balora without them)", file=sys.stderr)
    return sorted(missing)


def stage(run_dir: str | Path, repo_id: str | None, out: str | Path, what: tuple[str, ...] = ARTEFACTS) -> Path:
    """Write into ``out`` (absent or empty) the folder that ``balora push`` uploads for the finished run
    ``run_dir``; raises `PushError` for a run that did not finish or whose artefacts are incomplete."""
    from balora.training.model_card import adapter_metadata, base_model_id, build_model_card
    from balora.training.run import finished_metrics
    from balora.training.run_config import run_config_from_dict
    from balora.utils import describe_incomplete, read_json, write_json, write_text_atomic

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise PushError(f"{run}: not a run directory (no config.yaml)")
    metrics = finished_metrics(run)
    if metrics is None:
        state = describe_incomplete(run) or "no readable metrics.json"
        raise PushError(f"{run}: the run has not finished ({state}); only a finished run is shared. "
                        "Finish it with `balora train CONFIG --resume`")
    unknown = [name for name in what if name not in ARTEFACTS]
    if unknown or not what:
        raise PushError(f"--what: choose from {', '.join(ARTEFACTS)}; got {', '.join(what) or 'nothing'}")
    for name in what:
        problem = _artefact_problem(run / name)
        if problem:
            way_out = ("`balora export RUN_DIR --convert` writes it" if name == "lora_converted"
                       else "`balora train CONFIG --resume` finishes the run")
            raise PushError(f"{run / name}: {problem}; the run's artefacts are incomplete ({way_out}), or leave it "
                            f"out with --what")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PushError(f"{out}: exists and is not an empty directory; choose another --dry-run folder")

    cfg = run_config_from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")))
    label_map = read_json(run / "label_map.json") if (run / "label_map.json").is_file() else None
    hub_id, _ = base_model_id(cfg.model.name)
    targets: list[str] | None = None
    out.mkdir(parents=True, exist_ok=True)
    for name in what:
        target = out / name
        shutil.copytree(run / name, target, ignore=shutil.ignore_patterns(".*"))
        config = read_json(target / "adapter_config.json")
        config["base_model_name_or_path"] = hub_id
        targets = targets or sorted(config.get("target_modules") or []) or None
        write_json(target / "adapter_config.json", config)
        meta_path = target / "balora_adapter.json"
        if meta_path.is_file():  # runs saved before the hub id was recorded get it now
            recorded = adapter_metadata(cfg)
            meta = {**recorded, **read_json(meta_path)}
            meta.update(base_model_hub_id=recorded["base_model_hub_id"], asset=recorded["asset"])
            write_json(meta_path, meta)
    if "lora_converted" in what and (run / "adapter").is_dir():
        _complete_converted(run / "adapter", out / "lora_converted")
    card = build_model_card(cfg, metrics, repo_id=repo_id, label_map=label_map, artefacts=tuple(what),
                            target_modules=targets)
    write_text_atomic(out / "README.md", card)
    for name in what:
        write_text_atomic(out / name / "README.md", card)
    return out


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         what: tuple[str, ...] = ARTEFACTS, commit_message: str | None = None) -> str:
    """Stage the run (`stage`) and upload it with ``huggingface_hub.HfApi``: ``create_repo``
    (``exist_ok``), ``create_branch`` for a ``revision``, one ``upload_folder`` commit; returns the
    commit's URL."""
    from huggingface_hub import HfApi

    run = Path(run_dir)
    with tempfile.TemporaryDirectory(prefix="balora-push-") as tmp:
        folder = stage(run, repo_id, Path(tmp) / "upload", what)
        method = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")).get("method", "ba-lora")
        message = commit_message or f"balora push: {method} run {run.resolve().name} ({', '.join(what)}, model card)"
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                   commit_message=message)
    return str(getattr(commit, "commit_url", commit))


def _listing(folder: Path) -> list[str]:
    return [f"  {p.relative_to(folder)}  ({p.stat().st_size:,} bytes)" for p in sorted(folder.rglob("*"))
            if p.is_file()]


def _cmd_push(args: argparse.Namespace) -> int:
    what = tuple(part.strip() for part in args.what.split(",") if part.strip())
    try:
        if args.dry_run:
            folder = stage(args.run_dir, args.repo_id, args.dry_run, what)
            print(f"dry run: {folder} holds what `balora push` would upload to {args.repo_id}; nothing uploaded")
            print("\n".join(_listing(folder)))
            return 0
        url = push(args.run_dir, args.repo_id, private=args.private, revision=args.revision, what=what,
                   commit_message=args.message)
    except PushError as error:
        print(f"balora push: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # the hub's errors (authentication, network, permissions)
        if type(error).__module__.split(".")[0] not in ("huggingface_hub", "requests", "httpx"):
            raise
        print(f"balora push: error: the upload to {args.repo_id} failed: {error}. Log in with "
              "`hf auth login` (or set HF_TOKEN); --dry-run DIR shows what would be uploaded", file=sys.stderr)
        return 2
    print(f"pushed {', '.join(what)} and the model card of {args.run_dir} to {args.repo_id}: {url}")
    return 0


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``push`` to the `balora` command's subparsers."""
    p = subparsers.add_parser(
        "push", parents=parents, help="share a finished run on the hub: adapter/, lora_converted/, model card",
        description="Upload a finished run's adapter/ and lora_converted/ (as sub-folders) and its generated "
                    "model card (at the repository root) with huggingface_hub. Checkpoints are never uploaded.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (status.json: finished)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub repository, e.g. you/balora-minilm-rotten-tomatoes")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="the branch to commit to (created if absent; default: main)")
    p.add_argument("--what", default=",".join(ARTEFACTS),
                   help="comma-separated artefacts to upload (default: adapter,lora_converted)")
    p.add_argument("--message", default=None, help="the commit message")
    p.add_argument("--dry-run", metavar="OUT_DIR", default=None,
                   help="write the folder that would be uploaded into OUT_DIR (absent or empty); upload nothing")
    p.set_defaults(func=_cmd_push)
    return p


__all__ = ["ARTEFACTS", "PushError", "add_parser", "push", "stage"]
