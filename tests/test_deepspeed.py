"""BA-LoRA under DeepSpeed ZeRO-2 and ZeRO-3 (two CPU processes, gloo) through transformers' Trainer: ZeRO-2
ends with the adapter of one process with the same global batch; ZeRO-3 trains PiSSA (the logit-free path
falls back to full logits) and refuses BA-LoRA's snapshot reference, naming the alternatives; a checkpoint
written under either resumes to the adapter of the run that went through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).parent / "deepspeed_train.py"
ZERO2 = ["ba-lora:nlg", "ba-lora:nlu", "pissa:nlg"]


def _launch(out: Path, mode: str, runs: list[str], phase: str = "") -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), str(out), mode, ",".join(runs)] + ([phase] if phase else [])
    if mode != "single":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29_500 + os.getpid() % 200)] + cmd[1:]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    _launch(out, "single", ZERO2)
    for run in ZERO2:  # one launch per run: accelerate allows one DeepSpeed plugin per process
        _launch(out, "zero2", [run])
    _launch(out, "zero3", ["pissa:nlg"])
    _launch(out, "zero3", ["ba-lora:nlg"])
    for mode, run in (("zero2", "ba-lora:nlg"), ("zero3", "pissa:nlg")):  # checkpoint at step 2, resume
        _launch(out, mode, [run], "save")
        _launch(out, mode, [run], "resume")
    return out


def _adapters(out: Path, run: str, mode: str) -> tuple[dict, dict]:
    name = run.replace(":", "-")
    return torch.load(out / f"{name}-single.pt"), torch.load(out / f"{name}-{mode}.pt")


@pytest.mark.parametrize("run", ZERO2)
def test_zero2_adapter_equals_the_single_process_run(runs: Path, run: str) -> None:
    single, zero = _adapters(runs, run, "zero2")
    moved = max((single["adapter"][k] - single["initial"][k]).abs().max().item() for k in single["adapter"])
    assert moved > 1e-3
    for key, expected in single["adapter"].items():  # measured: bit-identical here
        torch.testing.assert_close(zero["adapter"][key], expected, rtol=1e-5, atol=1e-6, msg=key)


def test_zero3_trains_pissa_like_one_process(runs: Path) -> None:
    single, zero = _adapters(runs, "pissa:nlg", "zero3")
    for key, expected in single["adapter"].items():  # measured: 2.4e-7 (full logits instead of the fused path)
        torch.testing.assert_close(zero["adapter"][key], expected, rtol=1e-4, atol=1e-6, msg=key)


def test_zero3_refuses_ba_loras_snapshot_reference(runs: Path) -> None:
    error = (runs / "ba-lora-nlg-zero3.error").read_text()
    assert error.startswith("SnapshotUnavailableError") and "ZeRO-3" in error and "FSDP2" in error
    assert not (runs / "ba-lora-nlg-zero3.pt").exists()


@pytest.mark.parametrize("mode, run", [("zero2", "ba-lora:nlg"), ("zero3", "pissa:nlg")])
def test_a_zero_checkpoint_resumes_to_the_same_adapter(runs: Path, mode: str, run: str) -> None:
    """Trained through (checkpoints at 2), then a fresh trainer resumed from checkpoint-2: same adapter."""
    from balora.training.trainer import checkpoint_problem

    name = run.replace(":", "-")
    assert checkpoint_problem(runs / f"run-{name}-{mode}-save" / "checkpoint-2") is None
    through = torch.load(runs / f"{name}-{mode}-save.pt")
    resumed = torch.load(runs / f"{name}-{mode}-resume.pt")
    for key, expected in through["adapter"].items():  # measured: identical
        torch.testing.assert_close(resumed["adapter"][key], expected, rtol=0, atol=0, msg=key)
