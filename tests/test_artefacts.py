"""Shareable artefacts: every method × task type reloads from adapter/, lora_converted/ and merged/ on
the untouched base (a fresh head for classification) to < 1e-4 in the logits; adapter configs name
the base model's id, not a local path; the model card; `balora push` (dry run, and against recording
fakes of huggingface_hub.HfApi: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cls_batch, lm_batch, make_tiny_bert, make_tiny_llama
from peft import PeftModel
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

from balora import AdapterConfig, BALoraConfig, BALoraTrainer, build_peft_model
from balora.core.config import METHODS
from balora.core.export import METADATA_FILE, load_trained, save_adapter, save_converted_lora, save_merged
from balora.training.model_card import CITATION, base_model_id, build_model_card, split_front_matter
from balora.training.run_config import run_config_from_dict

HUB_ID = "someone/tiny-base"


class ListDataset(Dataset):
    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def fresh_bert() -> torch.nn.Module:
    """The untouched pre-trained encoder with a freshly initialised head (another seed than training's)."""
    model = make_tiny_bert()
    torch.manual_seed(123)
    model.classifier.reset_parameters()
    return model


def untouched(task: str) -> torch.nn.Module:
    return make_tiny_llama() if task == "nlg" else fresh_bert()


def trained(tmp_path: Path, method: str, task: str) -> PeftModel:
    """A few optimiser steps (the regularisers on for ba-lora and lora-reg), so that adapters and head move."""
    if task == "nlg":
        data = lm_batch(batch=8)
        model = build_peft_model(make_tiny_llama(), AdapterConfig(method=method, r=4), "nlg")
    else:
        data = cls_batch(batch=8)
        model = build_peft_model(make_tiny_bert(), AdapterConfig(method=method, r=4), "nlu")
    balora = BALoraConfig(task=task) if method in ("ba-lora", "lora-reg") else None
    args = TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=2e-2, max_steps=3,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    BALoraTrainer(model=model, args=args, train_dataset=ListDataset(data), balora_config=balora).train()
    return model.eval()


@pytest.mark.parametrize("task", ["nlg", "nlu"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_artefact_reproduces_the_trained_model(tmp_path, method, task):
    model = trained(tmp_path, method, task)
    batch = {k: v for k, v in (lm_batch() if task == "nlg" else cls_batch()).items() if k != "labels"}
    with torch.no_grad():
        want = model(**batch).logits
        if task == "nlu":  # the fresh head alone gives other logits: the head must come from the artefacts
            assert (untouched(task)(**batch).logits - want).abs().max() > 1e-3
    save_adapter(model, tmp_path / "adapter", {"method": method, "init_seed": 0}, base_model_name_or_path=HUB_ID)
    save_converted_lora(model, tmp_path / "lora_converted", base_model_name_or_path=HUB_ID)
    save_merged(model, tmp_path / "merged")

    auto = AutoModelForCausalLM if task == "nlg" else AutoModelForSequenceClassification
    loaded = {
        "adapter": load_trained(untouched(task), tmp_path / "adapter"),
        "lora_converted": PeftModel.from_pretrained(untouched(task), str(tmp_path / "lora_converted")),
        "merged": auto.from_pretrained(tmp_path / "merged"),
    }
    with torch.no_grad():
        for name, other in loaded.items():
            error = (other.eval()(**batch).logits - want).abs().max().item()
            assert error < 1e-4, f"{name}: max |Δlogit| = {error}"
    for name in ("adapter", "lora_converted"):
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == HUB_ID
        assert not str(config["init_lora_weights"]).startswith("pissa") or name == "adapter"
    assert model.peft_config["default"].base_model_name_or_path != HUB_ID  # only recorded while saving


# ---------------------------------------------------------------- the model card
def demo_like_config(tmp_path: Path, method: str = "ba-lora", **extra) -> dict:
    return {"method": method, "output_dir": str(tmp_path / "run"), "model": {"name": "asset:minilm", "task": "nlu"},
            "adapter": {"r": 8}, "data": {"source": "asset:rotten-tomatoes", "splits": "rotten-tomatoes",
                                          "max_length": 64},
            "training": {"max_steps": 100, "per_device_train_batch_size": 32, "learning_rate": 5e-4}, **extra}


METRICS = {"method": "ba-lora", "model": "asset:minilm", "task": "nlu", "global_step": 100, "train_seconds": 151.2,
           "trainable_parameters": 209282, "total_parameters": 22922498,
           "data": {"train": 10202, "validation": 0, "test": 1275},
           "untuned": {"accuracy": 0.4776, "macro_f1": 0.4, "mcc": 0.01},
           "test": {"accuracy": 0.7639, "macro_f1": 0.76, "mcc": 0.53, "n": 1275}}


def test_base_model_id_of_assets_hub_ids_and_paths():
    assert base_model_id("asset:minilm") == ("sentence-transformers/all-MiniLM-L6-v2", "minilm")
    assert base_model_id("asset:smollm2") == ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2")
    assert base_model_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)


def test_model_card_front_matter_and_content(tmp_path):
    cfg = run_config_from_dict(demo_like_config(tmp_path))
    card = build_model_card(cfg, METRICS, repo_id="someone/balora-minilm-rt", label_map={"fresh": 0, "rotten": 1})
    front, body = split_front_matter(card)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert set(meta["tags"]) >= {"balora", "ba-lora", "lora", "pissa", "peft"}
    assert meta["license"] == "apache-2.0"
    assert "/" not in meta["base_model"].split("/", 1)[1] and not meta["base_model"].startswith(("/", "~", "."))
    for needle in ("0.7639", "0.4776", "λ1 (consistency) | 0.15", "10202", "1275", "100", "5e-04", "seed",
                   "asset:minilm", "balora.load_trained", "PeftModel.from_pretrained", 'subfolder="lora_converted"',
                   "residual", "arXiv:2408.04556", "rotten-tomatoes", "fresh"):
        assert needle in body, needle
    assert CITATION in body
    assert "<BALORA_HOME>" not in card and str(Path.home()) not in card


def test_model_card_of_a_baseline_says_task_loss_only(tmp_path):
    cfg = run_config_from_dict(demo_like_config(tmp_path, method="pissa", balora={"lambda_consistency": 0.5}))
    card = build_model_card(cfg, None)
    assert "task loss only" in card and "λ1" not in card
    assert "no metrics" in card.lower()


def test_model_card_shows_a_regex_or_all_linear_target_whole(tmp_path):
    cfg = run_config_from_dict(demo_like_config(tmp_path, method="pissa"))
    assert "`all-linear`" in build_model_card(cfg, None, target_modules="all-linear")
    assert "`.*query`" in build_model_card(cfg, None, target_modules=".*query")
    assert "`key`, `query`" in build_model_card(cfg, None, target_modules={"query", "key"})


def test_model_card_nlg_and_a_hub_dataset(tmp_path):
    cfg = run_config_from_dict({"method": "ba-lora", "model": {"name": "asset:smollm2", "task": "nlg"},
                                "data": {"source": "openai/gsm8k"}, "output_dir": str(tmp_path / "r")})
    front, body = split_front_matter(build_model_card(cfg, {"test": {"loss": 0.65, "perplexity": 1.9}}))
    meta = yaml.safe_load(front)
    assert meta["pipeline_tag"] == "text-generation" and meta["datasets"] == ["openai/gsm8k"]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Q4" in body  # the asset is a de-quantised copy: said in the card
    assert "λ2 (diversity) | 0.03" not in body or "nlg" in body


# ---------------------------------------------------------------- a finished run directory and `balora push`
def fake_run(tmp_path: Path, *, status: str | None = "finished", converted: bool = True) -> Path:
    """A run directory as `balora train` leaves it, with a real (tiny) adapter."""
    run = tmp_path / "runs" / "tiny-ba-lora"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(demo_like_config(tmp_path)))
    model = build_peft_model(make_tiny_bert(), AdapterConfig(method="ba-lora", r=4), "nlu")
    save_adapter(model, run / "adapter", {"method": "ba-lora", "init_seed": 42, "base_model": "asset:minilm"})
    (run / "adapter" / "README.md").write_text("PEFT's blank template\n")
    if converted:
        save_converted_lora(model, run / "lora_converted")
    (run / "metrics.json").write_text(json.dumps(METRICS))
    (run / "label_map.json").write_text(json.dumps({"fresh": 0, "rotten": 1}))
    (run / "checkpoints" / "checkpoint-100").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-100" / "optimizer.pt").write_bytes(b"x")
    if status is not None:
        (run / "status.json").write_text(json.dumps({"state": status, "phase": "done"}))
    return run


def test_push_dry_run_writes_the_folder_that_would_be_uploaded(tmp_path, capsys):
    from balora.cli import main

    run = fake_run(tmp_path)
    out = tmp_path / "upload"
    assert main(["push", str(run), "someone/balora-tiny", "--dry-run", str(out)]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "README.md" in files and "adapter/adapter_model.safetensors" in files
    assert "lora_converted/adapter_model.safetensors" in files
    assert not any(f.startswith("checkpoints") or "optimizer" in f for f in files)
    front, body = split_front_matter((out / "README.md").read_text())
    assert yaml.safe_load(front)["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "someone/balora-tiny" in body and "0.7639" in body and "λ1 (consistency) | 0.15" in body
    for sub in ("adapter", "lora_converted"):
        config = json.loads((out / sub / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
        assert (out / sub / "README.md").read_text() == (out / "README.md").read_text()
    meta = json.loads((out / "adapter" / METADATA_FILE).read_text())
    assert meta["base_model"] == "asset:minilm" and meta["asset"] == "minilm"
    assert meta["base_model_hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "nothing uploaded" in capsys.readouterr().out
    # the run itself is left as it was
    assert (run / "adapter" / "README.md").read_text() == "PEFT's blank template\n"


def test_push_uploads_through_hfapi(tmp_path, monkeypatch):
    import huggingface_hub

    from balora.cli import main

    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        content = {str(p.relative_to(folder_path)): p.read_bytes() for p in Path(folder_path).rglob("*") if p.is_file()}
        calls.append(("upload_folder", {"repo_id": repo_id, "content": content, **kw}))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(
        ("create_branch", {"repo_id": repo_id, **kw})), raising=False)
    run = fake_run(tmp_path)
    assert main(["push", str(run), "someone/balora-tiny", "--private", "--what", "adapter"]) == 0
    (name, create), (name2, upload) = calls[0], calls[-1]
    assert name == "create_repo" and create["repo_id"] == "someone/balora-tiny" and create["private"] is True
    assert create.get("exist_ok") is True
    assert name2 == "upload_folder" and upload["repo_id"] == "someone/balora-tiny"
    assert "README.md" in upload["content"] and "adapter/adapter_config.json" in upload["content"]
    assert not any(k.startswith("lora_converted") for k in upload["content"])
    assert "ba-lora" in upload["commit_message"] and "tiny-ba-lora" in upload["commit_message"]
    assert json.loads(upload["content"]["adapter/adapter_config.json"])["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    calls.clear()
    assert main(["push", str(run), "someone/balora-tiny", "--revision", "v1"]) == 0
    upload = calls[-1][1]
    assert upload["revision"] == "v1" and "lora_converted/adapter_model.safetensors" in upload["content"]


@pytest.mark.parametrize("case", ["running", "failed", "no-converted"])
def test_push_refuses_unfinished_or_incomplete_runs(tmp_path, capsys, case):
    from balora.cli import main

    run = fake_run(tmp_path, status=case if case != "no-converted" else "finished", converted=case != "no-converted")
    assert main(["push", str(run), "someone/x", "--dry-run", str(tmp_path / "up")]) == 2
    err = capsys.readouterr().err
    assert "balora push: error:" in err
    assert ("lora_converted" in err) if case == "no-converted" else ("finish" in err)
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("training", [{"push_to_hub": True}, {"push_to_hub": True, "hub_model_id": "someone/x"}])
def test_push_to_hub_in_a_run_config_is_refused_before_anything_runs(tmp_path, training):
    from balora.core.config import ConfigError
    from balora.training.run import train_run

    cfg = run_config_from_dict({**demo_like_config(tmp_path), "training": training})
    with pytest.raises(ConfigError, match="balora push") as error:
        train_run(cfg)
    assert "checkpoints" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_train_run_writes_the_card_and_the_base_id_and_push_stages_it(tmp_path, capsys):
    from conftest import make_word_tokenizer

    from balora.cli import main

    model_dir = tmp_path / "tiny-bert"
    make_tiny_bert().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(40)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = {"method": "ba-lora", "output_dir": str(tmp_path / "run"), "model": {"name": str(model_dir), "task": "nlu"},
              "adapter": {"r": 4}, "data": {"source": str(tmp_path / "data.jsonl"), "test_fraction": 0.2,
                                            "max_length": 16},
              "training": {"max_steps": 3, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "use_cpu": True}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 0
    run = tmp_path / "run"
    accuracy = json.loads((run / "metrics.json").read_text())["test"]["accuracy"]
    for name in ("adapter", "lora_converted"):
        front, body = split_front_matter((run / name / "README.md").read_text())
        assert yaml.safe_load(front)["base_model"] == str(model_dir)  # model.name as written
        assert f"{accuracy:.4g}" in body and "λ1 (consistency) | 0.15" in body
        assert json.loads((run / name / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    batch = {k: v for k, v in cls_batch(num_labels=2).items() if k != "labels"}
    with torch.no_grad():
        want = load_trained(fresh_bert(), run / "adapter").eval()(**batch).logits
        got = PeftModel.from_pretrained(fresh_bert(), str(run / "lora_converted")).eval()(**batch).logits
    assert (got - want).abs().max() < 1e-4
    capsys.readouterr()
    assert main(["push", str(run), "someone/tiny", "--dry-run", str(tmp_path / "up")]) == 0
    assert "someone/tiny" in (tmp_path / "up" / "README.md").read_text()
