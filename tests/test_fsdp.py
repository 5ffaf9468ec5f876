"""BA-LoRA under accelerate's FSDP2 (`fully_shard`, two processes, gloo on this CPU; see fsdp_train.py for
how accelerate is put on that path without a GPU): the adapter after a few steps equals a single-process run
with the same global batch (gradient accumulation over the same micro-batches), for LoRA, PiSSA and BA-LoRA,
NLG (the logit-free path) and NLU; the artefacts are the same files; the reference after training is the
pre-trained model; and a checkpoint written through accelerate's FSDP2 save resumes, in a fresh trainer, to
the adapter of the run that went straight through. The reference snapshot is swapped in by value on each
rank's shard there (`balora.core.reference.swapped_in`), through `functional_call` here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import launch, make_tiny_bert, make_tiny_llama

SCRIPT = Path(__file__).parent / "fsdp_train.py"
CLI = Path(__file__).parent / "fsdp_cli.py"
RUNS = [f"{m}:{t}" for m in ("lora", "pissa", "ba-lora") for t in ("nlg", "nlu")]
RESUMED = ["ba-lora:nlg", "ba-lora:nlu"]


def _launch(out: Path, mode: str, runs: list[str], phase: str = "") -> None:
    launch(SCRIPT, [str(out), mode, ",".join(runs)] + ([phase] if phase else []),
           processes=2 if mode == "fsdp" else 1, port_base=29_700)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _launch(out, "single", RUNS)
    _launch(out, "fsdp", RUNS)
    _launch(out, "fsdp", RESUMED, "save")  # checkpoints at step 2, trains through
    _launch(out, "fsdp", RESUMED, "resume")
    return out


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_adapter_equals_the_single_process_run(runs: Path, run: str) -> None:
    name = run.replace(":", "-")
    single = torch.load(runs / f"{name}-single.pt")
    sharded = torch.load(runs / f"{name}-fsdp.pt")
    assert sharded["sharded"], "the FSDP2 run's trainable parameters were not DTensors"
    assert single["adapter"].keys() == sharded["adapter"].keys()
    moved = max((single["adapter"][k] - single["initial"][k]).abs().max().item() for k in single["adapter"])
    assert moved > 1e-3, "training did not move the adapter: the comparison would be vacuous"
    for key, expected in single["adapter"].items():
        # Measured: bit-identical on this CPU (two-rank averaging is one exact addition and a halving);
        # the tolerance allows another reduction order on other hardware.
        torch.testing.assert_close(sharded["adapter"][key], expected, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("run", [r for r in RUNS if r.startswith("ba-lora")])
def test_the_reference_after_fsdp2_training_is_the_pretrained_model(runs: Path, run: str) -> None:
    result = torch.load(runs / f"{run.replace(':', '-')}-fsdp.pt")
    assert result["student_minus_pretrained"] > 1e-3, "the student did not move: the check would be vacuous"
    assert result["reference_minus_pretrained"] < 1e-5, result


@pytest.mark.parametrize("run", RUNS)
def test_fsdp2_artefacts_equal_the_single_process_ones(runs: Path, run: str) -> None:
    """adapter/ and lora_converted/, written from the gathered state dict on rank 0, hold the same tensors as
    the single-process run's and load as plain PEFT adapters."""
    from safetensors.torch import load_file

    name = run.replace(":", "-")
    for artefact in ("adapter", "lora_converted"):
        single = load_file(runs / f"{name}-single" / artefact / "adapter_model.safetensors")
        sharded = load_file(runs / f"{name}-fsdp" / artefact / "adapter_model.safetensors")
        assert single.keys() == sharded.keys() and single, artefact
        for key, expected in single.items():
            torch.testing.assert_close(sharded[key], expected, rtol=1e-5, atol=1e-6, msg=f"{artefact}: {key}")


@pytest.mark.parametrize("run", RESUMED)
def test_an_fsdp2_checkpoint_resumes_to_the_same_adapter(runs: Path, run: str) -> None:
    """Trained through with checkpoints (accelerate's FSDP2 save: full state dict, optimiser, scheduler,
    RNG), then a fresh model and trainer resumed from checkpoint-2: the same adapter and the same reference."""
    name = run.replace(":", "-")
    through = torch.load(runs / f"{name}-fsdp-save.pt")
    resumed = torch.load(runs / f"{name}-fsdp-resume.pt")
    assert (runs / f"run-{name}-fsdp-save" / "checkpoint-2").is_dir()
    assert through["adapter"].keys() == resumed["adapter"].keys()
    for key, expected in through["adapter"].items():
        torch.testing.assert_close(resumed["adapter"][key], expected, rtol=0, atol=0, msg=key)
    assert resumed["reference_minus_pretrained"] < 1e-5, resumed


def test_the_fsdp2_wrap_list_leaves_out_the_module_holding_the_embeddings() -> None:
    """BERT lists BertEmbeddings among the modules not to split; accelerate 1.16 would shard it and then its
    word embeddings again (a crash inside torch), so balora's trainer wraps the layers only. Llama's list
    (its decoder layers) holds no embeddings and is left alone; an explicit list is filtered the same way."""
    from balora.core.sharded import layers_to_wrap_without_embeddings

    bert = make_tiny_bert()
    assert "BertEmbeddings" in bert._no_split_modules
    assert layers_to_wrap_without_embeddings(bert, None) == [n for n in bert._no_split_modules if n != "BertEmbeddings"]
    assert layers_to_wrap_without_embeddings(bert, ["BertEmbeddings", "BertLayer"]) == ["BertLayer"]
    assert layers_to_wrap_without_embeddings(bert, ["BertLayer"]) is None
    assert layers_to_wrap_without_embeddings(make_tiny_llama(), None) is None


# ---------------------------------------------------------------- `balora train` under FSDP2
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`balora train` (BA-LoRA, NLU, tiny BERT without dropout) under FSDP2 on 2 ranks, straight through and
    killed after checkpoint-2 then resumed with --resume; and in one process with gradient accumulation 2."""
    import json

    import yaml
    from conftest import make_word_tokenizer

    tmp = tmp_path_factory.mktemp("fsdp-cli")
    bert = make_tiny_bert()
    bert.config.hidden_dropout_prob = bert.config.attention_probs_dropout_prob = 0.0
    bert.save_pretrained(tmp / "tiny-bert")
    make_word_tokenizer().save_pretrained(tmp / "tiny-bert")
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(80)]
    (tmp / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for name in ("fsdp", "killed", "single"):
        training = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "use_cpu": True,
                    "save_steps": 2}
        if name == "single":
            training["gradient_accumulation_steps"] = 2
        else:  # the accelerate state fsdp_cli.py configured (as accelerate launch would on GPUs)
            training["accelerator_config"] = {"use_configured_state": True}
        config = {"method": "ba-lora", "output_dir": str(tmp / f"run-{name}"),
                  "model": {"name": str(tmp / "tiny-bert"), "task": "nlu"}, "adapter": {"r": 4, "dropout": 0.0},
                  "data": {"source": str(tmp / "data.jsonl"), "test_fraction": 0.2, "max_length": 16},
                  "balora": {"lambda_consistency": 1.0}, "training": training, "save_merged": True}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(config))
    launch(CLI, [str(tmp / "single.yaml")], port_base=29_700)
    launch(CLI, [str(tmp / "fsdp.yaml")], processes=2, port_base=29_700)
    with pytest.raises(AssertionError):  # BALORA_FAULT: both ranks SIGKILL themselves in the 3rd micro-batch
        launch(CLI, [str(tmp / "killed.yaml")], processes=2, port_base=29_700, env={"BALORA_FAULT": "step:3"})
    assert [p.name for p in (tmp / "run-killed" / "checkpoints").iterdir()] == ["checkpoint-2"]
    launch(CLI, [str(tmp / "killed.yaml"), "--resume"], processes=2, port_base=29_700)
    return tmp


@pytest.mark.parametrize("run", ["fsdp", "killed"])
def test_balora_train_under_fsdp2_writes_the_single_process_artefacts(cli_runs: Path, run: str) -> None:
    """adapter/, lora_converted/ and merged/ of `balora train` under FSDP2 (straight through; killed after
    checkpoint-2 and resumed) equal the single-process run's: measured bit-identical here (merged/ within
    float rounding: PEFT merges on a reloaded copy there, in place here)."""
    import json

    from safetensors.torch import load_file

    for artefact in ("adapter", "lora_converted"):
        single = load_file(cli_runs / "run-single" / artefact / "adapter_model.safetensors")
        sharded = load_file(cli_runs / f"run-{run}" / artefact / "adapter_model.safetensors")
        assert single.keys() == sharded.keys() and single, artefact
        for key, expected in single.items():
            torch.testing.assert_close(sharded[key], expected, rtol=1e-5, atol=1e-6, msg=f"{artefact}: {key}")
    single = load_file(cli_runs / "run-single" / "merged" / "model.safetensors")
    sharded = load_file(cli_runs / f"run-{run}" / "merged" / "model.safetensors")
    assert single.keys() == sharded.keys() and single
    for key, expected in single.items():
        torch.testing.assert_close(sharded[key], expected, rtol=1e-5, atol=1e-6, msg=f"merged: {key}")
    metrics = json.loads((cli_runs / f"run-{run}" / "metrics.json").read_text())
    single = json.loads((cli_runs / "run-single" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and metrics["test"]["n"] == single["test"]["n"]
    assert metrics["test"]["accuracy"] == single["test"]["accuracy"]
