"""`balora compare`: a grid of tiny runs, resumption after a kill, retries and failed cells, the
summary's mean ± std, fail-fast spec errors, the NLG evaluation hook, and the paired differences per seed."""

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_tiny_bert, make_word_tokenizer

from balora.cli import main
from balora.core.config import BALoraConfig, ConfigError
from balora.experiments.compare import load_spec, run_compare
from balora.experiments.paired import VERDICT_RULE, paired_item_bootstrap, paired_seed_differences
from balora.training import run as run_module
from balora.training.run_config import dump_run_config
from balora.utils import write_json

RESULT_KEYS = {"schema_version", "cell_id", "grid", "group", "seed", "method", "status", "error", "attempts",
               "metrics", "forgetting", "trainable_parameters", "total_parameters", "adapter_bytes",
               "peak_rss_mb", "cell_peak_rss_mb", "peak_gpu_mb", "train_seconds", "wall_seconds", "global_step",
               "train_tokens", "data", "run_dir", "trained_in", "config", "versions", "finished_at"}


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_tiny_bert().save_pretrained(root / "tiny-bert")
    make_word_tokenizer().save_pretrained(root / "tiny-bert")
    rows = [{"text": " ".join(f"w{(i * 7 + j) % 40 + 3}" for j in range(6)) + (" w50" if i % 2 else " w60"),
             "label": "pos" if i % 2 else "neg"} for i in range(40)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def write_spec(tmp_path: Path, assets: Path, **extra) -> Path:
    """A run config file + a spec next to it that names it relatively: 2 methods × 2 seeds."""
    base = {"method": "lora", "model": {"name": str(assets / "tiny-bert"), "task": "nlu"}, "adapter": {"r": 2},
            "data": {"source": str(assets / "data.jsonl"), "test_fraction": 0.25, "max_length": 12},
            "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                         "logging_steps": 1, "save_strategy": "no", "use_cpu": True}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "tiny", "base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "grid": {"method": ["lora", "ba-lora"], "training.seed": [1, 2]},
            "overrides": ["training.max_steps=2"], "metrics": ["test.accuracy", "test.mcc"], **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def fmt(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


# ---------------------------------------------------------------- real tiny runs
def test_grid_runs_resumes_after_a_kill_and_summarises(tmp_path, tiny_assets, monkeypatch):
    spec = write_spec(tmp_path, tiny_assets)
    out = tmp_path / "out"

    def kill(message):  # a Ctrl-C right after the first cell finished (its "ok in N s" line)
        if ": ok in " in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_compare(spec, show_progress=False, say=kill)
    done = sorted(out.glob("cells/*/result.json"))
    assert [p.parent.name for p in done] == ["method=lora,training.seed=1"]
    assert not (out / "summary.md").exists()
    first_mtime = done[0].stat().st_mtime_ns

    trained = []
    real_train_run = run_module.train_run

    def counting_train(cfg, **kwargs):
        trained.append(Path(cfg.output_dir).parent.name)
        return real_train_run(cfg, **kwargs)

    monkeypatch.setattr(run_module, "train_run", counting_train)
    summary = run_compare(spec, show_progress=False, say=lambda m: None)
    assert trained == ["method=lora,training.seed=2", "method=ba-lora,training.seed=1",
                       "method=ba-lora,training.seed=2"]
    assert done[0].stat().st_mtime_ns == first_mtime
    assert summary["cells"] == {"total": 4, "ok": 4, "failed": 0, "pending": 0}

    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/result.json")}
    r = results["method=ba-lora,training.seed=2"]
    assert set(r) == RESULT_KEYS and r["schema_version"] == 1 and r["status"] == "ok"
    assert r["grid"] == {"method": "ba-lora", "training.seed": 2} and r["seed"] == 2 and r["method"] == "ba-lora"
    assert r["global_step"] == 2 and r["config"]["training"]["max_steps"] == 2
    assert r["adapter_bytes"] > 0 and r["trainable_parameters"] > 0 and r["peak_rss_mb"] > 0
    assert 0 <= r["metrics"]["test"]["accuracy"] <= 1
    pred = json.loads((out / "cells" / "method=ba-lora,training.seed=2" / "run" / "predictions" / "test.json").read_text())
    assert len(pred["label"]) == len(pred["predicted"]) == len(pred["logits"]) == 10
    # the default pair (ba-lora, lora), bootstrapped over the 10 test items of train_run's predictions
    [pair] = summary["paired"]
    assert (pair["a"], pair["b"], pair["n"], pair["bootstrap_items"]) == ("method=ba-lora", "method=lora", 2, 10)

    md = (out / "summary.md").read_text()
    for method in ("lora", "ba-lora"):
        accs = [results[f"method={method},training.seed={s}"]["metrics"]["test"]["accuracy"] for s in (1, 2)]
        assert f"{fmt(accs)}" in md
        group = next(g for g in summary["groups"] if g["label"] == f"method={method}")
        assert group["metrics"]["test.accuracy"]["values"] == accs
    assert "| method=lora | 2/2 |" in md and "| method=ba-lora | 2/2 |" in md
    for name in ("metrics.png", "curves.png", "cost.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
    assert json.loads((out / "summary.json").read_text())["cells"]["ok"] == 4


# ---------------------------------------------------------------- a fake trainer: exact numbers, fast
ACCURACY = {("lora", 1): 0.5, ("lora", 2): 0.7, ("ba-lora", 1): 0.8, ("ba-lora", 2): 0.9,
            ("dora", 1): 0.6, ("dora", 2): 0.65}


def fake_train(calls: list, fail: dict[str, int] | None = None):
    """Writes what train_run writes, with made-up metrics; ``fail``: cell id -> attempts that raise."""
    fail = dict(fail or {})

    def train(cfg, *, resume=False, show_progress=True):
        run = Path(cfg.output_dir)
        cell = run.parent.name
        calls.append((cell, resume))
        run.mkdir(parents=True, exist_ok=True)
        dump_run_config(cfg, run / "config.yaml")
        if fail.get(cell, 0) > 0:
            fail[cell] -= 1
            raise RuntimeError(f"boom in {cell}")
        (run / "adapter").mkdir(exist_ok=True)
        (run / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
        seed = cfg.training["seed"]
        (run / "log_history.json").write_text(json.dumps(
            [{"step": s, "loss": 1.0 / s, "task_loss": 1.0 / s, "balora/svd": 0.1 * seed} for s in (1, 2)]))
        acc = ACCURACY[(cfg.method, seed)]
        metrics = {"method": cfg.method, "trainable_parameters": 100, "total_parameters": 1000, "global_step": 2,
                   "train_seconds": 1.0 + seed, "peak_rss_mb": 500.0, "data": {"train": 30},
                   "test": {"accuracy": acc, "mcc": 2 * acc - 1}, "versions": {"balora": "test"}}
        (run / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return train


@pytest.fixture
def use_train(monkeypatch):
    """``use_train(fake)``: cells train with ``fake`` instead of `balora.training.run.train_run`."""

    def use(fake):
        monkeypatch.setattr(run_module, "train_run", fake)
        return fake

    return use


def test_failed_cell_is_retried_then_reported(tmp_path, tiny_assets, use_train):
    spec = write_spec(tmp_path, tiny_assets)
    data = yaml.safe_load(spec.read_text())
    data["grid"]["method"] = ["lora", "ba-lora", "dora"]
    spec.write_text(yaml.safe_dump(data))
    calls: list = []
    flaky, broken = "method=lora,training.seed=2", "method=dora,training.seed=2"
    use_train(fake_train(calls, fail={flaky: 1, broken: 99}))
    summary = run_compare(spec, say=lambda m: None)

    assert [c for c, _ in calls].count(flaky) == 2 and [c for c, _ in calls].count(broken) == 2
    out = tmp_path / "out"
    bad = json.loads((out / "cells" / broken / "result.json").read_text())
    assert bad["status"] == "failed" and bad["attempts"] == 2
    assert bad["error"]["type"] == "RuntimeError" and "boom in" in bad["error"]["message"]
    assert json.loads((out / "cells" / flaky / "result.json").read_text())["status"] == "ok"
    assert summary["cells"] == {"total": 6, "ok": 5, "failed": 1, "pending": 0}

    md = (out / "summary.md").read_text()
    assert "| method=lora | 2/2 | 0.6000 ± 0.1414 |" in md
    assert "| method=ba-lora | 2/2 | **0.8500 ± 0.0707** |" in md
    assert "| method=dora | 1/2 | 0.6000 |" in md  # one seed: no std
    assert "## Failed cells" in md and f"- {broken} (2 attempts): RuntimeError: boom in {broken}" in md
    # ba-lora vs lora: Δ 0.25 > max(0.0707, 0.1414); dora has one seed: undetermined
    assert "- **method=ba-lora**: test.accuracy: best; vs runner-up method=lora: Δ 0.2500 > 0.1414, beyond" in md
    assert "- **method=dora**: test.accuracy: #3, 0.2500 behind method=ba-lora, undetermined" in md
    assert summary["verdicts"]["test.accuracy"]["best"] == "method=ba-lora"

    # a re-run skips every cell with a result.json (failed ones too) unless asked to retry them
    calls.clear()
    run_compare(spec, say=lambda m: None)
    assert calls == []
    use_train(fake_train(calls))
    run_compare(spec, retry_failed=True, say=lambda m: None)
    assert [c for c, _ in calls] == [broken]
    assert (tmp_path / "out" / "plots" / "curves.png").exists()


def test_killed_cell_resumes_from_its_checkpoint_and_stale_results_are_refused(tmp_path, tiny_assets, use_train):
    spec = write_spec(tmp_path, tiny_assets)
    partial = tmp_path / "out" / "cells" / "method=lora,training.seed=1" / "run" / "checkpoints" / "checkpoint-1"
    partial.mkdir(parents=True)
    calls: list = []
    use_train(fake_train(calls))
    run_compare(spec, say=lambda m: None)
    assert calls[0] == ("method=lora,training.seed=1", True) and all(not resume for _, resume in calls[1:])

    data = yaml.safe_load(spec.read_text())
    data["overrides"] = ["training.max_steps=3"]
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"cell method=lora,training.seed=1: .* another configuration "
                                          r"\(training.max_steps: 2 -> 3\)"):
        run_compare(spec, say=lambda m: None)


def test_an_option_added_since_with_its_default_is_not_a_difference(tmp_path, tiny_assets, use_train):
    spec = write_spec(tmp_path, tiny_assets)
    calls: list = []
    use_train(fake_train(calls))
    run_compare(spec, say=lambda m: None)
    result_path = next((tmp_path / "out" / "cells").glob("*/result.json"))
    result = json.loads(result_path.read_text())
    del result["config"]["data"]["test_limit"]  # as if written before data.test_limit existed
    result_path.write_text(json.dumps(result))
    calls.clear()
    run_compare(spec, say=lambda m: None)
    assert calls == []
    result["config"]["data"]["test_limit"] = 7  # a real difference is still refused
    result_path.write_text(json.dumps(result))
    with pytest.raises(ConfigError, match=r"data.test_limit: 7 -> None"):
        run_compare(spec, say=lambda m: None)


@pytest.mark.parametrize("grid,message", [
    ({"method": ["lora"], "traning.seed": [1, 2]}, r"grid key 'traning.seed' = 1: traning: unknown section"),
    ({"training.max_step": [3]}, r"grid key 'training.max_step' = 3: training.max_step: not a "
                                 r"transformers.TrainingArguments option"),
    ({"method": ["lora", "qlora"]}, r"grid key 'method' = 'qlora': method: 'qlora' is not one of"),
    ({"output_dir": ["a"]}, r"grid.output_dir: not allowed"),
])
def test_grid_typo_fails_before_anything_runs(tmp_path, tiny_assets, grid, message, use_train):
    spec = write_spec(tmp_path, tiny_assets)
    data = yaml.safe_load(spec.read_text())
    data["grid"] = grid
    spec.write_text(yaml.safe_dump(data))
    calls: list = []
    use_train(fake_train(calls))
    with pytest.raises(ConfigError, match=message):
        run_compare(spec, say=lambda m: None)
    assert calls == [] and not (tmp_path / "out").exists()


def test_spec_errors(tmp_path, tiny_assets):
    spec = write_spec(tmp_path, tiny_assets, metric=["x"])
    with pytest.raises(ConfigError, match=r"spec.yaml: metric: unknown spec key"):
        load_spec(spec)
    spec = write_spec(tmp_path, tiny_assets, base="nowhere.yaml")
    with pytest.raises(ConfigError, match=r"base: 'nowhere.yaml' not found"):
        load_spec(spec)


# ---------------------------------------------------------------- paired statistics
ITEMS = 300
ITEM_LABELS = ["pos" if (i * 7) % 5 < 2 else "neg" for i in range(ITEMS)]


def item_correct(method: str, seed: int) -> np.ndarray:
    """Which test items a fake run gets right: ba-lora ~85 %, lora ~70 %; dora is lora with 10 items
    flipped each way (a tie on average)."""
    rng = np.random.default_rng(seed)
    lora = rng.random(ITEMS) < 0.70
    if method == "lora":
        return lora
    if method == "dora":
        dora = lora.copy()
        right, wrong = np.flatnonzero(lora), np.flatnonzero(~lora)
        dora[rng.choice(right, 10, replace=False)] = False
        dora[rng.choice(wrong, 10 + seed % 2, replace=False)] = True
        return dora
    return np.random.default_rng(100 + seed).random(ITEMS) < 0.85


def fake_train_with_predictions(calls: list):
    """Like train_run: metrics.json and predictions/test.json, the accuracy being that of the predictions."""

    def train(cfg, *, resume=False, show_progress=True):
        run = Path(cfg.output_dir)
        calls.append(run.parent.name)
        run.mkdir(parents=True, exist_ok=True)
        dump_run_config(cfg, run / "config.yaml")
        correct = item_correct(cfg.method, cfg.training["seed"])
        flip = {"pos": "neg", "neg": "pos"}
        predicted = [lab if ok else flip[lab] for lab, ok in zip(ITEM_LABELS, correct)]
        write_json(run / "predictions" / "test.json",
                   {"labels": ["neg", "pos"], "label": ITEM_LABELS, "predicted": predicted,
                    "logits": [[0.0, 1.0] if p == "pos" else [1.0, 0.0] for p in predicted]})
        metrics = {"method": cfg.method, "global_step": 2, "train_seconds": 1.0, "peak_rss_mb": 500.0,
                   "test": {"accuracy": float(correct.mean()), "mcc": 0.1}, "versions": {"balora": "test"}}
        write_json(run / "metrics.json", metrics)
        return metrics

    return train


def test_paired_differences_per_seed_give_the_verdict(tmp_path, tiny_assets, use_train):
    spec = write_spec(tmp_path, tiny_assets, paired={"pairs": [["ba-lora", "lora"], ["dora", "method=lora"]],
                                                      "bootstrap": 500})
    data = yaml.safe_load(spec.read_text())
    data["grid"] = {"method": ["lora", "dora", "ba-lora"], "training.seed": [1, 2, 3]}
    spec.write_text(yaml.safe_dump(data))
    calls: list = []
    use_train(fake_train_with_predictions(calls))
    summary = run_compare(spec, say=lambda m: None)
    assert len(calls) == 9

    win, tie = summary["paired"]
    acc = {(m, s): item_correct(m, s).mean() for m in ("lora", "dora", "ba-lora") for s in (1, 2, 3)}
    assert (win["a"], win["b"], win["metric"], win["n"]) == ("method=ba-lora", "method=lora", "test.accuracy", 3)
    assert win["diffs"] == {str(s): pytest.approx(acc["ba-lora", s] - acc["lora", s]) for s in (1, 2, 3)}
    d = paired_seed_differences({s: acc["ba-lora", s] for s in (1, 2, 3)}, {s: acc["lora", s] for s in (1, 2, 3)})
    assert win["t_interval"] == pytest.approx([d["t_low"], d["t_high"]])
    boot = paired_item_bootstrap({s: item_correct("ba-lora", s).astype(float) for s in (1, 2, 3)},
                                 {s: item_correct("lora", s).astype(float) for s in (1, 2, 3)}, samples=500)
    assert win["bootstrap"] == pytest.approx(list(boot)) and win["bootstrap_items"] == ITEMS
    assert win["t_interval"][0] > 0 and win["bootstrap"][0] > 0 and win["verdict"] == "beats"
    assert (win["positive"], win["negative"]) == (3, 0)
    assert (tie["a"], tie["b"]) == ("method=dora", "method=lora") and tie["verdict"] == "inconclusive"
    assert tie["bootstrap"][0] < 0 < tie["bootstrap"][1]

    md = (tmp_path / "out" / "summary.md").read_text()
    section = md[md.index("## Paired differences (per seed)"):]
    assert VERDICT_RULE in section
    mean = 100 * d["mean"]
    row = (f"| ba-lora vs lora | test.accuracy ↑ | 3 | {mean:+.2f} pts | [{100 * d['t_low']:+.2f}, "
           f"{100 * d['t_high']:+.2f}] | [{100 * boot[0]:+.2f}, {100 * boot[1]:+.2f}] (500 × 300 items) | 3/0 | "
           f"**ba-lora beats lora** |")
    assert row in section, section
    assert "| dora vs lora | test.accuracy ↑ | 3 |" in section and section.count("| inconclusive |") == 1
    assert md.index("## Paired differences") < md.index("Total compute")

    # without per-item scores, the t interval decides alone and the summary says so
    for run in (tmp_path / "out" / "cells").glob("method=lora,*/run"):
        (run / "predictions" / "test.json").unlink()
    summary = run_compare(spec, only_summary=True, say=lambda m: None)
    win = summary["paired"][0]
    assert win["bootstrap"] is None and "no per-item scores" in win["bootstrap_note"] and win["verdict"] == "beats"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| 3/0 | **ba-lora beats lora** |" in md
    assert ("- ba-lora vs lora: no bootstrap (no per-item scores: no "
            "cells/method=lora,training.seed=1/run/predictions/test.json)") in md

    # several metrics: every pair for each, in the order given (mcc has no per-item scores: t only)
    data["paired"] = {"pairs": [["ba-lora", "lora"], ["dora", "lora"]], "metric": ["test.accuracy", "test.mcc"],
                      "bootstrap": 0}
    spec.write_text(yaml.safe_dump(data))
    summary = run_compare(spec, only_summary=True, say=lambda m: None)
    assert [(p["a"][7:], p["b"][7:], p["metric"]) for p in summary["paired"]] == [
        ("ba-lora", "lora", "test.accuracy"), ("dora", "lora", "test.accuracy"),
        ("ba-lora", "lora", "test.mcc"), ("dora", "lora", "test.mcc")]
    assert summary["paired"][2]["diffs"] == {"1": 0.0, "2": 0.0, "3": 0.0}
    assert summary["paired"][2]["verdict"] == "inconclusive" and summary["paired"][0]["verdict"] == "beats"

    # the default pairs: (ba-lora, lora) among these methods; and no pairs, no section
    data.pop("paired")
    spec.write_text(yaml.safe_dump(data))
    summary = run_compare(spec, only_summary=True, say=lambda m: None)
    assert [(p["a"], p["b"]) for p in summary["paired"]] == [("method=ba-lora", "method=lora")]
    data["grid"] = {"method": ["lora", "dora"], "training.seed": [1, 2, 3]}
    spec.write_text(yaml.safe_dump(data))
    summary = run_compare(spec, only_summary=True, say=lambda m: None)
    assert summary["paired"] == [] and "Paired differences" not in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.parametrize("paired,message", [
    ({"pairs": [["ba-lora", "qlora"]]},
     r"spec.yaml: paired.pairs\[0\]: 'qlora' names no group \(nor a value of one grid axis\); known groups: "
     r"method=lora; method=ba-lora"),
    ({"pairs": [["ba-lora", "lora"], ["lora"]]}, r"spec.yaml: paired.pairs\[1\]: expected \[A, B\]"),
    ({"pairs": [["ba-lora", "lora"]], "reference": "lora"}, r"paired.reference: give pairs or reference, not both"),
    ({"reference": "dora"}, r"spec.yaml: paired.reference: 'dora' is not one of the methods: lora, ba-lora"),
    ({"bootstrap": -1}, r"paired.bootstrap: expected a number of replicates >= 0"),
    ({"metric": 3}, r"paired.metric: expected a string, got 3"),
    ({"metric": ["test.accuracy", 3]}, r"paired.metric\[1\]: expected a string, got 3"),
    ({"pair": [["a", "b"]]}, r"spec.yaml: paired.pair: unknown key; known: pairs, metric, bootstrap, reference"),
])
def test_paired_spec_errors(tmp_path, tiny_assets, paired, message):
    spec = write_spec(tmp_path, tiny_assets, paired=paired)
    with pytest.raises(ConfigError, match=message):
        run_compare(spec, dry_run=True, say=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_paired_reference_compares_each_variant_with_it(tmp_path, tiny_assets):
    from balora.experiments.compare import build_cells
    from balora.experiments.grid import paired_groups

    spec = write_spec(tmp_path, tiny_assets, variants={"all": {}, "cr-only": {"balora.lambda_diversity": 0}},
                      paired={"reference": "all"})
    loaded = load_spec(spec)
    assert loaded.paired.reference == "all" and loaded.paired.bootstrap == 2000 and loaded.paired.pairs is None
    # per method (the other non-seed axis); a reference replaces the default method pairs
    assert paired_groups(loaded, build_cells(loaded)) == [
        ("variant=cr-only, method=lora", "variant=all, method=lora"),
        ("variant=cr-only, method=ba-lora", "variant=all, method=ba-lora")]


def test_command_dry_run_lists_cells(tmp_path, tiny_assets, capsys):
    spec = write_spec(tmp_path, tiny_assets)
    assert main(["compare", str(spec), "--dry-run", "--retries", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "tiny: 4 cells" in out and "[4/4] pending  method=ba-lora,training.seed=2" in out
    assert not (tmp_path / "out").exists()


def test_eval_tasks_go_through_the_harness(tmp_path, tiny_assets, monkeypatch, use_train):
    seen = []

    def evaluate(model_spec, tasks, **kwargs):
        seen.append((Path(model_spec).name, list(tasks), kwargs["limit"]))
        return {"tasks": {"forgetting": {"metrics": {"forgetting": 0.25, "cross_entropy": 3.0}}}}

    fake = types.ModuleType("balora.evaluation.harness")
    fake.TASKS, fake.evaluate = ("asdiv", "forgetting"), evaluate
    monkeypatch.setitem(sys.modules, "balora.evaluation.harness", fake)
    import balora.evaluation

    monkeypatch.setattr(balora.evaluation, "harness", fake, raising=False)
    spec = write_spec(tmp_path, tiny_assets, metrics=["test.accuracy", "forgetting"])
    data = yaml.safe_load(spec.read_text())
    data["overrides"] += ["eval.tasks=[forgetting]", "eval.limit=5"]
    data["grid"] = {"method": ["lora"], "training.seed": [1, 2]}
    spec.write_text(yaml.safe_dump(data))
    use_train(fake_train([]))
    summary = run_compare(spec, say=lambda m: None)
    assert seen == [("run", ["forgetting"], 5)] * 2
    result = json.loads((tmp_path / "out" / "cells" / "method=lora,training.seed=1" / "result.json").read_text())
    assert result["forgetting"] == 0.25 and result["metrics"]["eval"]["forgetting"]["cross_entropy"] == 3.0
    assert summary["lower_is_better"] == ["forgetting"]
    assert "forgetting ↓" in (tmp_path / "out" / "summary.md").read_text()

    data["overrides"][-2] = "eval.tasks=[gsm9k]"
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"eval.tasks: unknown task\(s\) \['gsm9k'\]"):
        run_compare(spec, say=lambda m: None)


def test_variants_are_one_grid_axis_applied_before_the_grid(tmp_path, tiny_assets):
    spec = write_spec(tmp_path, tiny_assets, variants={"all": {}, "cr-only": {"balora.lambda_diversity": 0,
                                                                              "balora.lambda_svd": 0}})
    cells = run_compare(spec, dry_run=True, say=lambda m: None)["cells"]
    ids = [c["cell_id"] for c in cells]
    assert len(ids) == 8 and ids[0] == "variant=all,method=lora,training.seed=1"
    assert ids[-1] == "variant=cr-only,method=ba-lora,training.seed=2"
    from balora.experiments.compare import build_cells

    built = {c.id: c for c in build_cells(load_spec(spec))}
    cr = built["variant=cr-only,method=ba-lora,training.seed=1"].config
    assert (cr.balora.lambda_consistency, cr.balora.lambda_diversity, cr.balora.lambda_svd) == (0.15, 0, 0)
    assert built["variant=all,method=ba-lora,training.seed=1"].config.balora == BALoraConfig(task="nlu")
    assert built["variant=cr-only,method=ba-lora,training.seed=1"].group == "variant=cr-only, method=ba-lora"


def test_variant_errors_name_the_variant(tmp_path, tiny_assets):
    spec = write_spec(tmp_path, tiny_assets, variants={"bad": {"balora.lambda9": 1}})
    with pytest.raises(ConfigError, match=r"spec.yaml: variants.bad: .*lambda9"):
        run_compare(spec, dry_run=True, say=lambda m: None)
    spec = write_spec(tmp_path, tiny_assets, variants={"bad": [1]})
    with pytest.raises(ConfigError, match=r"variants.bad: expected a mapping"):
        load_spec(spec)


def test_shards_split_the_grid_without_overlap(tmp_path, tiny_assets, use_train):
    spec = write_spec(tmp_path, tiny_assets)
    first, second = [], []
    use_train(fake_train(first))
    run_compare(spec, shard=(1, 2), say=lambda m: None)
    use_train(fake_train(second))
    summary = run_compare(spec, shard=(2, 2), say=lambda m: None)
    assert sorted(c for c, _ in first + second) == sorted({c for c, _ in first + second})
    assert len(first) == len(second) == 2
    assert summary["cells"]["ok"] == 4
    from balora.cli.compare import _parse_shard

    assert _parse_shard("2/3") == (2, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="1 <= I <= N"):
        _parse_shard("3/2")


def test_a_cell_claimed_by_a_live_process_is_skipped_and_a_stale_claim_is_taken_over(tmp_path, tiny_assets,
                                                                                       use_train):
    import subprocess

    spec = write_spec(tmp_path, tiny_assets)
    cells = run_compare(spec, dry_run=True, say=lambda m: None)["cells"]
    out = tmp_path / "out" / "cells"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / cells[0]["cell_id"]).mkdir(parents=True)
        (out / cells[0]["cell_id"] / "running.pid").write_text(str(sleeper.pid))
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (out / cells[1]["cell_id"]).mkdir(parents=True)
        (out / cells[1]["cell_id"] / "running.pid").write_text(str(dead.pid))
        calls, said = [], []
        use_train(fake_train(calls))
        summary = run_compare(spec, say=said.append)
    finally:
        sleeper.kill()
    assert sorted(c for c, _ in calls) == sorted(c["cell_id"] for c in cells[1:])
    assert any(f"being run by process {sleeper.pid}" in m for m in said)
    assert summary["cells"]["ok"] == 3 and summary["cells"]["pending"] == 1
    assert not list(out.glob("*/running.pid"))[1:]  # only the live process's claim is left


def test_training_curves_average_the_seeds_and_include_the_validation_loss(tmp_path):
    """curves.png's data: per key the mean over the seeds that logged it at each step; the validation loss
    (eval_loss, logged at eval_steps) is a panel of its own, so a reader sees whether the budget sufficed."""
    from balora.experiments.plots import mean_curves, plot_training_curves

    seed1 = [{"step": 10, "task_loss": 0.7}, {"step": 20, "task_loss": 0.5}, {"step": 20, "eval_loss": 0.6}]
    seed2 = [{"step": 10, "task_loss": 0.5}, {"step": 20, "task_loss": 0.3}, {"step": 20, "eval_loss": 0.4},
             {"step": 10, "balora/consistency": 0.1}]
    curves = mean_curves([seed1, seed2])
    assert curves["task_loss"] == ([10, 20], [pytest.approx(0.6), pytest.approx(0.4)])
    assert curves["eval_loss"] == ([20], [pytest.approx(0.5)])
    assert curves["balora/consistency"] == ([10], [pytest.approx(0.1)])
    assert "balora/svd" not in curves
    assert plot_training_curves({"method=pissa": curves}, tmp_path / "curves.png").is_file()
