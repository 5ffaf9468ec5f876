"""A run directory is always in a known state and nothing is lost (issue 14): the lock, NaN and
finite divergence, incomplete checkpoints, status.json, `--resume` rules, corrupt compare results, and
kills (SIGKILL) at the named points of `balora.training.faults` resumed to the same adapter."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_bert, make_word_tokenizer
from safetensors.torch import load_file

from balora.cli import main
from balora.experiments.compare import run_compare
from balora.utils import FileLock, read_status, write_text_atomic


def run_cli(argv: list[str], fault: str) -> None:
    """``balora ARGV`` in this process with ``BALORA_FAULT=fault`` (the target of a child process)."""
    from balora.training import faults

    os.environ[faults.ENV] = fault
    faults._seen.clear()
    main(argv)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_bert().save_pretrained(root / "tiny-bert")
    make_word_tokenizer().save_pretrained(root / "tiny-bert")
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(60)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def base_config(assets: Path, run: Path, method: str = "ba-lora") -> dict:
    return {"method": method, "output_dir": str(run), "model": {"name": str(assets / "tiny-bert"), "task": "nlu"},
            "adapter": {"r": 4}, "data": {"source": str(assets / "data.jsonl"), "test_fraction": 0.2, "max_length": 16},
            "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                         "logging_steps": 2, "save_steps": 1, "use_cpu": True}}


@pytest.fixture
def config(tmp_path, assets):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(assets, tmp_path / "run")))
    return path, tmp_path / "run"


def train(config: Path, *extra: str) -> int:
    return main(["train", str(config), *extra, "--no-progress"])


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def same_adapter(a: Path, b: Path) -> bool:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------- 2: two runs into one output_dir
def test_a_second_run_into_a_locked_output_dir_is_refused_and_a_dead_lock_is_taken_over(config, capsys, caplog):
    path, run = config
    run.mkdir()
    (run / "config.yaml").write_text("method: pissa\n")
    with FileLock(run / ".lock", "output_dir"):  # another run holds it (this process, alive)
        assert train(path) == 2
    err = capsys.readouterr().err
    assert "is in use by process" in err and str(run / ".lock") in err
    assert (run / "config.yaml").read_text() == "method: pissa\n"  # the holder's files are untouched
    assert not (run / ".lock").exists()

    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start()
    dead.join()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(),
                                           "started_at": "then"}))
    assert train(path) == 0  # a lock of a dead process on this host is taken over
    assert "took over the lock" in caplog.text
    assert not (run / ".lock").exists() and read_status(run)["state"] == "finished"


# ---------------------------------------------------------------- 3 and 10: divergence
def test_a_checkpoint_with_non_finite_weights_is_never_written(tmp_path, assets, capsys):
    cfg = base_config(assets, tmp_path / "run", method="lora")
    cfg["training"].update(learning_rate=1e30, logging_steps=4, max_steps=6, save_total_limit=None)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert train(tmp_path / "run.yaml") == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "the last finite checkpoint is" in err
    written = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert written, "the first steps are finite and are saved"
    for checkpoint in written:
        tensors = load_file(str(checkpoint / "adapter_model.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values()), checkpoint.name
    assert str(written[-1]) in err
    assert read_status(tmp_path / "run")["state"] == "failed"


def test_a_finite_divergence_stops_training(config, capsys):
    path, run = config
    assert train(path, "training.learning_rate=1e3", "training.logging_steps=1", "training.max_steps=6") == 2
    err = capsys.readouterr().err
    assert "exceeds divergence_factor 100" in err and "the last finite checkpoint is" in err
    assert not (run / "metrics.json").exists() and not (run / "adapter").exists()
    status = read_status(run)
    assert status["state"] == "failed" and "FloatingPointError" in status["reason"]


# ---------------------------------------------------------------- 4 and 11: incomplete runs
def test_a_kill_during_the_final_save_is_reported_and_resumed_from_the_last_complete_checkpoint(config, capsys,
                                                                                                 caplog):
    path, run = config
    assert train(path) == 0
    finished = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    # what a kill during the final save (after a kill during a checkpoint save) leaves behind
    for f in (run / "adapter").iterdir():
        f.unlink()
    (run / "metrics.json").unlink()
    status = read_status(run)
    (run / "status.json").write_text(json.dumps({**status, "state": "running", "phase": "saving"}))
    (run / "checkpoints" / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    (run / "checkpoints" / "checkpoint-5").mkdir()

    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "incomplete: killed or failed during saving" in out
    adapter_line = next(line for line in out.splitlines() if line.startswith("  adapter "))
    assert "empty" in adapter_line and "MB" not in adapter_line
    assert main(["export", str(run), "--merge"]) == 2
    assert "no trained adapter to export (empty" in capsys.readouterr().err

    assert train(path, "--resume") == 0
    err = caplog.text
    assert "skipping the incomplete" in err and "checkpoint-5 (empty" in err and "optimizer.pt" in err
    assert "continuing from" in err and "checkpoint-3" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["test"] == finished["test"]  # not 5: no extra step
    assert read_status(run)["state"] == "finished"

    caplog.clear()
    assert train(path, "--resume") == 0  # a finished run: nothing to do
    assert "already finished" in caplog.text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_info_on_a_truncated_metrics_json_and_output_dir_errors(config, tmp_path, capsys):
    path, run = config
    assert train(path) == 0
    (run / "metrics.json").write_text('{"method": "ba-lo')
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    assert "metrics.json: truncated or not valid JSON" in capsys.readouterr().out
    (tmp_path / "a-file").write_text("")
    assert train(path, f"output_dir={tmp_path / 'a-file' / 'run'}") == 2
    assert "output_dir=" in capsys.readouterr().err


# ---------------------------------------------------------------- 9: --resume with another configuration
def test_resume_with_another_configuration_is_refused_unless_forced(config, capsys):
    path, run = config
    assert train(path, "training.max_steps=2") == 0
    stored = (run / "config.yaml").read_text()
    capsys.readouterr()
    assert train(path, "training.max_steps=2", "method=pissa", "data.test_fraction=0.3", "--resume") == 2
    err = capsys.readouterr().err
    assert "method: 'ba-lora' -> 'pissa'" in err and "data.test_fraction: 0.2 -> 0.3" in err and "--force" in err
    assert (run / "config.yaml").read_text() == stored  # written only after the checks
    assert train(path, "training.max_steps=2", "data.test_fraction=0.3", "--resume", "--force") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["test_fraction"] == 0.3


# ---------------------------------------------------------------- 5: corrupt compare results
def write_spec(tmp_path: Path, assets: Path, out: str = "out", save_steps: int | None = None) -> Path:
    base = base_config(assets, tmp_path / "unused", method="lora")
    del base["output_dir"]
    if save_steps is None:
        base["training"]["save_strategy"] = "no"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "tiny", "base": "base.yaml", "output_dir": str(tmp_path / out),
            "grid": {"method": ["lora"], "training.seed": [1]}, "metrics": ["test.accuracy"]}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_corrupt_result_json_is_moved_aside_and_redone_and_a_truncated_metrics_json_retrains(
        tmp_path, assets, caplog):
    spec = write_spec(tmp_path, assets)
    quiet = lambda message: None  # noqa: E731
    assert run_compare(spec, show_progress=False, say=quiet)["cells"]["ok"] == 1
    cell = next((tmp_path / "out" / "cells").iterdir())
    first = json.loads((cell / "result.json").read_text())
    (cell / "result.json").write_text('{"schema_version": 1, "sta')
    rows = run_compare(spec, dry_run=True, say=quiet)["cells"]
    assert rows[0]["state"] == "corrupt" and str(cell / "result.json") in caplog.text
    assert run_compare(spec, only_summary=True, say=quiet)["cells"]["pending"] == 1
    said: list[str] = []
    assert run_compare(spec, show_progress=False, say=said.append)["cells"]["ok"] == 1
    assert any("moved to result.json.corrupt-" in m for m in said)
    assert len(list(cell.glob("result.json.corrupt-*"))) == 1
    assert json.loads((cell / "result.json").read_text())["metrics"] == first["metrics"]

    (cell / "result.json").unlink()
    write_text_atomic(cell / "run" / "metrics.json", '{"method": "lo')
    said.clear()
    assert run_compare(spec, show_progress=False, say=said.append)["cells"]["ok"] == 1
    assert any("does not parse" in m for m in said)
    assert json.loads((cell / "result.json").read_text())["metrics"] == first["metrics"]


# ---------------------------------------------------------------- fault injection: SIGKILL and resume
def killed(argv: list[str], fault: str) -> None:
    """Run ``balora ARGV`` in a child process that SIGKILLs itself at ``fault`` (balora.training.faults)."""
    ctx = multiprocessing.get_context("forkserver")  # a clean process with the imports done once
    child = ctx.Process(target=run_cli, args=(argv, fault))
    child.start()
    child.join(180)
    assert child.exitcode == -signal.SIGKILL, f"{fault}: exit code {child.exitcode}"


def test_a_run_killed_at_each_point_resumes_to_the_same_adapter_and_metrics(tmp_path, assets):
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["balora.cli", "balora.training.run", "balora.experiments.runner"])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_config(assets, tmp_path / "reference")))
    assert train(path) == 0
    reference = json.loads((tmp_path / "reference" / "metrics.json").read_text())

    for fault in ("step:3", "checkpoint:2", "evaluate:1", "final-save:1"):
        run = tmp_path / fault.replace(":", "-")
        killed(["train", str(path), f"output_dir={run}", "--no-progress", "--threads", "1"], fault)
        assert read_status(run)["state"] == "running" and not (run / "metrics.json").exists(), fault
        assert train(path, f"output_dir={run}", "--resume") == 0, fault
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["global_step"] == 4 and metrics["test"] == reference["test"], fault
        assert same_adapter(run, tmp_path / "reference"), fault

    spec = write_spec(tmp_path, assets, save_steps=1)
    killed(["compare", str(spec), "--no-progress", "--threads", "1"], "step:3")
    cell = next((tmp_path / "out" / "cells").iterdir())
    assert not (cell / "result.json").exists() and (cell / "run" / "checkpoints" / "checkpoint-2").is_dir()
    quiet = lambda message: None  # noqa: E731
    assert run_compare(spec, show_progress=False, say=quiet)["cells"]["ok"] == 1
    uninterrupted = write_spec(tmp_path, assets, out="again", save_steps=1)
    assert run_compare(uninterrupted, show_progress=False, say=quiet)["cells"]["ok"] == 1
    again = next((tmp_path / "again" / "cells").iterdir())
    assert same_adapter(cell / "run", again / "run")
    assert (json.loads((cell / "result.json").read_text())["metrics"]
            == json.loads((again / "result.json").read_text())["metrics"])
