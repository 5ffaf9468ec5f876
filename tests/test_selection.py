"""Model selection in `balora compare`: each method's settings chosen on the validation split, the
test split untouched until the final cells, then the grid run with the choice."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_compare import tiny_assets  # noqa: F401 (a fixture)

from balora.core.config import ConfigError
from balora.experiments.compare import load_spec, run_compare
from balora.experiments.selection import search_cells
from balora.training import run as run_module
from balora.training.run_config import dump_run_config

SEARCH = {"all": {"training.learning_rate": [1e-3, 1e-2]}, "ba-lora": {"training.learning_rate": [1e-3, 3e-3, 1e-2]}}


def write_spec(tmp_path: Path, assets: Path, selection: dict | None = None, **extra) -> Path:
    base = {"method": "lora", "model": {"name": str(assets / "tiny-bert"), "task": "nlu"}, "adapter": {"r": 2},
            "data": {"source": str(assets / "data.jsonl"), "test_fraction": 0.25, "validation_fraction": 0.25,
                     "max_length": 12},
            "training": {"max_steps": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-2,
                         "logging_steps": 1, "save_strategy": "no", "use_cpu": True}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "sel", "base": "base.yaml", "output_dir": str(tmp_path / "out"),
            "grid": {"method": ["lora", "ba-lora"], "training.seed": [1, 2]}, "metrics": ["test.accuracy"],
            "selection": selection if selection is not None else {"metric": "validation.accuracy", "search": SEARCH},
            **extra}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# validation accuracy the fake trainer reports, by (method, learning rate)
VALIDATION = {("lora", 1e-3): 0.6, ("lora", 1e-2): 0.8,
              ("ba-lora", 1e-3): 0.7, ("ba-lora", 3e-3): 0.9, ("ba-lora", 1e-2): 0.9}


def fake_train(calls: list):
    def train(cfg, *, resume=False, show_progress=True, callbacks=()):
        run = Path(cfg.output_dir)
        calls.append((str(run), cfg.method, cfg.training["learning_rate"], cfg.eval.test, cfg.eval.validation))
        run.mkdir(parents=True, exist_ok=True)
        dump_run_config(cfg, run / "config.yaml")
        metrics = {"method": cfg.method, "global_step": 2, "train_seconds": 1.0, "data": {"train": 20}}
        if cfg.eval.validation:
            metrics["validation"] = {"accuracy": VALIDATION[(cfg.method, cfg.training["learning_rate"])]}
        if cfg.eval.test:
            metrics["test"] = {"accuracy": 0.5 + cfg.training["learning_rate"]}
        (run / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    return train


def test_each_method_gets_its_best_setting_then_every_seed_runs_with_it(tmp_path, tiny_assets, monkeypatch):  # noqa: F811
    calls: list = []
    monkeypatch.setattr(run_module, "train_run", fake_train(calls))
    spec = write_spec(tmp_path, tiny_assets)
    summary = run_compare(spec, show_progress=False, say=lambda m: None)
    search = [c for c in calls if "/selection/" in c[0]]
    final = [c for c in calls if "/selection/" not in c[0]]
    # search first (2 lora + 3 ba-lora candidates on the first grid seed), validation only
    assert len(search) == 5 and calls[:5] == search
    assert all(test is False and validation is True for *_, test, validation in search)
    # the choice: lora 1e-2 (0.8 > 0.6); ba-lora 3e-3 (ties with 1e-2 at 0.9: the first listed wins)
    assert sorted((m, lr) for _, m, lr, *_ in final) == [("ba-lora", 3e-3)] * 2 + [("lora", 1e-2)] * 2
    assert all(test is True for *_, test, _ in final)
    assert summary["selection"]["choices"] == {"method=lora": {"training.learning_rate": 1e-2},
                                               "method=ba-lora": {"training.learning_rate": 3e-3}}
    out = tmp_path / "out"
    assert json.loads((out / "selection" / "selection.json").read_text())["choices"] == summary["selection"]["choices"]
    md = (out / "summary.md").read_text()
    assert "## Model selection (validation.accuracy on the validation split" in md
    assert "| method=ba-lora | training.learning_rate=0.003 | **0.9000** | 1 | yes |" in md
    assert (out / "plots" / "selection.png").read_bytes()[:4] == b"\x89PNG"
    # the final cells' ids are the grid's; their configs carry the chosen value
    cells = {p.parent.name: json.loads(p.read_text()) for p in out.glob("cells/*/result.json")}
    assert cells["method=ba-lora,training.seed=2"]["config"]["training"]["learning_rate"] == 3e-3
    # a second run redoes nothing and rebuilds the same choice
    calls.clear()
    assert run_compare(spec, show_progress=False, say=lambda m: None)["selection"]["choices"] == \
        summary["selection"]["choices"]
    assert calls == []


def test_the_test_split_is_never_read_before_selection_ends(tmp_path, tiny_assets, monkeypatch):  # noqa: F811
    """Real tiny runs: every evaluation of a search cell is of its validation split; the first test-split
    evaluation comes after the last search cell."""
    events: list[tuple[str, str]] = []
    splits: dict[str, dict[int, str]] = {}
    real_prepare, real_evaluate = run_module.prepare_data, run_module.evaluate_split

    def prepare(cfg, tokenizer):
        data = real_prepare(cfg, tokenizer)
        splits[cfg.output_dir] = {id(data.test): "test", id(data.validation): "validation"}
        events.append((cfg.output_dir, "prepared"))
        return data

    current: list[str] = []

    def evaluate(trainer, dataset, *args, **kwargs):
        run_dir = current[-1]
        events.append((run_dir, splits[run_dir][id(dataset)]))
        return real_evaluate(trainer, dataset, *args, **kwargs)

    real_train = run_module.train_run

    def train(cfg, **kwargs):
        current.append(cfg.output_dir)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(run_module, "prepare_data", prepare)
    monkeypatch.setattr(run_module, "evaluate_split", evaluate)
    monkeypatch.setattr(run_module, "train_run", train)
    spec = write_spec(tmp_path, tiny_assets, selection={"metric": "validation.accuracy",
                                                         "search": {"all": {"training.learning_rate": [1e-3, 1e-2]}}},
                      grid={"method": ["lora"], "training.seed": [1, 2]})
    summary = run_compare(spec, show_progress=False, say=lambda m: None)
    assert summary["cells"]["ok"] == 2
    search_events = [(d, what) for d, what in events if "/selection/" in d and what != "prepared"]
    assert [what for _, what in search_events] == ["validation", "validation"]
    last_search = max(i for i, (d, _) in enumerate(events) if "/selection/" in d)
    first_test = min(i for i, (_, what) in enumerate(events) if what == "test")
    assert first_test > last_search
    for d in {d for d, _ in search_events}:
        metrics = json.loads((Path(d) / "metrics.json").read_text())
        assert "test" not in metrics and "untuned" not in metrics and 0 <= metrics["validation"]["accuracy"] <= 1


def test_shards_share_the_search_and_agree_on_the_choice(tmp_path, tiny_assets, monkeypatch):  # noqa: F811
    calls: list = []
    monkeypatch.setattr(run_module, "train_run", fake_train(calls))
    spec = write_spec(tmp_path, tiny_assets)
    first = run_compare(spec, shard=(1, 2), show_progress=False, say=lambda m: None)
    second = run_compare(spec, shard=(2, 2), show_progress=False, say=lambda m: None)
    assert first["selection"]["choices"] == second["selection"]["choices"]
    runs = [c[0] for c in calls]
    assert len(runs) == len(set(runs)) == 5 + 4  # every search and grid cell once
    assert second["cells"]["ok"] == 4


def test_only_summary_refuses_an_unfinished_selection(tmp_path, tiny_assets):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model selection is not complete \(0 of 5 search cells finished\)"):
        run_compare(write_spec(tmp_path, tiny_assets), only_summary=True, say=lambda m: None)


def test_dry_run_lists_the_search_and_waits_with_the_grid(tmp_path, tiny_assets):  # noqa: F811
    messages: list[str] = []
    cells = run_compare(write_spec(tmp_path, tiny_assets), dry_run=True, say=messages.append)["cells"]
    assert len(cells) == 5 and all(c["state"] == "pending" for c in cells)
    assert "sel: 5 model-selection cells" in messages[0]
    assert any("built once the selection is complete" in m for m in messages)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("selection,message", [
    ({"metric": "test.accuracy", "search": SEARCH}, r"selection.metric: 'test.accuracy': selection reads the "
                                                    r"validation split only"),
    ({"search": SEARCH}, r"selection.metric: required"),
    ({"metric": "validation.accuracy", "search": {"all": {"method": ["lora"]}}}, r"selection.search.all.method: "
                                                                                 r"is a grid key"),
    ({"metric": "validation.accuracy", "search": {"all": {"training.learning_rate": []}}},
     r"selection.search.all.training.learning_rate: expected a non-empty list"),
    ({"metric": "validation.accuracy", "search": {"all": {"eval.test": [True]}}}, r"not searchable"),
    ({"metric": "validation.accuracy", "search": SEARCH, "seed": [1]}, r"selection.seed: unknown key"),
])
def test_selection_spec_errors_name_the_key(tmp_path, tiny_assets, selection, message):  # noqa: F811
    with pytest.raises(ConfigError, match=message):
        load_spec(write_spec(tmp_path, tiny_assets, selection=selection))


def test_a_search_value_is_checked_before_anything_runs(tmp_path, tiny_assets):  # noqa: F811
    spec = load_spec(write_spec(tmp_path, tiny_assets, selection={
        "metric": "validation.accuracy", "search": {"all": {"adapter.r": [2, -1]}}}))
    with pytest.raises(ConfigError, match=r"selection cell .*adapter.r=-1.*adapter.r: must be an integer >= 1"):
        search_cells(spec)


# ---------------------------------------------------------------- per_method
def test_per_method_options_reach_that_methods_cells_only(tmp_path, tiny_assets):  # noqa: F811
    """per_method: each method's own setting (e.g. the rate selected in another comparison), applied after
    the grid values; the other methods keep the base's."""
    from balora.experiments.grid import build_cells

    path = write_spec(tmp_path, tiny_assets, per_method={"ba-lora": {"training.learning_rate": 3e-3, "adapter.r": 4}})
    data = yaml.safe_load(path.read_text())
    del data["selection"]
    path.write_text(yaml.safe_dump(data))
    spec = load_spec(path)
    cells = build_cells(spec)
    assert {(c.config.method, c.config.training["learning_rate"], c.config.adapter.r) for c in cells} == \
        {("lora", 1e-2, 2), ("ba-lora", 3e-3, 4)}
    assert spec.to_dict()["per_method"] == {"ba-lora": {"training.learning_rate": 3e-3, "adapter.r": 4}}


def test_per_method_and_the_search_of_selection_combine(tmp_path, tiny_assets):  # noqa: F811
    from balora.experiments.grid import resolve_cell

    spec = load_spec(write_spec(tmp_path, tiny_assets, per_method={"lora": {"adapter.r": 4}}))
    searched = search_cells(spec)
    assert searched and all(c.config.adapter.r == (4 if c.config.method == "lora" else 2) for c in searched)
    cfg = resolve_cell(spec, {**spec.base, "method": "lora"}, {"method": "lora"}, tmp_path / "c")
    assert cfg.adapter.r == 4


@pytest.mark.parametrize(("per_method", "message"), [
    ({"ba-lora": {"training.learning_rate": 3e-3}}, "per_method.ba-lora.training.learning_rate: also searched"),
    ({"lora": {"training.learning_rate": 3e-3}}, "per_method.lora.training.learning_rate: also searched"),  # via all
    ({"dora": {"adapter.r": 4}}, "per_method.dora: no cell trains method 'dora'"),
    ({"lora": {"method": "pissa"}}, "per_method.lora.method: not allowed"),
    ({"lora": {}}, "per_method.lora: expected a mapping"),
])
def test_per_method_errors_name_the_key(tmp_path, tiny_assets, per_method, message):  # noqa: F811
    from balora.experiments.grid import build_cells

    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build_cells(load_spec(write_spec(tmp_path, tiny_assets, per_method=per_method)))


def _adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _checkpointed_spec(tmp_path: Path, assets: Path, selection_seed: int) -> Path:
    """One candidate, so the choice is known; checkpoints and validation losses as the real specs keep them."""
    spec = write_spec(tmp_path, assets, selection={"metric": "validation.accuracy", "seeds": [selection_seed],
                                                   "search": {"all": {"training.learning_rate": [1e-2]}}},
                      grid={"method": ["ba-lora"], "training.seed": [1, 2]})
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"].update(save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    return spec


def test_a_final_cell_starts_from_the_search_cell_that_trained_it(tmp_path, tiny_assets):  # noqa: F811
    """Real tiny runs: the selection seed's final cell evaluates the search cell's final checkpoint instead
    of training again, and gets the adapter a fresh training of the same configuration gets."""
    adopted, fresh = tmp_path / "adopted", tmp_path / "fresh"
    adopted.mkdir(), fresh.mkdir()
    messages: list[str] = []
    first = run_compare(_checkpointed_spec(adopted, tiny_assets, 1), show_progress=False, say=messages.append)
    second = run_compare(_checkpointed_spec(fresh, tiny_assets, 2), show_progress=False, say=lambda m: None)
    assert first["cells"]["ok"] == second["cells"]["ok"] == 2
    search_id = "method=ba-lora,training.learning_rate=0.01,training.seed=1"
    cells = {seed: adopted / "out" / "cells" / f"method=ba-lora,training.seed={seed}" for seed in (1, 2)}
    result = json.loads((cells[1] / "result.json").read_text())
    assert result["trained_in"] == f"selection/cells/{search_id}"
    assert any(f"selection/cells/{search_id} trained this configuration: starting from its checkpoint-2" in m
               for m in messages)
    assert json.loads((cells[2] / "result.json").read_text())["trained_in"] is None  # not a selection seed
    search_run = adopted / "out" / "selection" / "cells" / search_id / "run"
    search_metrics = json.loads((search_run / "metrics.json").read_text())
    metrics = json.loads((cells[1] / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and metrics["train_seconds"] == search_metrics["train_seconds"]
    assert "test" in metrics and "test" not in search_metrics
    history = json.loads((cells[1] / "run" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [1, 2]  # the search's curve comes along
    # the same model as training it again: the other comparison trained seed 1 in its final cell
    fresh_cell = fresh / "out" / "cells" / "method=ba-lora,training.seed=1"
    assert json.loads((fresh_cell / "result.json").read_text())["trained_in"] is None
    for name, tensor in _adapter_tensors(fresh_cell / "run").items():
        assert torch.equal(tensor, _adapter_tensors(cells[1] / "run")[name]), name
    assert metrics["test"] == json.loads((fresh_cell / "run" / "metrics.json").read_text())["test"]
    # the selection's compute is reported beside the final cells'
    assert first["selection"]["compute_seconds"] > 0
    assert "for the model selection." in (adopted / "out" / "summary.md").read_text()


def test_a_run_that_trained_differently_is_not_adopted(tmp_path, tiny_assets):  # noqa: F811
    import dataclasses

    from balora.experiments.grid import build_cells
    from balora.experiments.reuse import adopt_training

    spec_path = _checkpointed_spec(tmp_path, tiny_assets, 1)
    run_compare(spec_path, show_progress=False, say=lambda m: None)
    spec = load_spec(spec_path)
    search = next(c for c in search_cells(spec))
    cell = build_cells(spec)[0]
    longer = dataclasses.replace(cell, dir=tmp_path / "other", trained_by=(search.run_dir,),
                                 config=dataclasses.replace(cell.config, training={**cell.config.training,
                                                                                  "max_steps": 3}))
    messages: list[str] = []
    assert adopt_training(longer, messages.append) is False
    assert "another configuration (training.max_steps: 2 -> 3)" in messages[0]
    assert not (tmp_path / "other").exists()
    same = dataclasses.replace(cell, dir=tmp_path / "same", trained_by=(longer.run_dir, search.run_dir),
                               config=dataclasses.replace(cell.config, output_dir=str(tmp_path / "same" / "run")))
    assert adopt_training(same, messages.append) is True  # the first candidate that qualifies
    assert (tmp_path / "same" / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file()


def test_reuse_adopts_the_runs_of_another_comparison(tmp_path, tiny_assets):  # noqa: F811
    """A spec's `reuse:` names another comparison's output_dir: its cells with this cell's exact training
    (here the same method and seed, the other's lr being this one's) are adopted; the others train."""
    first = _checkpointed_spec(tmp_path, tiny_assets, 1)
    run_compare(first, show_progress=False, say=lambda m: None)
    other = tmp_path / "other"
    other.mkdir()
    data = yaml.safe_load(first.read_text())
    data.pop("selection")
    data.update(output_dir=str(other / "out"), reuse=[str(tmp_path / "out")],
                grid={"method": ["ba-lora", "lora"], "training.seed": [1]})
    (other / "spec.yaml").write_text(yaml.safe_dump(data))
    (other / "base.yaml").write_text((tmp_path / "base.yaml").read_text())  # lr 1e-2: the first's choice
    messages: list[str] = []
    summary = run_compare(other / "spec.yaml", show_progress=False, say=messages.append)
    assert summary["cells"]["ok"] == 2 and summary["spec"]["reuse"] == [str(tmp_path / "out")]
    results = {p.parent.name: json.loads(p.read_text()) for p in (other / "out").glob("cells/*/result.json")}
    source = "method=ba-lora,training.seed=1"
    assert results[source]["trained_in"] == f"../../out/cells/{source}"
    assert results["method=lora,training.seed=1"]["trained_in"] is None  # the other comparison has no lora
    for name, tensor in _adapter_tensors(tmp_path / "out" / "cells" / source / "run").items():
        assert torch.equal(tensor, _adapter_tensors(other / "out" / "cells" / source / "run")[name]), name
    data["reuse"] = [str(tmp_path / "nowhere")]
    (other / "spec.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"reuse\[0\]: .*nowhere: not the output_dir of a comparison"):
        load_spec(other / "spec.yaml")
