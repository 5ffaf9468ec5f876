"""balora.training.data: loading, prompt masking, truncation, classification labels, seeded splits.

The default tests build a tiny word-level tokenizer in code; the ``assets`` tests use the
fetched data sets and the SmolLM2 tokenizer and skip when those are absent.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch

from balora.training import data as D
from balora.training.data import (
    ClassificationDataConfig,
    DataError,
    InstructionCollator,
    InstructionDataConfig,
    build_classification_dataset,
    build_instruction_dataset,
    load_records,
    split_records,
)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CORPUS = [D.ALPACA_PROMPT.format(query="what is two plus two"),
          "the answer is 4 . hello world a b c d e f g h passage question text pair yes no"]


def make_tokenizer(chat_template: str = CHAT, bos: bool = True):
    """Word-level tokenizer trained in code; adds <s> in front like Llama when ``bos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=specials))
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


QA = [{"query": "what is two plus two", "response": "the answer is 4"},
      {"query": "hello", "response": "world a b c"}]


# ---------------------------------------------------------------- prompt masking

@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
def test_labels_mask_exactly_the_prompt(tok, template):
    cfg = InstructionDataConfig(template=template)
    feats, stats = build_instruction_dataset(QA, tok, cfg)
    assert stats["examples"] == 2 and stats["truncated"] == stats["dropped"] == 0
    for rec, f in zip(QA, feats):
        resp = tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if template == "chat":  # the turn's closing tokens belong to the response too
            resp = tok(f" {rec['response']} <|end|> ", add_special_tokens=False)["input_ids"] \
                + [tok.eos_token_id]
        n_prompt = len(f["input_ids"]) - len(resp)
        assert f["input_ids"][n_prompt:] == resp  # response then EOS at the end
        assert f["labels"][:n_prompt] == [-100] * n_prompt
        assert f["labels"][n_prompt:] == resp
        assert f["attention_mask"] == [1] * len(f["input_ids"])
        if template == "chat":
            prompt = tok.apply_chat_template([{"role": "user", "content": rec["query"]}],
                                             tokenize=False, add_generation_prompt=True)
        else:
            prompt = (D.ALPACA_PROMPT.format(query=rec["query"]) if template == "alpaca"
                      else rec["query"] + "\n")
            assert f["input_ids"][0] == tok.bos_token_id  # the tokenizer's own BOS is kept
        assert tok.decode(f["input_ids"][:n_prompt], skip_special_tokens=True).split() == \
            tok.decode(tok(prompt)["input_ids"], skip_special_tokens=True).split()
    assert stats["prompt_tokens"] + stats["response_tokens"] == sum(
        len(f["input_ids"]) for f in feats)


def test_alpaca_prompt_is_the_papers_and_context_is_prepended(tok):
    cfg = InstructionDataConfig(template="alpaca", context_field="passage")
    rows = [{"passage": "a b", "query": "c", "response": "d"}]
    (f,), _ = build_instruction_dataset(rows, tok, cfg)
    n = f["labels"].count(-100)
    expected = tok(D.ALPACA_PROMPT.format(query="a b\nc"))["input_ids"]
    assert f["input_ids"][:n] == expected
    assert D.ALPACA_PROMPT.startswith("Below is an instruction that describes a task.")
    assert D.ALPACA_PROMPT.endswith("### Instruction:\n{query}\n\n### Response:\n")


def test_chat_template_ending_in_eos_gets_no_second_eos():
    tok = make_tokenizer(CHAT.replace("<|end|> {% endfor", "</s>\n{% endfor"))
    (f,), _ = build_instruction_dataset(QA[:1], tok, InstructionDataConfig(template="chat"))
    assert f["input_ids"][-1] == tok.eos_token_id
    labels = [t for t in f["labels"] if t != -100]
    assert labels.count(tok.eos_token_id) == 1  # the turn's EOS, no second one (the "\n" cut)
    assert tok.decode(labels) == "the answer is 4 </s>"


def test_chat_template_that_rewrites_the_prompt_is_refused():
    bad = CHAT.replace("{% if add_generation_prompt %}<|assistant|> ",
                       "{% if add_generation_prompt %}<|assistant|> hello ")
    with pytest.raises(DataError, match=r"<records>: record 1: the chat template renders the "
                                        r"prompt .* differently"):
        build_instruction_dataset(QA[:1], make_tokenizer(bad),
                                  InstructionDataConfig(template="chat"))


def test_chat_needs_a_chat_template():
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        build_instruction_dataset(QA, make_tokenizer(chat_template=None),
                                  InstructionDataConfig(template="chat"))


def test_collator_pads_right_with_ignore_labels(tok):
    feats, _ = build_instruction_dataset(QA, tok, InstructionDataConfig(template="plain"))
    batch = InstructionCollator(tok, pad_to_multiple_of=8)(feats)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape[1] % 8 == 0
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["labels"][i, :n].tolist() == f["labels"]
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (len(batch["labels"][i]) - n)
        assert (batch["labels"][i, n:] == -100).all()


def test_collator_uses_eos_when_there_is_no_pad_token():
    tok = make_tokenizer()
    tok.pad_token = None
    assert InstructionCollator(tok).pad_id == tok.eos_token_id


# ---------------------------------------------------------------- truncation

def test_truncation_cuts_the_response_and_is_counted_and_logged(tok, caplog):
    rows = [{"query": "hello", "response": "a b c d e f g h"},
            {"query": "hello", "response": "a"},
            {"query": " ".join(["hello"] * 20), "response": "a"}]
    p_len = len(tok("hello\n")["input_ids"])
    cfg = InstructionDataConfig(template="plain", max_length=p_len + 4)
    with caplog.at_level(logging.WARNING, logger="balora.training.data"):
        feats, stats = build_instruction_dataset(rows, tok, cfg, source_name="toy.jsonl")
    assert stats == {"records": 3, "examples": 2, "truncated": 1, "dropped": 1,
                     "prompt_tokens": 2 * p_len, "response_tokens": 4 + 2,
                     "max_tokens": p_len + 4}
    cut = feats[0]
    assert len(cut["input_ids"]) == cfg.max_length
    assert tok.eos_token_id not in cut["input_ids"]  # a cut answer does not end with EOS
    assert cut["labels"][p_len:] == tok("a b c d", add_special_tokens=False)["input_ids"]
    assert feats[1]["input_ids"][-1] == tok.eos_token_id
    msgs = [r.getMessage() for r in caplog.records]
    assert f"toy.jsonl: 1 of 3 examples truncated to max_length={cfg.max_length} (response end cut)" in msgs
    assert any("1 of 3 examples dropped" in m for m in msgs)


def test_no_warning_without_truncation(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="balora.training.data"):
        build_instruction_dataset(QA, tok, InstructionDataConfig())
    assert not caplog.records


def test_config_validation():
    with pytest.raises(DataError, match="data.template"):
        InstructionDataConfig(template="vicuna")
    with pytest.raises(DataError, match="data.max_length"):
        InstructionDataConfig(max_length=1)


# ---------------------------------------------------------------- loading and errors

def test_malformed_jsonl_line_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(
        '{"query": "a", "response": "b"}\n\n{"query": "a" "response": "b"}\n')
    with pytest.raises(DataError) as e:
        load_records("data.jsonl")
    assert str(e.value) == ("data.jsonl:3: invalid JSON (Expecting ',' delimiter: "
                            "line 1 column 15)")
    (tmp_path / "list.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"^list.jsonl:2: expected a JSON object, got list$"):
        load_records("list.jsonl")


def test_missing_field_names_field_line_and_setting(tmp_path, monkeypatch, tok):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(
        '{"query": "a", "response": "b"}\n\n{"query": "c", "answer": "d"}\n')
    records = load_records("data.jsonl")
    assert records.lines == [1, 3]
    with pytest.raises(DataError) as e:
        build_instruction_dataset(records, tok, InstructionDataConfig())
    assert str(e.value) == ("data.jsonl:3: missing field 'response' (fields present: query, "
                            "answer); set data.response_field")


def test_empty_files_are_an_error(tmp_path):
    for name, text in [("a.jsonl", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]"),
                       ("d.csv", "query,response\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=r"no records \(the file is empty\)$"):
            load_records(str(tmp_path / name))


def test_csv_missing_column_and_ragged_row(tmp_path, tok):
    path = tmp_path / "data.csv"
    path.write_text('query,answer\n"multi\nline",x\n')
    records = load_records(str(path))
    assert list(records) == [{"query": "multi\nline", "answer": "x"}]
    with pytest.raises(DataError) as e:
        build_instruction_dataset(records, tok, InstructionDataConfig())
    assert str(e.value) == (f"{path}:2: missing field 'response' (fields present: query, "
                            "answer); set data.response_field")
    path.write_text("query,response\na,b\nc\n")
    with pytest.raises(DataError, match=r"data.csv:3: 1 values but the header has 2 columns"):
        load_records(str(path))


def test_parquet_json_and_fmt_round_trip(tmp_path):
    import pandas as pd

    rows = [{"query": "q1", "response": "r1", "n": 1}, {"query": "q2", "response": "r2", "n": 2}]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert list(load_records(str(tmp_path / "d.parquet"))) == rows
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    assert list(load_records(str(tmp_path / "d.json"))) == rows
    (tmp_path / "d.txt").write_text(json.dumps(rows))
    assert list(load_records(str(tmp_path / "d.txt"), fmt="json")) == rows
    with pytest.raises(DataError, match=r"d.txt: unknown data format '.txt'; data.source must be a .jsonl"):
        load_records(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match=r"d.txt: cannot read Parquet"):
        load_records(str(tmp_path / "d.txt"), fmt="parquet")
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_directory_splits_and_load_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"x": i} for i in range(20)])
    write_jsonl(tmp_path / "dev.jsonl", [{"x": 100 + i} for i in range(5)])
    assert [r["x"] for r in load_records(str(tmp_path))] == list(range(20))
    assert len(load_records(str(tmp_path), split="validation")) == 5
    with pytest.raises(DataError, match="no file for split 'test'.*found: train, validation"):
        load_records(str(tmp_path), split="test")
    # dev becomes the test set (GLUE-style), validation is carved from train
    parts = D.load_splits(str(tmp_path), seed=0, validation_fraction=0.1)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [18, 2, 5]
    assert {r["x"] for r in parts["test"]} == set(range(100, 105))
    write_jsonl(tmp_path / "test.jsonl", [{"x": 200}])
    parts = D.load_splits(str(tmp_path), seed=0)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [20, 5, 1]


def test_hub_ids_go_to_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"text": f"{split} {i}", "label": i % 2}
                                           for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda n: ["train", "test"])
    recs = load_records("someone/toy")
    assert calls == [("someone/toy", "train")] and len(recs) == 10
    assert recs.where(2) == "someone/toy[train]: record 3"
    parts = D.load_splits("someone/toy", seed=1)
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [9, 1, 10]

    def failing(name, split=None):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="not a local file or directory.*hub unreachable"):
        load_records("someone/toy")


# ---------------------------------------------------------------- classification

def test_classification_label_map_from_training_labels(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "rotten"},
                                                   {"text": "b", "label": "fresh"}])
    feats, label_map = build_classification_dataset(load_records(str(train)), tok,
                                                    ClassificationDataConfig())
    assert label_map == {"fresh": 0, "rotten": 1}
    assert [f["labels"] for f in feats] == [1, 0]
    ev = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "fresh"},
                                               {"text": "b", "label": "meh"}])
    with pytest.raises(DataError) as e:
        build_classification_dataset(load_records(str(ev)), tok, ClassificationDataConfig(),
                                     label_map)
    assert str(e.value) == (f"{ev}:2: unknown label 'meh' (known: fresh, rotten); the classes are "
                            "the labels of the training split (field 'label', data.label_field)")
    _, fixed = build_classification_dataset(load_records(str(train)), tok,
                                            ClassificationDataConfig(labels=["rotten", "fresh"]))
    assert fixed == {"rotten": 0, "fresh": 1}


def test_classification_text_pair_regression_truncation_and_collator(tok, caplog):
    rows = [{"passage": "a b c", "question": "d", "label": 0.5},
            {"passage": " ".join("abcdefgh"), "question": "e f", "label": 1.0}]
    cfg = ClassificationDataConfig(text_field="passage", text_pair_field="question",
                                   max_length=6)
    with caplog.at_level(logging.WARNING, logger="balora.training.data"):
        feats, label_map = build_classification_dataset(rows, tok, cfg)
    assert label_map is None and [f["labels"] for f in feats] == [0.5, 1.0]  # regression
    assert feats[0]["input_ids"] == tok("a b c", "d")["input_ids"]  # the pair is encoded
    assert len(feats[1]["input_ids"]) == 6
    assert any("1 of 2 texts truncated to max_length=6" in r.getMessage() for r in caplog.records)
    batch = D.classification_collator(tok)(feats)
    assert batch["input_ids"].shape == (2, 6) and batch["labels"].dtype == torch.float32
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0]
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 0}]
    ints, m = build_classification_dataset(rows, tok, ClassificationDataConfig())
    assert m == {0: 0, 1: 1} and [f["labels"] for f in ints] == [1, 0]
    rows.append({"text": "c", "label": 0.5})  # one float among ints: regression, not 3 classes
    feats, m = build_classification_dataset(rows, tok, ClassificationDataConfig())
    assert m is None and [f["labels"] for f in feats] == [1.0, 0.0, 0.5]


# ---------------------------------------------------------------- splits

def test_seeded_split_is_deterministic_disjoint_and_sized():
    recs = [{"i": i} for i in range(100)]
    a = split_records(recs, seed=7, test_fraction=0.2, validation_fraction=0.1)
    b = split_records(recs, seed=7, test_fraction=0.2, validation_fraction=0.1)
    c = split_records(recs, seed=8, test_fraction=0.2, validation_fraction=0.1)
    assert a == b and a["test"] != c["test"]
    assert [len(a[k]) for k in ("train", "validation", "test")] == [70, 10, 20]
    ids = [r["i"] for k in a for r in a[k]]
    assert sorted(ids) == list(range(100))  # disjoint and complete
    state = random.getstate()
    split_records(recs, seed=7, test_fraction=0.2)
    assert random.getstate() == state  # the global RNG is untouched
    with pytest.raises(DataError):
        split_records(recs, seed=0, test_fraction=0.6, validation_fraction=0.5)


def test_split_keeps_file_positions_for_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"x": i} for i in range(10)])
    parts = split_records(load_records(str(path)), seed=0, test_fraction=0.3)
    rec = parts["test"][0]
    assert parts["test"].where(0) == f"{path}:{rec['x'] + 1}"
    tail = parts["train"][-2:]  # slicing (train_limit) keeps positions too
    assert tail.where(1) == f"{path}:{tail[1]['x'] + 1}"


def test_asdiv_like_duplicates_never_straddle(tmp_path):
    rows = []
    for i in range(60):
        rows.append({"passage": f"Tom has {i} apples.", "question": "How many apples?",
                     "answer": f"{i} apples"})
        if i % 5 == 0:  # same problem again, case and spacing changed
            rows.append({"passage": f"tom  has {i} apples", "question": "how many apples ?",
                         "answer": f"{i} apples"})
    path = write_jsonl(tmp_path / "asdiv.jsonl", rows)
    key = D.asdiv_key
    for seed in range(5):
        grouped = split_records(rows, seed=seed, test_fraction=0.3, group_key=key)
        assert not {key(r) for r in grouped["train"]} & {key(r) for r in grouped["test"]}
        parts = D.asdiv_splits(seed=seed, test_size=20, source=str(path))
        assert len(parts["test"]) == 20 and len(parts["train"]) == 40  # 12 duplicates dropped
        assert not {key(r) for r in parts["train"]} & {key(r) for r in parts["test"]}
    sft = D.asdiv_instruction_records(parts["test"])
    assert sft[0]["response"] == f"The answer is: {parts['test'][0]['answer']}"
    assert sft[0]["query"] == f"{parts['test'][0]['passage']} {parts['test'][0]['question']}"


def test_dataset_registry_lists_every_dataset_and_refuses_unknown_names():
    assert {"asdiv", "boolq", "rotten-tomatoes"} <= set(D.DATASET_SPLITS)
    with pytest.raises(DataError) as e:
        D.dataset_splits("foo", seed=1)
    assert str(e.value).startswith("unknown dataset 'foo'; known: ")
    assert all(name in str(e.value) for name in D.DATASET_SPLITS)
    with pytest.raises(ValueError, match="already registered"):
        D.register_splits("asdiv")(lambda seed=D.SPLIT_SEED: {})


def test_dataset_registry_asdiv_gives_instruction_records(tmp_path):
    rows = [{"passage": f"Tom has {i} apples.", "question": "How many?", "answer": f"{i} apples"}
            for i in range(30)]
    path = write_jsonl(tmp_path / "asdiv.jsonl", rows)
    parts = D.dataset_splits("asdiv", seed=3, test_size=10, source=str(path))
    raw = D.asdiv_splits(seed=3, test_size=10, source=str(path))
    assert parts == {k: D.asdiv_instruction_records(v) if v else v for k, v in raw.items()}
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [20, 0, 10]


def test_run_config_checks_data_splits_against_the_registry():
    from balora.core.config import ConfigError
    from balora.training.run_config import run_config_from_dict

    assert run_config_from_dict({"data": {"splits": "boolq"}}).data.splits == "boolq"
    known = ", ".join(["auto", *sorted(D.DATASET_SPLITS)])
    with pytest.raises(ConfigError, match=f"^data.splits: 'foo' is not a known dataset; known: {known}$"):
        run_config_from_dict({"data": {"splits": "foo"}})


# ---------------------------------------------------------------- real assets

def _need(*names):
    from balora.assets import AssetMissingError, asset_dir

    for n in names:
        try:
            asset_dir(n)
        except AssetMissingError as e:
            pytest.skip(str(e))


@pytest.mark.assets
def test_rotten_tomatoes_splits():
    _need("rotten-tomatoes")
    parts = D.rotten_tomatoes_splits()
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [10202, 1275, 1275]
    texts = [{r["text"] for r in parts[k]} for k in parts]
    assert sum(map(len, texts)) == 12752 == len(set().union(*texts))
    assert parts == D.rotten_tomatoes_splits()
    assert {r["label"] for r in parts["test"]} == {"fresh", "rotten"}


@pytest.mark.assets
def test_boolq_splits():
    _need("boolq")
    parts = D.boolq_splits()
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [8484, 943, 3270]
    assert parts["test"].source.endswith("dev.jsonl")
    qs = [{r["question"] for r in parts[k]} for k in parts]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])


@pytest.mark.assets
def test_asdiv_splits_are_disjoint():
    _need("asdiv")
    raw = load_records("asset:asdiv")
    assert len(raw) == 2305
    assert D.dedupe_records(raw, D.asdiv_key)[1] == 1  # one repeated problem in the asset
    parts = D.asdiv_splits()
    assert [len(parts[k]) for k in ("train", "validation", "test")] == [1804, 0, 500]
    keys = [{D.asdiv_key(r) for r in parts[k]} for k in ("train", "test")]
    assert not keys[0] & keys[1]
    assert parts == D.asdiv_splits()


@pytest.mark.assets
def test_smollm2_chat_template_prompt_is_a_token_prefix_on_real_data():
    _need("smollm2", "asdiv")
    from transformers import AutoTokenizer

    from balora.assets import main_file

    tok = AutoTokenizer.from_pretrained(main_file("smollm2"))
    recs = D.asdiv_instruction_records(D.asdiv_splits()["train"][:200])
    feats, stats = build_instruction_dataset(recs, tok, InstructionDataConfig(template="chat"))
    assert stats["examples"] == 200 and stats["truncated"] == stats["dropped"] == 0
    for rec, f in zip(recs, feats):
        labels = [t for t in f["labels"] if t != -100]
        assert f["labels"][:len(f["labels"]) - len(labels)] == [-100] * (
            len(f["labels"]) - len(labels))
        assert labels[-1] == tok.eos_token_id and labels.count(tok.eos_token_id) == 1
        assert tok.decode(labels) == rec["response"] + tok.eos_token
