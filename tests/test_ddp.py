"""Two-process DDP on CPU (gloo) under `accelerate launch`: every rank builds the same PiSSA residual
and reference snapshot, and training ends with the same adapter on both ranks."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_train.py")


def launch(tmp_path, *extra: str, port: int) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("accelerate's launcher is not installed next to this Python")
    # `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the Trainer (use_cpu=True) uses gloo.
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(SCRIPT), str(tmp_path), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_two_process_accelerate_run_agrees_across_ranks(tmp_path):
    launch(tmp_path, port=29517)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["snapshot"] == rank1["snapshot"]
    for name, tensor in rank0["residual"].items():
        assert torch.equal(tensor, rank1["residual"][name]), name
    for name, tensor in rank0["adapter"].items():
        torch.testing.assert_close(tensor, rank1["adapter"][name], rtol=0, atol=0)
    assert rank0["logged"] and all("balora/consistency" in r for r in rank0["logged"])


def test_ddp_ranks_share_one_reference_cache_and_match_the_online_reference(tmp_path):
    """Both ranks ask for the cache at once: one builds it (the other waits on the build lock), both read
    it, and the cached run ends where the online run ends (SGD; float32 tolerance)."""
    result = launch(tmp_path, "cache", port=29518)
    assert result.stderr.count("bytes per valid token") == 1  # built once, by one rank
    ranks = [torch.load(tmp_path / f"cache-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["cache"] == ranks[1]["cache"]
    for rank in ranks:
        assert len(rank["cached-logged"]) == len(rank["online-logged"]) == 4
        for a, b in zip(rank["online-logged"], rank["cached-logged"]):
            for key in ("loss", "balora/consistency"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        for name, tensor in rank["online"].items():
            torch.testing.assert_close(rank["cached"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    for name, tensor in ranks[0]["cached"].items():  # DDP keeps the ranks identical
        torch.testing.assert_close(ranks[1]["cached"][name], tensor, rtol=0, atol=0)


def test_release_process_group_ends_a_gloo_group_and_is_a_noop_without_one(tmp_path):
    """`balora train` and the launch scripts end with it: a gloo group left alive at exit can abort the
    process in interpreter finalisation (seen once in CI: "terminate called without an active exception")."""
    import torch.distributed as dist

    from balora.training.process_group import release_process_group

    assert release_process_group() is False
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    assert release_process_group() is True
    assert not dist.is_initialized()
    assert release_process_group() is False
