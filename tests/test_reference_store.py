"""The reference cache on disk (balora.training.reference_store) and its use in training (issue 16):
cached and online reference give the same loss, terms and adapter gradients; a stale cache is refused
with the differing item named; an interrupted build resumes."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import VOCAB, make_tiny_bert, make_tiny_llama, make_word_tokenizer
from transformers import TrainingArguments

import balora.training.reference_store as RS
from balora import AdapterConfig, BALoraConfig, build_peft_model
from balora.core.config import ConfigError
from balora.training.data import InstructionCollator
from balora.training.trainer import BALoraTrainer


class _Pad:
    pad_token_id, eos_token_id = 0, 1


def nlg_rows(n: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + i % 7
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 3 + ids[3:]})
    return rows


def nlu_rows(n: int = 10, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (5 + i % 4,), generator=g).tolist(), "labels": i % 2}
            for i in range(n)]


def nlu_collator(features: list[dict]) -> dict:
    n = max(len(f["input_ids"]) for f in features)
    ids = torch.tensor([f["input_ids"] + [0] * (n - len(f["input_ids"])) for f in features])
    mask = torch.tensor([[1] * len(f["input_ids"]) + [0] * (n - len(f["input_ids"])) for f in features])
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["labels"] for f in features])}


def peft(task: str, seed: int = 0):
    base = make_tiny_llama(seed) if task == "nlg" else make_tiny_bert(seed)
    return build_peft_model(base, AdapterConfig(method="ba-lora", r=4, init_seed=0), task)


def collator_of(task: str):
    return InstructionCollator(_Pad()) if task == "nlg" else nlu_collator


def rows_of(task: str, n: int = 10):
    return nlg_rows(n) if task == "nlg" else nlu_rows(n)


def build(tmp_path, task: str, model=None, rows=None, **kw):
    model = model or peft(task)
    rows = rows or rows_of(task)
    store = RS.build_reference_cache(model, rows, collator_of(task), tmp_path / "cache", batch_size=3,
                                     temperature=2.0, task=task, shard_size=4, **kw)
    return model, rows, store


def trainer_for(tmp_path, task, model, rows, store, name, **kw):
    base = dict(per_device_train_batch_size=4, learning_rate=1e-2, max_steps=2, logging_steps=1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
    base.update(kw)
    args = TrainingArguments(str(tmp_path / name), **base)
    return BALoraTrainer(model=model, args=args, train_dataset=RS.with_example_index(rows),
                         data_collator=RS.IndexedCollator(collator_of(task)),
                         balora_config=BALoraConfig(task=task, temperature=2.0), reference_cache=store)


# ------------------------------------------------------------------------------ same loss, terms, gradients
@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_cached_equals_online_loss_terms_and_gradients(tmp_path, task):
    _, rows, store = build(tmp_path, task)
    batch = RS.IndexedCollator(collator_of(task))(RS.with_example_index(rows)[2:8])
    results = []
    for cache in (None, store):
        model = peft(task)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():  # the student away from the reference, as after some training
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        trainer = trainer_for(tmp_path, task, model, rows, cache, f"out-{cache is None}")
        assert (trainer._cache is not None) == (cache is not None)
        model.train()
        model.zero_grad()
        for key in ("dropout", "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(model.config, key):
                setattr(model.config, key, 0.0)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        sums = {k: v.item() for k, v in trainer._sums.items()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), sums, grads))
    (loss0, sums0, grads0), (loss1, sums1, grads1) = results
    assert sums0["consistency"] > 1e-6
    assert loss1 == pytest.approx(loss0, rel=1e-5, abs=1e-6)
    assert sums1.keys() == sums0.keys()
    for key in sums0:
        assert sums1[key] == pytest.approx(sums0[key], rel=1e-4, abs=1e-6), key
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_cached_training_with_accumulation_equals_online(tmp_path, task):
    _, rows, store = build(tmp_path, task, rows=rows_of(task, 16))
    histories, weights = [], []
    for cache in (None, store):
        model = peft(task)
        trainer = trainer_for(tmp_path, task, model, rows, cache, f"run-{cache is None}",
                              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                              # plain SGD: Adam's first step is lr·sign(g), which turns float32 noise on a
                              # zero gradient element (the step-0 consistency gradient) into a whole step
                              optim="sgd", learning_rate=0.1)
        trainer.train()
        histories.append([h for h in trainer.state.log_history if "loss" in h])
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(histories[0]) == len(histories[1]) == 3
    for online, cached in zip(*histories):
        for key in ("loss", "task_loss", "balora/consistency", "balora/diversity", "balora/svd"):
            assert cached[key] == pytest.approx(online[key], rel=1e-4, abs=1e-6), key
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ staleness
def _manifest(model, rows, task, tokenizer=None, temperature=2.0):
    return RS.reference_manifest(model, rows, task=task, temperature=temperature, tokenizer=tokenizer, shard_size=4)


def test_changes_are_detected_with_the_item_named(tmp_path):
    tokenizer = make_word_tokenizer()
    model, rows, _ = build(tmp_path, "nlg", tokenizer=tokenizer)
    path = tmp_path / "cache"
    RS.open_store(path, _manifest(model, rows, "nlg", tokenizer))  # matches

    def refused(expected, item):
        with pytest.raises(ConfigError, match=rf"{item}[a-z ()]* differs") as error:
            RS.open_store(path, expected)
        assert str(path) in str(error.value) and "reference_cache: off" in str(error.value)

    other = peft("nlg", seed=1)  # other pre-trained weights
    refused(_manifest(other, rows, "nlg", tokenizer), "model weights")
    with torch.no_grad():  # one weight of the pre-trained model changed
        next(p for n, p in model.named_parameters() if "base_layer" in n).add_(1e-3)
    refused(_manifest(model, rows, "nlg", tokenizer), "model weights")
    model = peft("nlg")
    refused(_manifest(model, rows, "nlg", make_word_tokenizer(VOCAB - 1)), "tokenizer")
    refused(_manifest(model, rows, "nlg", tokenizer, temperature=1.0), "temperature")
    cut = [{k: v[:8] for k, v in r.items()} for r in rows]  # a shorter max_length
    refused(_manifest(model, cut, "nlg", tokenizer), "data")
    templated = [{k: ([5] + v if k == "input_ids" else [-100] + v if k == "labels" else [1] + v)
                  for k, v in r.items()} for r in rows]  # another template: other prompt tokens
    refused(_manifest(model, templated, "nlg", tokenizer), "data")
    relabelled = [dict(r, labels=[-100] * 4 + r["input_ids"][4:]) for r in rows]
    refused(_manifest(model, relabelled, "nlg", tokenizer), "data")
    model.config.rms_norm_eps = 1e-3
    refused(_manifest(model, rows, "nlg", tokenizer), "model config")


def test_nlu_features_do_not_depend_on_the_head_seed(tmp_path):
    model, rows, _ = build(tmp_path, "nlu")
    other_head = build_peft_model(make_tiny_bert(0), AdapterConfig(method="ba-lora", r=4, init_seed=0), "nlu")
    with torch.no_grad():
        for n, p in other_head.named_parameters():
            if "classifier" in n:
                p.normal_()
    from balora.core.reference import ReferenceSnapshot
    ReferenceSnapshot.from_model(other_head).attach(other_head)
    RS.open_store(tmp_path / "cache", _manifest(other_head, rows, "nlu"))


# ------------------------------------------------------------------------------ building
@pytest.mark.parametrize("task", ["nlg", "nlu"])
def test_interrupted_build_resumes_to_the_same_files(tmp_path, task, monkeypatch):
    model = peft(task)
    rows = rows_of(task, 11)
    whole = tmp_path / "whole"
    RS.build_reference_cache(model, rows, collator_of(task), whole, batch_size=3, temperature=2.0, task=task,
                             shard_size=4)
    calls = {"n": 0}
    write = RS._write_shard

    def failing(file, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        write(file, tensors)

    monkeypatch.setattr(RS, "_write_shard", failing)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        RS.build_reference_cache(model, rows, collator_of(task), part, batch_size=3, temperature=2.0, task=task,
                                 shard_size=4)
    manifest = json.loads((part / "manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == 1
    with pytest.raises(ConfigError, match="incomplete"):
        RS.open_store(part, {k: manifest[k] for k in RS.IDENTITY})
    monkeypatch.setattr(RS, "_write_shard", write)
    written = []
    monkeypatch.setattr(RS, "_write_shard", lambda f, t: (written.append(f.name), write(f, t)))
    store = RS.build_reference_cache(model, rows, collator_of(task), part, batch_size=3, temperature=2.0,
                                     task=task, shard_size=4)
    assert written == ["shard-00001.safetensors", "shard-00002.safetensors"]  # the first one was kept
    assert len(store) == 11
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert (part / name).read_bytes() == (whole / name).read_bytes()
    assert json.loads((part / "manifest.json").read_text()) == json.loads((whole / "manifest.json").read_text())


def test_build_refuses_above_max_bytes(tmp_path, capsys):
    with pytest.raises(ConfigError, match="exceeds the limit"):
        build(tmp_path, "nlg", max_bytes=100)
    assert "bytes per valid token" in capsys.readouterr().err


def test_store_rows_match_valid_positions(tmp_path):
    _, rows, store = build(tmp_path, "nlg")
    u, s = store.nlg_entries([0, 5])
    valid = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in (rows[0], rows[5]))
    assert u.shape == (valid, 32) and s.shape == (valid,) and u.dtype == torch.float32


# ------------------------------------------------------------------------------ balora train
@pytest.fixture
def nlg_run(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    make_tiny_llama().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"question": f"w{i % 30 + 3} w{(i * 3) % 30 + 3}", "answer": f"w{i % 30 + 40} w{i % 5 + 80} w{i % 7}"}
            for i in range(16)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def config(name: str, **extra) -> dict:
        return {"method": "ba-lora", "output_dir": str(tmp_path / name),
                "model": {"name": str(model_dir), "task": "nlg"}, "adapter": {"r": 4},
                "data": {"source": str(data), "query_field": "question", "response_field": "answer",
                         "template": "plain", "max_length": 16, "test_fraction": 0.25},
                "training": {"max_steps": 3, "per_device_train_batch_size": 4, "use_cpu": True,
                             "logging_steps": 1, "gradient_accumulation_steps": 2, "learning_rate": 3.0,
                             "warmup_steps": 0, "optim": "sgd"},
                **extra}
    return config


def test_train_with_reference_cache_auto_matches_online(nlg_run, tmp_path):
    from balora.training.run import train_run
    from balora.training.run_config import run_config_from_dict

    online = train_run(run_config_from_dict(nlg_run("online")), show_progress=False)
    cached = train_run(run_config_from_dict(nlg_run("cached", reference_cache="auto")), show_progress=False)
    assert (tmp_path / "cached" / "reference_cache" / "manifest.json").is_file()
    assert not (tmp_path / "online" / "reference_cache").exists()
    assert cached["train_loss"] == pytest.approx(online["train_loss"], rel=1e-4)
    assert cached["test"]["loss"] == pytest.approx(online["test"]["loss"], rel=1e-4)
    logs = [json.loads((tmp_path / name / "log_history.json").read_text()) for name in ("online", "cached")]
    steps = [[h for h in log if "balora/consistency" in h] for log in logs]
    assert len(steps[0]) == len(steps[1]) == 3 and steps[0][-1]["balora/consistency"] > 1e-4
    for a, b in zip(*steps):  # the cached term's float32 cancellation: ~1e-7 absolute (0 online at step 0)
        for key in ("loss", "task_loss", "balora/consistency", "balora/diversity", "balora/svd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    stored = yaml.safe_load((tmp_path / "cached" / "config.yaml").read_text())
    assert stored["reference_cache"] == "auto"
    # the cache given by path is used; a path that does not match this run is refused
    again = nlg_run("again", reference_cache=str(tmp_path / "cached" / "reference_cache"))
    assert train_run(run_config_from_dict(again), show_progress=False)["train_loss"] == pytest.approx(
        cached["train_loss"], rel=1e-6)
    other = nlg_run("other", reference_cache=str(tmp_path / "cached" / "reference_cache"))
    other["data"]["max_length"] = 5  # responses cut: other labels
    with pytest.raises(ConfigError, match="differs"):
        train_run(run_config_from_dict(other), show_progress=False)


def test_cli_reference_build_then_train_auto_reuses_it(nlg_run, tmp_path, capsys):
    from balora.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(nlg_run("built", reference_cache="auto")))
    assert main(["reference", "build", str(config), "training.max_steps=1"]) == 0
    captured = capsys.readouterr()
    assert "bytes per valid token" in captured.err and "reference_cache: auto" in captured.out
    cache = tmp_path / "built" / "reference_cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["task"] == "nlg"
    before = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert main(["train", str(config), "--no-progress", "training.max_steps=1"]) == 0
    assert "bytes per valid token" not in capsys.readouterr().err  # not built again
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == before


def tiny_nlu_assets(tmp_path):
    """A tiny BERT with a word tokenizer in tmp_path/tiny-bert and 24 labelled texts in tmp_path/data.jsonl."""
    model_dir = tmp_path / "tiny-bert"
    make_tiny_bert().save_pretrained(model_dir)
    make_word_tokenizer().save_pretrained(model_dir)
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(24)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model_dir


def test_nlu_train_with_reference_cache_auto_matches_online(tmp_path):
    from balora.training.run import train_run
    from balora.training.run_config import run_config_from_dict

    model_dir = tiny_nlu_assets(tmp_path)

    def config(name: str, **extra) -> dict:
        return {"method": "ba-lora", "output_dir": str(tmp_path / name),
                "model": {"name": str(model_dir), "task": "nlu"}, "adapter": {"r": 4},
                "data": {"source": str(tmp_path / "data.jsonl"), "test_fraction": 0.25, "max_length": 16},
                "training": {"max_steps": 3, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                             "learning_rate": 5e-2, "logging_steps": 1, "use_cpu": True}, **extra}

    online = train_run(run_config_from_dict(config("online")), show_progress=False)
    cached = train_run(run_config_from_dict(config("cached", reference_cache="auto")), show_progress=False)
    assert json.loads((tmp_path / "cached" / "reference_cache" / "manifest.json").read_text())["task"] == "nlu"
    assert cached["train_loss"] == pytest.approx(online["train_loss"], rel=1e-4)
    assert cached["test"]["accuracy"] == online["test"]["accuracy"]
    logs = [[h for h in json.loads((tmp_path / n / "log_history.json").read_text()) if "balora/consistency" in h]
            for n in ("online", "cached")]
    assert len(logs[0]) == len(logs[1]) == 3 and logs[0][-1]["balora/consistency"] > 0
    for a, b in zip(*logs):
        for key in ("loss", "task_loss", "balora/consistency", "balora/diversity", "balora/svd"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_processes_wanting_the_same_cache_build_it_once(tmp_path, monkeypatch):
    """Two builders of one path at once (DDP ranks, compare shards) take turns on the build lock: the
    shards are written once and both get the complete cache."""
    import threading

    model, rows = peft("nlg"), rows_of("nlg", 11)
    written, write = [], RS._write_shard

    def slow_write(file, tensors):
        written.append(file.name)
        threading.Event().wait(0.2)  # widen the window in which the other builder would interleave
        write(file, tensors)

    monkeypatch.setattr(RS, "_write_shard", slow_write)
    stores, errors = [], []

    def build():
        try:
            stores.append(RS.build_reference_cache(model, rows, collator_of("nlg"), tmp_path / "cache", batch_size=3,
                                                   temperature=2.0, task="nlg", shard_size=4))
        except Exception as error:  # reported below: a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert written == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert [len(s) for s in stores] == [11, 11] and all(s.manifest["complete"] for s in stores)


def test_stale_cache_is_replaced_only_when_asked(tmp_path):
    rows = rows_of("nlg")
    RS.build_reference_cache(peft("nlg"), rows, collator_of("nlg"), tmp_path / "cache", batch_size=3,
                             temperature=2.0, task="nlg")
    other = peft("nlg", seed=1)
    with pytest.raises(ConfigError, match="model weights differs"):
        RS.build_reference_cache(other, rows, collator_of("nlg"), tmp_path / "cache", batch_size=3,
                                 temperature=2.0, task="nlg")
    store = RS.build_reference_cache(other, rows, collator_of("nlg"), tmp_path / "cache", batch_size=3,
                                     temperature=2.0, task="nlg", replace_stale=True)
    assert store.manifest["model"] == RS.reference_manifest(other, rows, task="nlg", temperature=2.0)["model"]


def test_compare_cells_share_one_cache_per_model_and_data(tmp_path, capfd):
    """Every BA-LoRA cell of a grid (seeds, λ) with reference_cache: auto reads one cache, built by the
    first; a cell with other data (max_length) gets its own."""
    from balora.experiments.compare import run_compare

    model_dir = tiny_nlu_assets(tmp_path)
    base = {"method": "ba-lora", "reference_cache": "auto", "model": {"name": str(model_dir), "task": "nlu"},
            "adapter": {"r": 2}, "data": {"source": str(tmp_path / "data.jsonl"), "test_fraction": 0.25,
                                          "max_length": 12},
            "training": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                         "save_strategy": "no", "use_cpu": True}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "shared", "base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "grid": {"data.max_length": [12, 6], "balora.lambda_consistency": [1.0, 0.5], "training.seed": [1, 2]},
            "metrics": ["test.accuracy"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    summary = run_compare(tmp_path / "spec.yaml", show_progress=False, say=lambda m: None)
    assert summary["cells"]["ok"] == summary["cells"]["total"] == 8
    caches = sorted(p for p in (tmp_path / "out" / "reference-caches").iterdir() if p.is_dir())
    assert len(caches) == 2  # max_length 12 and 6, four cells (λ × seed) each
    assert not list((tmp_path / "out").glob("cells/*/run/reference_cache"))
    assert capfd.readouterr().err.count("bytes per example") == 2  # each built once
    assert {json.loads((c / "manifest.json").read_text())["complete"] for c in caches} == {True}
    used = [json.loads(m.read_text())["reference_cache"] for m in (tmp_path / "out").glob("cells/*/run/metrics.json")]
    assert len(used) == 8 and {u["path"] for u in used} == {str(c) for c in caches}
