"""`balora lab`: the maths each experiment relies on (exact subsampling counts, nested label flips,
effective rank by hand), a snapshot callback that leaves training unchanged, and a tiny end-to-end
run of every experiment (tiny BERT / Llama built from configs, a few steps)."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_tiny_bert, make_tiny_llama, make_word_tokenizer

from balora.cli import main
from balora.core.config import ConfigError
from balora.experiments.lab import run_lab
from balora.experiments.lab.pretrain import flip_labels, split_halves
from balora.experiments.lab.spectral import effective_rank, singular_values
from balora.training.data import DataError, balance_classes, imbalance_subsample, parse_ratio
from balora.training.run_config import run_config_from_dict

QUIET = {"show_progress": False, "say": lambda message: None}
PNG = b"\x89PNG"


# ---------------------------------------------------------------- pure maths
def _records(counts: dict[str, int]) -> list[dict]:
    rows = []
    for label, n in counts.items():
        rows += [{"text": f"w{i}", "label": label, "i": f"{label}{i}"} for i in range(n)]
    return rows


def test_imbalance_subsampling_counts_are_exact_and_nested():
    rows = _records({"neg": 60, "pos": 45, "mid": 50})
    kept, info = imbalance_subsample(rows, label_field="label", ratio="1:9", seed=3)
    # minority = least frequent (pos, 45); 1:9 of the largest other class (60) -> round(60 / 9) = 7
    assert Counter(r["label"] for r in kept) == {"neg": 60, "mid": 50, "pos": 7}
    assert info["minority_label"] == "pos" and info["counts_after"] == {"mid": 50, "neg": 60, "pos": 7}
    assert info["achieved_ratio"] == pytest.approx(7 / 60)
    assert [r["i"] for r in kept] == [r["i"] for r in rows if r in kept]  # original order kept

    milder, _ = imbalance_subsample(rows, label_field="label", ratio=0.25, seed=3)
    assert Counter(r["label"] for r in milder)["pos"] == 15
    minority = lambda rs: {r["i"] for r in rs if r["label"] == "pos"}  # noqa: E731
    assert minority(kept) < minority(milder)  # the 1:9 minority examples are among the 1:4 ones
    other_seed, _ = imbalance_subsample(rows, label_field="label", ratio=0.25, seed=4)
    assert minority(other_seed) != minority(milder)

    # 1:1 with a barely smaller minority: keep every minority example, cut the other classes
    even, info = imbalance_subsample(rows, label_field="label", ratio="1:1", seed=3)
    assert Counter(r["label"] for r in even) == {"neg": 45, "mid": 45, "pos": 45}
    # an explicit minority label, matched by its text too
    chosen, info = imbalance_subsample(_records({"0": 30, "1": 30}), label_field="label", ratio="1/3",
                                       minority_label=0, seed=1)
    assert info["minority_label"] == "0" and Counter(r["label"] for r in chosen) == {"1": 30, "0": 10}
    # ties: the last label in sorted order is the minority
    _, info = imbalance_subsample(_records({"b": 20, "a": 20}), label_field="label", ratio=0.5)
    assert info["minority_label"] == "b"

    balanced, counts = balance_classes(rows, label_field="label", seed=5, purpose="test")
    assert counts == {"mid": 45, "neg": 45, "pos": 45} and len(balanced) == 135


@pytest.mark.parametrize("value, message", [
    (2, "must be in \\(0, 1\\]"), (0, "must be in \\(0, 1\\]"), ("9:1", "must be in \\(0, 1\\]"),
    ("one to nine", "'minority:majority' such as '1:9'"), ("1:0", "the majority side is 0")])
def test_bad_ratios(value, message):
    with pytest.raises(ValueError, match=message):
        parse_ratio(value)
    with pytest.raises(ConfigError, match=f"data.imbalance_ratio: .*{message}"):
        run_config_from_dict({"model": {"task": "nlu"}, "data": {"imbalance_ratio": value}})


def test_imbalance_option_errors():
    assert parse_ratio("1:19") == pytest.approx(1 / 19)
    with pytest.raises(ConfigError, match=r"data.balance_test: only for classification \(model.task: nlu\)"):
        run_config_from_dict({"model": {"task": "nlg"}, "data": {"balance_test": True}})
    with pytest.raises(ConfigError, match="data.minority_label: set only with data.imbalance_ratio"):
        run_config_from_dict({"data": {"minority_label": "pos"}})
    with pytest.raises(DataError, match=r"data.minority_label 'maybe' is not a label .*'neg', 'pos'"):
        imbalance_subsample(_records({"neg": 5, "pos": 5}), label_field="label", ratio=0.5, minority_label="maybe")
    with pytest.raises(DataError, match="keeps no minority example"):
        imbalance_subsample(_records({"neg": 5, "pos": 5}), label_field="label", ratio=0.01)


def test_label_flips_are_exact_and_nested():
    labels = [i % 3 for i in range(200)]
    noisy20, flipped20 = flip_labels(labels, 0.2, 3, seed=7)
    noisy40, flipped40 = flip_labels(labels, 0.4, 3, seed=7)
    assert len(flipped20) == 40 and len(flipped40) == 80 and set(flipped20) < set(flipped40)
    assert all(noisy20[i] != labels[i] for i in flipped20) and all(noisy40[i] != labels[i] for i in flipped40)
    assert all(noisy20[i] == noisy40[i] for i in flipped20)  # the same wrong label at both levels
    assert sum(a != b for a, b in zip(noisy40, labels)) == 80
    assert flip_labels(labels, 0.0, 3, seed=7) == (labels, [])
    binary, flipped = flip_labels([0, 1] * 10, 0.5, 2, seed=1)
    assert all(binary[i] == 1 - [0, 1][i % 2] for i in flipped)
    first, second = split_halves([{"i": i} for i in range(11)], seed=2)
    assert len(first) == 5 and len(second) == 6 and not {r["i"] for r in first} & {r["i"] for r in second}


def test_effective_rank_by_hand():
    # σ = (3, 1): p = (3/4, 1/4); H = −(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351446; exp(H) = 1.7547654
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(h)) == pytest.approx(1.7547654, rel=1e-6)
    assert effective_rank([1, 3, 0, 0]) == pytest.approx(math.exp(h))  # order and zeros do not matter
    assert effective_rank([2.0] * 5) == pytest.approx(5.0) and effective_rank([4.0, 0.0]) == pytest.approx(1.0)
    m = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    assert singular_values(m).tolist() == pytest.approx([3.0, 1.0])
    # centring removes the column means: two identical rows -> rank 0 after centring
    assert singular_values(np.array([[1.0, 2.0], [1.0, 2.0]]), center=True).tolist() == pytest.approx([0.0, 0.0])
    import torch

    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(h))
    for bad, message in (([0.0, 0.0], "zero matrix"), ([1.0, -1.0], ">= 0"), ([], "non-empty")):
        with pytest.raises(ValueError, match=message):
            effective_rank(bad)


# ---------------------------------------------------------------- tiny assets
def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _text(i: int, label: str) -> str:
    return " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(5)) + (" w50" if label == "pos" else " w60")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lab")
    make_tiny_bert().save_pretrained(root / "tiny-bert")
    make_word_tokenizer().save_pretrained(root / "tiny-bert")
    make_tiny_llama(seed=5).save_pretrained(root / "tiny-llama")
    make_word_tokenizer().save_pretrained(root / "tiny-llama")
    train = [{"text": _text(i, lab), "label": lab} for i, lab in enumerate(["neg"] * 40 + ["pos"] * 30)]
    test = [{"text": _text(i + 100, lab), "label": lab} for i, lab in enumerate(["neg"] * 12 + ["pos"] * 8)]
    _jsonl(root / "cls" / "train.jsonl", train)
    _jsonl(root / "cls" / "test.jsonl", test)
    _jsonl(root / "nlg.jsonl", [{"query": f"w{i} w{i + 1}", "response": f"w{i + 2} w{i + 3}"} for i in range(3, 23)])
    _jsonl(root / "crows.jsonl", [{"id": i, "bias_type": "age", "sentence": "w1 [MASK] w2", "mask1": f"w{i + 3}",
                                   "mask2": "w9"} for i in range(3)])
    _jsonl(root / "stereoset.jsonl", [{"type": "intersentence", "target": "t", "bias_type": "race", "context": "w1",
                                       "stereotype": "w2", "anti-stereotype": "w3", "unrelated": f"w{4 + i}"}
                                      for i in range(3)])
    _jsonl(root / "bbq.jsonl", [{"passage": "w1", "question": "w2\nPlease choose the correct option ",
                                 "options": "A. w3\nB. Unknown\nC. w4", "answer": [a]}
                                for a in ("w3", "Unknown", "w4")])
    return root


def _nlu_config(assets: Path, steps: int = 2) -> dict:
    return {"method": "lora", "model": {"name": str(assets / "tiny-bert"), "task": "nlu"}, "adapter": {"r": 2},
            "data": {"source": str(assets / "cls"), "max_length": 12},
            "training": {"max_steps": steps, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                         "logging_steps": 1, "save_strategy": "no", "use_cpu": True}}


def _spec(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------- imbalance
def test_lab_imbalance_end_to_end(tmp_path, assets):
    out = tmp_path / "imbalance"
    spec = _spec(tmp_path, {"experiment": "imbalance", "output_dir": str(out), "ratios": ["1:1", "1:4"],
                            "methods": ["pissa", "ba-lora"], "seeds": [1, 2],
                            "tasks": {"tiny": {"base_config": _nlu_config(assets)}}})
    result = run_lab("imbalance", spec, **QUIET)
    task = result["tasks"]["tiny"]
    assert task["cells_ok"] == task["cells_expected"] == 8
    counts = {c["ratio"]: c["train_counts"] for c in task["cells"]}
    assert counts == {"1:1": {"neg": 30, "pos": 30}, "1:4": {"neg": 40, "pos": 10}}  # 40 neg / 30 pos in train
    assert all(c["test_counts"] == {"neg": 8, "pos": 8} and c["minority_label"] == "pos" for c in task["cells"])
    cell = json.loads(next((out / "tiny" / "cells").glob("*1_4*pissa*seed=2*/result.json")).read_text())
    assert cell["data"]["class_counts"]["train"] == {"neg": 40, "pos": 10}
    recall = [c["minority_recall"] for c in task["cells"] if c["method"] == "pissa" and c["ratio"] == "1:4"]
    stored = [json.loads(p.read_text()) for p in sorted((out / "tiny" / "cells").glob("*1_4*pissa*/result.json"))]
    assert recall == [r["metrics"]["test"]["per_class_recall"]["pos"] for r in stored]
    table = task["table"]["minority_recall"]["pissa"]
    assert table["1:4"]["mean"] == pytest.approx(sum(recall) / 2)
    readme = (out / "README.md").read_text()
    row = " | ".join(f"{table[r]['mean']:.3f} ± {table[r]['std']:.3f}" for r in ("1:1", "1:4"))
    assert "**minority recall**\n\n| method | 1:1 | 1:4 |\n|---|---|---|\n| pissa | " + row + " |" in readme
    assert (out / "plots" / "imbalance-tiny.png").read_bytes()[:4] == PNG
    assert json.loads((out / "results.json").read_text())["ratios"] == ["1:1", "1:4"]
    assert (out / "tiny" / "summary.md").is_file()
    # the verdicts: BA-LoRA vs PiSSA per ratio, paired by seed, as in the compare summary
    paired = json.loads((out / "tiny" / "summary.json").read_text())["paired"]
    assert task["paired"][:2] == paired and len(paired) == 2  # one pair per ratio
    by = {(c["ratio"], c["method"], c["seed"]): c["accuracy"] for c in task["cells"]}
    for entry, ratio in zip(paired, ("1:1", "1:4")):
        assert entry["diffs"] == pytest.approx({str(s): by[(ratio, "ba-lora", s)] - by[(ratio, "pissa", s)]
                                                for s in (1, 2)})
    # and the recall of the class made rare ("pos"; the balanced test split's own "minority" is a tie)
    rare = task["paired"][2:]
    assert [e["metric"] for e in rare] == ["test.rare_class.recall"] * 2 and rare[1]["a"].startswith(
        "data.imbalance_ratio=1:4")
    recall = {(c["ratio"], c["method"], c["seed"]): c["minority_recall"] for c in task["cells"]}
    assert rare[1]["diffs"] == pytest.approx({str(s): recall[("1:4", "ba-lora", s)] - recall[("1:4", "pissa", s)]
                                              for s in (1, 2)})
    assert rare[1]["bootstrap"] is None and rare[1]["scale"] == 100
    assert "### Paired differences (per seed)" in readme and "| 1:4 | ba-lora vs pissa | test.rare_class.recall ↑ |" in readme

    before = (out / "tiny" / "cells").stat().st_mtime_ns
    assert main(["lab", "imbalance", str(spec), "--only-report"]) == 0  # nothing re-runs
    assert (out / "tiny" / "cells").stat().st_mtime_ns == before


# ---------------------------------------------------------------- noise
def test_lab_noise_end_to_end(tmp_path, assets):
    out = tmp_path / "noise"
    spec = _spec(tmp_path, {
        "experiment": "noise", "output_dir": str(out), "base_model": str(assets / "tiny-bert"),
        "data": {"source": str(assets / "cls")}, "noise_levels": [0.0, 0.4],
        "pretrain": {"steps": 3, "batch_size": 8, "learning_rate": 1e-3, "max_length": 12, "log_every": 0},
        "downstream": {"base_config": _nlu_config(assets)}, "methods": ["pissa", "ba-lora"], "seeds": [1, 2]})
    result = run_lab("noise", spec, **QUIET)
    s0, s4 = result["stage1"]["noise-0"], result["stage1"]["noise-0.4"]
    assert (s0["examples"], s0["flipped"], s4["flipped"]) == (35, 0, 14)  # first half of 70 training rows
    assert s0["settings"] == s4["settings"]  # only the noise differs
    for level in ("noise-0", "noise-0.4"):
        ckpt = out / "checkpoints" / level
        assert (ckpt / "config.json").is_file() and (ckpt / "noise.json").is_file()
        assert "classifier" not in json.dumps(json.loads((ckpt / "config.json").read_text()).get("architectures"))
        assert len(result["cells"][level]) == 4 and all(c["status"] == "ok" for c in result["cells"][level])
    cell = json.loads(next((out / "downstream" / "noise-0.4" / "cells").glob("method=pissa*/result.json")).read_text())
    assert cell["config"]["model"]["name"] == str(out / "checkpoints" / "noise-0.4")
    cell0 = json.loads(next((out / "downstream" / "noise-0" / "cells").glob("method=pissa*/result.json")).read_text())
    assert cell0["config"]["model"]["name"] == str(out / "checkpoints" / "noise-0")  # each level its own checkpoint
    assert cell["data"]["train"] == 35 and cell["data"]["test"] == 20  # the clean second half; the test split
    downstream = [json.loads(x) for x in (out / "data" / "downstream" / "train.jsonl").read_text().splitlines()]
    assert len(downstream) == 35
    by = {(c["method"], c["seed"]): c["accuracy"] for c in result["cells"]["noise-0.4"]}
    gain = result["gain"]["by_level"]["noise-0.4"]
    assert gain["values"] == pytest.approx([by[("ba-lora", s)] - by[("pissa", s)] for s in (1, 2)])
    readme = (out / "README.md").read_text()
    assert "## Design" in readme and "isolates the noise" in readme and "| 40 % |" in readme
    # the verdicts per level, paired by seed, from each level's compare summary
    paired = json.loads((out / "downstream" / "noise-0.4" / "summary.json").read_text())["paired"]
    assert result["paired"]["noise-0.4"] == paired and paired[0]["a"] == "method=ba-lora"
    assert paired[0]["diffs"] == pytest.approx({str(s): v for s, v in zip((1, 2), gain["values"])})
    assert "## Paired differences (per seed)" in readme and "| 40 % flipped | ba-lora vs pissa |" in readme
    assert (out / "plots" / "noise.png").read_bytes()[:4] == PNG

    marker = out / "checkpoints" / "noise-0.4" / "noise.json"
    stamp = marker.stat().st_mtime_ns
    run_lab("noise", spec, **QUIET)  # resumable: stage 1 and every cell are skipped
    assert marker.stat().st_mtime_ns == stamp
    data = yaml.safe_load(spec.read_text())
    data["pretrain"]["steps"] = 4
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"spec.yaml: pretrain: .*noise-0 was made with other settings"):
        run_lab("noise", spec, **QUIET)


# ---------------------------------------------------------------- bias
def _nlg_compare(tmp_path: Path, assets: Path, grid: dict) -> Path:
    from balora.experiments.compare import run_compare

    nlg = {"method": "lora", "model": {"name": str(assets / "tiny-llama"), "task": "nlg"}, "adapter": {"r": 2},
           "data": {"source": str(assets / "nlg.jsonl"), "template": "plain", "max_length": 16, "test_fraction": 0.2},
           "training": {"max_steps": 1, "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
                        "use_cpu": True}}
    compare_dir = tmp_path / "nlg-compare"
    run_compare(_spec(tmp_path, {"name": "nlg", "base_config": nlg, "output_dir": str(compare_dir), "grid": grid}),
                **QUIET)
    return compare_dir


def test_lab_bias_end_to_end(tmp_path, assets):
    compare_dir = _nlg_compare(tmp_path, assets, {"method": ["lora", "ba-lora"], "training.seed": [1, 2]})
    out = tmp_path / "bias"
    data = {"crows_pairs": str(assets / "crows.jsonl"), "stereoset": str(assets / "stereoset.jsonl"),
            "bbq": str(assets / "bbq.jsonl")}
    spec = _spec(tmp_path, {"experiment": "bias", "output_dir": str(out), "base_model": str(assets / "tiny-llama"),
                            "compare_dirs": [str(compare_dir)], "limit": 2, "batch_size": 4, "data": data,
                            "device": "cpu"})
    result = run_lab("bias", spec, **QUIET)
    assert len(result["models"]) == 5 and all(m["evaluated"] for m in result["models"])
    assert set(result["table"]) == {"base", "method=lora", "method=ba-lora"}
    base_eval = json.loads((out / "evals" / "base" / "eval.json").read_text())
    assert set(base_eval["tasks"]) == {"crows_pairs", "stereoset", "bbq"} and base_eval["tasks"]["bbq"]["items"] == 2
    runs = [m for m in result["models"] if m["group"] == "method=ba-lora"]
    run_eval = json.loads((Path(runs[0]["eval_dir"]) / "eval.json").read_text())
    assert run_eval["model_kind"] == "run" and run_eval["model"] == runs[0]["spec"]  # the adapter, not the base
    deltas = [m["values"]["stereoset.lms"] - result["models"][0]["values"]["stereoset.lms"] for m in runs]
    assert result["delta"]["method=ba-lora"]["stereoset.lms"]["values"] == pytest.approx(deltas)
    for m in runs:  # the paired item-level change agrees with the scores' difference
        assert result["paired"][m["label"]]["stereoset.ss"]["delta"] == pytest.approx(
            m["values"]["stereoset.ss"] - result["models"][0]["values"]["stereoset.ss"])
    readme = (out / "README.md").read_text()
    assert "## Change from the base model (after − before)" in readme and "| ba-lora |" in readme
    assert "## Per run: the change on the same items" in readme
    assert (out / "plots" / "bias-delta.png").read_bytes()[:4] == PNG

    stamp = (out / "evals" / "base" / "eval.json").stat().st_mtime_ns
    run_lab("bias", spec, **QUIET)  # resumable: every eval.json is complete
    assert (out / "evals" / "base" / "eval.json").stat().st_mtime_ns == stamp
    spec.write_text(spec.read_text().replace("limit: 2", "limit: 3"))
    with pytest.raises(ConfigError, match=r"spec.yaml: limit: .*eval.json holds crows_pairs with limit 2"):
        run_lab("bias", spec, **QUIET)
    spec.write_text(spec.read_text().replace("limit: 3", "limit: {crows_pairs: 2, stereoset: 2}"))
    with pytest.raises(ConfigError, match=r"eval.json holds bbq with limit 2, the spec says None"):
        run_lab("bias", spec, **QUIET)  # bbq, left out of the mapping, means all items
    spec.write_text(yaml.safe_dump({"experiment": "bias", "base_model": "m", "runs": [str(tmp_path / "nowhere")]}))
    with pytest.raises(ConfigError, match=r"spec.yaml: runs\[0\]: .*nowhere: no such run directory"):
        run_lab("bias", spec, **QUIET)


def test_lab_bias_processes_share_the_models(tmp_path, assets):
    """A model another live process is evaluating is skipped (two `balora lab bias` share the models);
    a claim left by a dead process is taken over."""
    import os

    compare_dir = _nlg_compare(tmp_path, assets, {"method": ["lora"], "training.seed": [1]})
    out = tmp_path / "bias"
    data = {"crows_pairs": str(assets / "crows.jsonl")}
    spec = _spec(tmp_path, {"experiment": "bias", "output_dir": str(out), "base_model": str(assets / "tiny-llama"),
                            "compare_dirs": [str(compare_dir)], "tasks": ["crows_pairs"], "limit": 2,
                            "batch_size": 4, "data": data, "device": "cpu"})
    (out / "evals" / "base").mkdir(parents=True)
    (out / "evals" / "base" / "running.pid").write_text(str(os.getppid()))  # a live process holds the base
    messages: list[str] = []
    result = run_lab("bias", spec, show_progress=False, say=messages.append)
    assert any("base: being evaluated by process" in m for m in messages)
    assert not (out / "evals" / "base" / "eval.json").exists()
    assert [m["evaluated"] for m in result["models"]] == [False, True]
    assert list((out / "evals").rglob("running.pid")) == [out / "evals" / "base" / "running.pid"]  # run's released
    (out / "evals" / "base" / "running.pid").write_text("999999999")  # its process is gone
    result = run_lab("bias", spec, **QUIET)
    assert all(m["evaluated"] for m in result["models"]) and not list((out / "evals").rglob("running.pid"))


def test_paired_item_change_against_a_naive_bootstrap():
    from balora.experiments.lab.bias import paired_item_change

    rng = random.Random(3)
    before = [rng.random() < 0.55 for _ in range(200)]
    after = [b if rng.random() < 0.8 else not b for b in before]
    got = paired_item_change(before, after, resamples=400, seed=5)
    diffs = [int(a) - int(b) for a, b in zip(after, before)]
    assert got["delta"] == pytest.approx(100 * sum(diffs) / len(diffs))
    assert got["flipped_to"] == diffs.count(1) and got["flipped_from"] == diffs.count(-1) and got["n"] == 200
    naive = np.random.default_rng(5)  # the same resampling, written out one resample at a time
    idx = naive.integers(0, 200, size=(400, 200))
    means = sorted(100 * sum(diffs[i] for i in row) / 200 for row in idx)
    assert got["ci95"][0] == pytest.approx(np.percentile(means, 2.5))
    assert got["ci95"][1] == pytest.approx(np.percentile(means, 97.5))
    assert got["ci95"][0] < got["delta"] < got["ci95"][1]
    same = paired_item_change(before, before)
    assert same["delta"] == 0 and same["ci95"] == [0, 0] and same["flipped_to"] == same["flipped_from"] == 0
    with pytest.raises(ValueError, match="same non-zero number of items, got 2 and 1"):
        paired_item_change([True, False], [True])


def test_lab_bias_per_task_limits(tmp_path, assets):
    """`limit` as a mapping: each task evaluated on its own first N items, merged into one eval.json."""
    out = tmp_path / "bias"
    data = {"crows_pairs": str(assets / "crows.jsonl"), "bbq": str(assets / "bbq.jsonl")}
    compare_dir = _nlg_compare(tmp_path, assets, {"method": ["lora"]})
    base = {"experiment": "bias", "output_dir": str(out), "base_model": str(assets / "tiny-llama"),
            "compare_dirs": [str(compare_dir)], "tasks": ["crows_pairs", "bbq"], "batch_size": 4, "data": data, "device": "cpu"}
    result = run_lab("bias", _spec(tmp_path, base | {"limit": {"crows_pairs": 1}}), **QUIET)
    assert result["limits"] == {"crows_pairs": 1, "bbq": None}
    stored = json.loads((out / "evals" / "base" / "eval.json").read_text())["tasks"]
    assert (stored["crows_pairs"]["items"], stored["bbq"]["items"]) == (1, 3)
    assert (stored["crows_pairs"]["settings"]["limit"], stored["bbq"]["settings"]["limit"]) == (1, None)
    assert "crows_pairs (first 1 items), bbq (all items)" in (out / "README.md").read_text()
    for bad, where in (({"stereoset": 5}, r"limit\.stereoset: not one of the spec's tasks"),
                       ({"bbq": 0}, r"limit\.bbq: expected null \(all items\) or an integer >= 1, got 0"),
                       ("ten", r"limit: expected null \(all items\) or an integer >= 1, got 'ten'")):
        with pytest.raises(ConfigError, match=where):
            run_lab("bias", _spec(tmp_path, base | {"limit": bad}), **QUIET)


# ---------------------------------------------------------------- spectrum
def test_spectrum_callback_leaves_training_unchanged(tmp_path, assets):
    from balora.experiments.lab.spectrum import SpectrumCallback
    from balora.training.run import train_run

    def run(name: str, with_callback: bool) -> list[float]:
        data = _nlu_config(assets, steps=4) | {"method": "ba-lora", "output_dir": str(tmp_path / name)}
        data["training"] |= {"seed": 3}
        cfg = run_config_from_dict(data)
        callbacks = [SpectrumCallback(cfg, [0, 1, 3], 10)] if with_callback else []
        train_run(cfg, show_progress=False, callbacks=callbacks)
        history = json.loads((tmp_path / name / "log_history.json").read_text())
        return [row["loss"] for row in history if "loss" in row]

    plain, snapped = run("plain", False), run("snapped", True)
    assert len(plain) == 4 and plain == snapped  # bit-identical loss curve
    spectrum = json.loads((tmp_path / "snapped" / "spectrum.json").read_text())
    assert [s["step"] for s in spectrum["snapshots"]] == [0, 1, 3, 4] and spectrum["n_examples"] == 10
    first = spectrum["snapshots"][0]
    assert first["features"]["shape"] == [10, 32] and first["logits"]["shape"] == [10, 2]
    assert first["features"]["effective_rank"] == pytest.approx(effective_rank(first["features"]["singular_values"]))
    final = np.load(tmp_path / "snapped" / "spectrum_final.npz")
    assert final["features"].shape == (10, 32) and int(final["step"]) == 4

    # the callback restores train mode (and eval mode where it found it)
    model = make_tiny_bert().train()
    callback = SpectrumCallback(run_config_from_dict(data_for(assets, tmp_path / "snapped")), [0], 5)
    callback._outputs(model)
    assert model.training
    callback._outputs(model.eval())
    assert not model.training


def data_for(assets: Path, run_dir: Path) -> dict:
    return _nlu_config(assets) | {"output_dir": str(run_dir)}


def test_lab_spectrum_end_to_end(tmp_path, assets):
    out = tmp_path / "spectrum"
    spec = _spec(tmp_path, {"experiment": "spectrum", "output_dir": str(out),
                            "compare": {"base_config": _nlu_config(assets, steps=3),
                                        "grid": {"method": ["pissa", "ba-lora"], "training.seed": [1, 2]}},
                            "snapshot_steps": [0, 2], "n_examples": 12, "tsne": {"perplexity": 5}})
    result = run_lab("spectrum", spec, **QUIET)
    assert set(result["groups"]) == {"method=pissa", "method=ba-lora"}
    group = result["groups"]["method=ba-lora"]
    assert group["steps"] == [0, 2, 3] and group["seeds"] == [1, 2]
    assert group["features_effective_rank"]["3"]["n"] == 2 and len(group["logits_final_spectrum"]) == 2
    assert sum(group["logits_final_spectrum"]) == pytest.approx(1.0)
    for name in ("spectra.png", "effective_rank.png", "tsne.png"):
        assert (out / "plots" / name).read_bytes()[:4] == PNG, name
    readme = (out / "README.md").read_text()
    erank = group["features_effective_rank"]["3"]
    assert f"{erank['mean']:.2f} ± {erank['std']:.2f}" in readme and "| ba-lora | 2 |" in readme


# ---------------------------------------------------------------- errors
def test_lab_errors(tmp_path, assets, capsys):
    with pytest.raises(ConfigError, match="unknown lab experiment 'noize'; known: imbalance, noise, bias, spectrum"):
        run_lab("noize", tmp_path / "spec.yaml")
    assert main(["lab", "noize", str(tmp_path / "spec.yaml")]) == 2
    assert "unknown lab experiment 'noize'" in capsys.readouterr().err
    assert main(["lab", "imbalance", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: no such spec file" in capsys.readouterr().err

    base = {"experiment": "imbalance", "output_dir": str(tmp_path / "out"),
            "tasks": {"tiny": {"base_config": _nlu_config(assets)}}}
    spec = _spec(tmp_path, base | {"ratios": ["1:1", "9:1"]})
    with pytest.raises(ConfigError, match=r"spec.yaml: ratios\[1\]: '9:1' is minority/majority = 9"):
        run_lab("imbalance", spec, **QUIET)
    spec = _spec(tmp_path, base | {"ratio": ["1:1"]})
    with pytest.raises(ConfigError, match=r"spec.yaml: ratio: unknown key for `balora lab imbalance`"):
        run_lab("imbalance", spec, **QUIET)
    spec = _spec(tmp_path, base | {"tasks": {"tiny": {"base_config": _nlu_config(assets),
                                                      "overrides": ["training.max_stepz=3"]}}})
    with pytest.raises(ConfigError, match=r"spec.yaml: tasks.tiny: base \+ overrides: training.max_stepz"):
        run_lab("imbalance", spec, **QUIET)
    with pytest.raises(ConfigError, match=r"spec.yaml: experiment: this spec is for 'imbalance'; run it with "
                                          r"`balora lab imbalance"):
        run_lab("noise", _spec(tmp_path, base), **QUIET)
    assert not (tmp_path / "out").exists()


def test_committed_specs_expand():
    """The specs under experiments/lab/ parse and expand into the documented grids (nothing runs)."""
    from balora.experiments.compare import build_cells
    from balora.experiments.lab import bias, imbalance, noise, spectrum
    from balora.experiments.spec import load_lab_spec

    root = Path(__file__).resolve().parents[1] / "experiments" / "lab"
    spec = load_lab_spec(root / "imbalance.yaml", "imbalance", imbalance.KEYS)
    _, _, _, specs = imbalance._setup(spec)
    assert {task: len(build_cells(s)) for task, s in specs.items()} == {"rotten-tomatoes": 48}
    assert all(c.config.data.balance_test for c in build_cells(specs["rotten-tomatoes"]))
    setup = noise._Setup(load_lab_spec(root / "noise.yaml", "noise", noise.KEYS))
    assert setup.levels == [0.0, 0.2, 0.4] and setup.pretrain["examples"] == 800
    cells = build_cells(setup.compare_specs[0.4])
    assert len(cells) == 9 and cells[0].config.model.name.endswith("checkpoints/noise-0.4")
    setup = spectrum._Setup(load_lab_spec(root / "spectrum.yaml", "spectrum", spectrum.KEYS))
    cells = build_cells(setup.compare)
    assert len(cells) == 8 and cells[-1].config.balora.nlu_svd_target == "features"
    spec = load_lab_spec(root / "bias.yaml", "bias", bias.KEYS)
    assert spec.data["compare_dirs"] == ["results/nlg-asdiv"] and spec.data["tasks"] == list(bias.BIAS_TASKS)
    assert bias.parse_limits(spec, spec.data["tasks"]) == {"crows_pairs": None, "stereoset": 600, "bbq": 120}


def test_bias_closeness_is_paired_by_seed_against_a_hand_computation():
    """|A − base| − |B − base| per common seed, mean and t interval over the seeds; a seed only one method
    has is left out, and a score the base lacks is skipped."""
    import math

    from balora.experiments.lab.bias import closeness_by_seed

    models = [{"label": "base", "group": "base", "seed": None}] + [
        {"label": f"{g}-{s}", "group": g, "seed": s} for g in ("method=ba-lora", "method=pissa") for s in (1, 2, 3)]
    models.append({"label": "method=pissa-4", "group": "method=pissa", "seed": 4})
    base = {"crows.score": 55.0, "bbq.acc": None}
    values = {"base": base,
              "method=ba-lora-1": {"crows.score": 55.5, "bbq.acc": 1.0}, "method=pissa-1": {"crows.score": 53.0,
                                                                                          "bbq.acc": 1.0},
              "method=ba-lora-2": {"crows.score": 54.0, "bbq.acc": 1.0}, "method=pissa-2": {"crows.score": 58.0,
                                                                                          "bbq.acc": 1.0},
              "method=ba-lora-3": {"crows.score": 56.0, "bbq.acc": 1.0}, "method=pissa-3": {"crows.score": 55.5,
                                                                                          "bbq.acc": 1.0},
              "method=pissa-4": {"crows.score": 70.0, "bbq.acc": 1.0}}
    got = closeness_by_seed(models, values, ["crows.score", "bbq.acc"])
    d = got["method=ba-lora vs method=pissa"]
    assert "bbq.acc" not in d  # the base has no score there
    want = [0.5 - 2.0, 1.0 - 3.0, 1.0 - 0.5]  # seeds 1-3; seed 4 has no BA-LoRA run
    mean = sum(want) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in want) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2)
    c = d["crows.score"]
    assert c["n"] == 3 and c["mean"] == pytest.approx(mean)
    assert (c["t_low"], c["t_high"]) == (pytest.approx(mean - half), pytest.approx(mean + half))
