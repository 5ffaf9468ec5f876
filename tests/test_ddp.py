"""Two-process DDP on CPU (gloo) under `accelerate launch`: every rank builds the same PiSSA residual
and reference snapshot, and training ends with the same adapter on both ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def test_two_process_accelerate_run_agrees_across_ranks(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the Trainer (use_cpu=True) uses gloo.
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           str(SCRIPT), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["snapshot"] == rank1["snapshot"]
    for name, tensor in rank0["residual"].items():
        assert torch.equal(tensor, rank1["residual"][name]), name
    for name, tensor in rank0["adapter"].items():
        torch.testing.assert_close(tensor, rank1["adapter"][name], rtol=0, atol=0)
    assert rank0["logged"] and all("balora/consistency" in r for r in rank0["logged"])
