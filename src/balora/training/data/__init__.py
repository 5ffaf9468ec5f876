"""Data: load records, build instruction-tuning / classification features, make splits.

Decisions (relied on by the tests and the CLI presets):

* Instruction examples are ``prompt + response + EOS``; labels are -100 on the prompt (and on
  padding), so the loss covers the response and the EOS.  Prompt and response are tokenised
  separately (chat templates: the rendered conversation, checked to start with the prompt's
  tokens), so the label boundary is exact.
* Truncation to ``max_length`` cuts the response's end (and then no EOS is added: the answer did
  not end there).  An example whose prompt leaves no room for one response token is *dropped*:
  cutting the prompt's left side would remove the instruction header or the question's start.
  Both are counted in the returned stats and logged as warnings.
* Splits are seeded permutations (``random.Random(seed)``) with a fixed data seed
  ``SPLIT_SEED = 1234`` by default, independent of the training seed, so that runs with
  different training seeds are evaluated on the same test set.  Presets (seed 1234): Rotten
  Tomatoes 80/10/10 = 10,202 / 1,275 / 1,275; BoolQ train.jsonl -> 8,484 train / 943
  validation, dev.jsonl (3,270) -> test, since the official test set is unlabelled.
* ASDiv SFT target: ``"The answer is: {answer}"`` with the answer verbatim ("9 apples"); ASDiv
  has no rationales, and the evaluation harness extracts "The answer is: X".  The real asset
  (2,305 rows) holds one duplicated problem (same passage and question, same answer); it is
  dropped before splitting, leaving 2,304 problems -> 1,804 train / 500 test.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

__all__ = [
    "ASDIV_RESPONSE", "SPLIT_SEED", "ClassificationDataConfig", "DataError",
    "InstructionCollator", "InstructionDataConfig", "Records", "asdiv_instruction_records",
    "asdiv_splits", "available_splits", "balance_classes", "boolq_splits",
    "build_classification_dataset", "build_instruction_dataset", "class_counts",
    "classification_collator", "dedupe_records", "imbalance_subsample", "load_records",
    "load_splits", "parse_ratio", "rotten_tomatoes_splits", "split_records",
]

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234
ASDIV_RESPONSE = "The answer is: {answer}"
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{query}\n\n"
                 "### Response:\n")
IGNORE_INDEX = -100
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
# Canonical split name -> file stems / hub names that mean it.
_SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test",)}


class DataError(ValueError):
    """Malformed or unusable data; the message names the file, the line and the problem."""


class Records(list):
    """A ``list[dict]`` that remembers where each record came from, for error messages."""

    def __init__(self, rows: Iterable[dict] = (), source: str = "<records>",
                 lines: Sequence[int] | None = None) -> None:
        super().__init__(rows)
        self.source = source
        self.lines = list(lines) if lines is not None else None

    def where(self, i: int) -> str:
        """``file:line`` of record ``i`` (``source: record N`` when lines are unknown)."""
        if self.lines is not None and i < len(self.lines):
            return f"{self.source}:{self.lines[i]}"
        return f"{self.source}: record {i + 1}"

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):  # keep file positions through records[:limit]
            return _subset(self, list(range(len(self)))[i])
        return super().__getitem__(i)


def _where(records: Sequence[dict], i: int, source_name: str | None) -> str:
    if isinstance(records, Records):
        return records.where(i)
    return f"{source_name or '<records>'}: record {i + 1}"


# ---------------------------------------------------------------- loading

def _canon(split: str) -> str:
    return next((c for c, names in _SPLIT_ALIASES.items() if split.lower() in names), split)


def _format_of(path: Path, fmt: str | None) -> str:
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt not in _READERS:
        raise DataError(f"{path}: unknown data format {fmt or path.suffix!r}; pass fmt= "
                        "jsonl, json, csv or parquet")
    return fmt


def _read_jsonl(path: Path, name: str) -> Records:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, text in enumerate(f, 1):
            if not text.strip():
                continue  # blank lines (often a trailing one) carry no record
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid JSON ({e.msg}: line {e.lineno} "
                                f"column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{name}:{lineno}: expected a JSON object, got "
                                f"{type(row).__name__}")
            rows.append(row)
            lines.append(lineno)
    return Records(rows, name, lines)


def _read_json(path: Path, name: str) -> Records:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig") or "[]")
    except json.JSONDecodeError as e:
        raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg}: line {e.lineno} "
                        f"column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{name}: expected a list of objects or {{\"data\": [...]}}")
    return Records(data, name)


def _read_csv(path: Path, name: str) -> Records:
    rows, lines = [], []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        start = reader.line_num + 1
        for cells in reader:
            if cells:  # csv yields [] for blank lines
                if len(cells) != len(header):  # a ragged row would shift columns
                    raise DataError(f"{name}:{start}: {len(cells)} values but the header has "
                                    f"{len(header)} columns")
                rows.append(dict(zip(header, cells)))
                lines.append(start)
            start = reader.line_num + 1
    return Records(rows, name, lines)


def _read_parquet(path: Path, name: str) -> Records:
    import pyarrow.parquet as pq

    try:
        return Records(pq.read_table(path).to_pylist(), name)
    except ValueError as e:  # pyarrow.ArrowInvalid: not a Parquet file
        raise DataError(f"{name}: cannot read Parquet ({e})") from e


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
            "parquet": _read_parquet}


def _split_files(directory: Path) -> dict[str, Path]:
    """Canonical split name ('train', 'validation', 'test' or the file stem) -> data file."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _FORMATS)
    return {_canon(p.stem): p for p in files}


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or any(
        x.lower() in _FORMATS for x in Path(s).suffixes)


def load_records(source: str, *, split: str | None = None, fmt: str | None = None) -> Records:
    """Records from a JSONL/JSON/CSV/Parquet file, a directory of ``{split}.<ext>`` files,
    ``asset:NAME`` or (when ``source`` is not an existing path) a hub dataset id.

    ``split`` picks the file in a directory or the hub split (default ``"train"``; ``dev``,
    ``val`` and ``valid`` files answer to ``"validation"``).  Raises ``DataError``.
    """
    from balora.assets import resolve

    path = Path(resolve(source)).expanduser()
    if path.is_dir():
        files = _split_files(path)
        want = split or "train"
        if _canon(want) not in files:
            raise DataError(f"{path}: no file for split {want!r} (found: "
                            f"{', '.join(sorted(files)) or 'no data files'})")
        path = files[_canon(want)]
    elif not path.exists():
        if _looks_like_path(source):
            raise DataError(f"{source}: no such file")
        return _load_hub(source, split or "train")
    # Name the file as the user wrote it, unless it was found through an asset or a directory.
    name = source if Path(source).expanduser() == path else str(path)
    reader = _READERS[_format_of(path, fmt)]
    try:
        records = reader(path, name)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not valid UTF-8 ({e})") from None
    except csv.Error as e:
        raise DataError(f"{name}: invalid CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e})") from e
    if not records:
        raise DataError(f"{name}: no records (the file is empty)")
    return records


def _load_hub(source: str, split: str) -> Records:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # any hub/network failure: say what was tried, keep the cause
        raise DataError(f"{source!r} is not a local file or directory, and loading it as a "
                        f"hub dataset (split {split!r}) failed: {e}") from e
    return Records(ds.to_list(), f"{source}[{split}]")


def available_splits(source: str) -> dict[str, str]:
    """Named splits of a source, canonical name -> name to pass as ``split``; ``{}`` for a
    single file."""
    from balora.assets import resolve

    path = Path(resolve(source)).expanduser()
    if path.is_dir():
        return {c: p.stem for c, p in _split_files(path).items()}
    if path.exists() or _looks_like_path(source):
        return {}
    import datasets

    try:
        names = datasets.get_dataset_split_names(source)
    except Exception as e:  # any hub/network failure: say what was tried, keep the cause
        raise DataError(f"{source!r} is not a local file or directory, and reading its "
                        f"splits from the hub failed: {e}") from e
    return {_canon(n): n for n in names}


# ---------------------------------------------------------------- instruction tuning

@dataclass
class InstructionDataConfig:
    """Fields and prompt format for instruction tuning (``data.*`` in run configs).

    ``template``: ``alpaca`` (the paper's prompt), ``chat`` (the tokenizer's chat template,
    user = query, assistant = response) or ``plain`` (``"{query}\\n"``).  ``context_field``,
    when set, is prepended to the query with a newline.
    """

    query_field: str = "query"
    response_field: str = "response"
    context_field: str | None = None
    template: Literal["alpaca", "chat", "plain"] = "alpaca"
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.template not in ("alpaca", "chat", "plain"):
            raise DataError(f"data.template must be alpaca, chat or plain, not {self.template!r}")
        if self.max_length < 2:
            raise DataError(f"data.max_length must be >= 2, not {self.max_length}")


def _get(rec: dict, field: str, where: str, setting: str | None = None) -> Any:
    if field not in rec:
        hint = f"; set data.{setting}" if setting else ""
        raise DataError(f"{where}: missing field {field!r} (fields present: "
                        f"{', '.join(map(str, rec))}){hint}")
    if rec[field] is None:
        raise DataError(f"{where}: field {field!r} is null")
    return rec[field]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def _chat_texts(tokenizer: Any, query: str, response: str, where: str) -> tuple[str, str]:
    """(prompt, full conversation) rendered by the chat template; the prompt must lead."""
    user = [{"role": "user", "content": query}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                         tokenize=False)
    if not full.startswith(prompt):
        at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(full))
        raise DataError(
            f"{where}: the chat template renders the prompt (add_generation_prompt=True) "
            f"differently from the start of the full conversation (from character {at}: "
            f"{prompt[at:at + 40]!r} vs {full[at:at + 40]!r}), so prompt tokens cannot be "
            "masked exactly; use data.template 'alpaca' or 'plain', or another template")
    return prompt, full


def _chat_split(p_ids: list[int], f_ids: list[int], eos: int, where: str) -> tuple[list, list]:
    if f_ids[:len(p_ids)] != p_ids:
        raise DataError(
            f"{where}: the prompt's tokens are not a prefix of the conversation's tokens (the "
            "tokenizer merges text across the prompt/response boundary), so prompt tokens "
            "cannot be masked exactly; use data.template 'alpaca' or 'plain'")
    resp = f_ids[len(p_ids):]
    if eos in resp:  # the template closes the turn with EOS: end there (drop its trailing "\n")
        return p_ids, resp[:len(resp) - resp[::-1].index(eos)]
    return p_ids, resp + [eos]


def build_instruction_dataset(records: Sequence[dict], tokenizer: Any,
                              cfg: InstructionDataConfig, source_name: str | None = None
                              ) -> tuple[list[dict], dict[str, Any]]:
    """Tokenised causal-LM examples ``{input_ids, attention_mask, labels}`` and stats
    ``{records, examples, truncated, dropped, prompt_tokens, response_tokens, max_tokens}``
    (``response_tokens`` counts label tokens, EOS included).  See the module doc for the
    truncation policy; truncation and drops are also logged as warnings."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
    # Chat templates write their own BOS; plain text gets the one the tokenizer would add.
    bos = [tokenizer.bos_token_id] if cfg.template != "chat" and _adds_bos(tokenizer) else []
    chat = cfg.template == "chat"
    if chat and not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template is 'chat' but the tokenizer has no chat template; use "
                        "'alpaca' or 'plain'")
    texts: list[tuple[str, str]] = []  # (prompt, response) or, for chat, (prompt, full)
    for i, rec in enumerate(records):
        where = _where(records, i, source_name)
        query = str(_get(rec, cfg.query_field, where, "query_field"))
        response = str(_get(rec, cfg.response_field, where, "response_field"))
        if cfg.context_field:
            query = f"{_get(rec, cfg.context_field, where, 'context_field')}\n{query}"
        if chat:
            texts.append(_chat_texts(tokenizer, query, response, where))
        else:
            texts.append((ALPACA_PROMPT.format(query=query) if cfg.template == "alpaca"
                          else f"{query}\n", response))
    # Batched: fast tokenizers are many times quicker on lists than one text at a time.
    firsts, seconds = ([tokenizer(list(col), add_special_tokens=False)["input_ids"]
                        for col in zip(*texts)] if texts else ([], []))
    pairs = []
    for i, (first, second) in enumerate(zip(firsts, seconds)):
        pairs.append(_chat_split(first, second, eos, _where(records, i, source_name)) if chat
                     else (bos + first, second + [eos]))

    out: list[dict] = []
    stats = {"records": len(records), "examples": 0, "truncated": 0, "dropped": 0,
             "prompt_tokens": 0, "response_tokens": 0, "max_tokens": 0}
    for prompt, response in pairs:
        if len(prompt) + len(response) > cfg.max_length:
            if len(prompt) >= cfg.max_length:
                stats["dropped"] += 1
                continue
            response = response[:cfg.max_length - len(prompt)]  # EOS goes with the cut end
            stats["truncated"] += 1
        ids = prompt + response
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                    "labels": [IGNORE_INDEX] * len(prompt) + response})
        stats["prompt_tokens"] += len(prompt)
        stats["response_tokens"] += len(response)
        stats["max_tokens"] = max(stats["max_tokens"], len(ids))
    stats["examples"] = len(out)
    name = source_name or getattr(records, "source", "<records>")
    if stats["truncated"]:
        logger.warning("%s: %d of %d examples truncated to max_length=%d (response end cut)",
                       name, stats["truncated"], len(records), cfg.max_length)
    if stats["dropped"]:
        logger.warning("%s: %d of %d examples dropped: the prompt alone reaches max_length=%d",
                       name, stats["dropped"], len(records), cfg.max_length)
    return out, stats


class InstructionCollator:
    """Right-pads instruction examples: ``pad_token_id`` (EOS if there is none) on input_ids,
    0 on attention_mask, -100 on labels; returns ``torch.long`` tensors."""

    def __init__(self, tokenizer: Any, pad_to_multiple_of: int | None = None) -> None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        if pad is None:
            raise DataError("the tokenizer has neither a pad nor an EOS token")
        self.pad_id, self.multiple = int(pad), pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            ids, pad = list(f["input_ids"]), n - len(f["input_ids"])
            mask = list(f.get("attention_mask", [1] * len(ids)))
            batch["input_ids"].append(ids + [self.pad_id] * pad)
            batch["attention_mask"].append(mask + [0] * pad)
            batch["labels"].append(list(f.get("labels", ids)) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


# ---------------------------------------------------------------- classification

@dataclass
class ClassificationDataConfig:
    """Fields for sequence classification; ``labels`` fixes the label order (ids) if given."""

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list[str] | None = None
    max_length: int = 128


def build_classification_dataset(records: Sequence[dict], tokenizer: Any,
                                 cfg: ClassificationDataConfig,
                                 label_map: dict[Any, int] | None = None,
                                 source_name: str | None = None
                                 ) -> tuple[list[dict], dict[Any, int] | None]:
    """Tokenised examples and the label map (label -> id).

    Build the training set with ``label_map=None`` (ids follow ``cfg.labels``, else the sorted
    set of training labels) and pass the returned map to the validation/test builds, where an
    unknown label is a ``DataError``.  When the labels are numbers and at least one is a float
    (and ``cfg.labels`` is unset) the task is regression: labels become floats and the map is
    ``None`` (pass ``None`` again for the evaluation builds).
    """
    texts, pairs, raw = [], [], []
    for i, rec in enumerate(records):
        where = _where(records, i, source_name)
        texts.append(str(_get(rec, cfg.text_field, where, "text_field")))
        if cfg.text_pair_field:
            pairs.append(str(_get(rec, cfg.text_pair_field, where, "text_pair_field")))
        raw.append(_get(rec, cfg.label_field, where, "label_field"))
    # Regression: numeric labels with at least one float (0 / 0.5 / 1 is not three classes).
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in raw)
    regression = (label_map is None and cfg.labels is None and numeric
                  and any(isinstance(x, float) for x in raw))
    if regression:
        labels: list = [float(x) for x in raw]
    else:
        if label_map is None:
            try:
                names = list(cfg.labels) if cfg.labels is not None else sorted(set(raw))
            except TypeError:
                raise DataError(f"{source_name or getattr(records, 'source', '<records>')}: "
                                "labels of mixed types cannot be ordered; set data.labels") \
                    from None
            label_map = {lab: i for i, lab in enumerate(names)}
        labels = []
        for i, lab in enumerate(raw):
            key = lab if lab in label_map else str(lab)  # int labels vs data.labels strings
            if key not in label_map:
                raise DataError(f"{_where(records, i, source_name)}: unknown label {lab!r} "
                                f"(known: {', '.join(map(str, label_map))}); labels come from "
                                "the training data or data.labels")
            labels.append(label_map[key])
    # Tokenise one token past the limit to count truncation, then redo only those rows.
    kw = {"truncation": True, "max_length": cfg.max_length + 1}
    enc = tokenizer(texts, pairs or None, **kw)
    long_rows = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > cfg.max_length]
    if long_rows:
        kw["max_length"] = cfg.max_length
        redo = tokenizer([texts[i] for i in long_rows],
                         [pairs[i] for i in long_rows] if pairs else None, **kw)
        for j, i in enumerate(long_rows):
            for k in enc:
                enc[k][i] = redo[k][j]
        logger.warning("%s: %d of %d texts truncated to max_length=%d",
                       source_name or getattr(records, "source", "<records>"),
                       len(long_rows), len(texts), cfg.max_length)
    out = [{k: enc[k][i] for k in enc} | {"labels": labels[i]} for i in range(len(texts))]
    return out, (None if regression else label_map)


def classification_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
    """``DataCollatorWithPadding`` returning torch tensors."""
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                   return_tensors="pt")


# ---------------------------------------------------------------- splits

def _subset(records: Sequence[dict], idx: list[int]) -> list[dict]:
    """The records at ``idx``; a ``Records`` keeps its file positions."""
    rows = [records[i] for i in idx]
    if not isinstance(records, Records):
        return rows
    return Records(rows, records.source, [records.lines[i] for i in idx] if records.lines else None)


def _split_counts(records: Sequence[dict], seed: int, n_test: int, n_val: int,
                  group_key: Callable[[dict], Any] | None) -> dict[str, list]:
    groups: dict[Any, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(group_key(rec) if group_key else i, []).append(i)
    order = list(groups.values())  # first-appearance order, so the shuffle is reproducible
    random.Random(seed).shuffle(order)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for members in order:  # a group goes whole into the first split it fits in
        if len(parts["test"]) + len(members) <= n_test:
            parts["test"] += members
        elif len(parts["validation"]) + len(members) <= n_val:
            parts["validation"] += members
        else:
            parts["train"] += members
    return {k: _subset(records, sorted(v)) for k, v in parts.items()}


def split_records(records: Sequence[dict], *, seed: int, test_fraction: float,
                  validation_fraction: float = 0.0,
                  group_key: Callable[[dict], Any] | None = None) -> dict[str, list]:
    """Seeded split into ``train``/``validation``/``test`` (original order kept inside each).

    Sizes are ``round(n * fraction)``; records with equal ``group_key`` never straddle splits.
    """
    if not (0 <= test_fraction and 0 <= validation_fraction and
            test_fraction + validation_fraction < 1):
        raise DataError(f"split fractions must be >= 0 and sum to < 1, got test="
                        f"{test_fraction}, validation={validation_fraction}")
    n = len(records)
    return _split_counts(records, seed, round(n * test_fraction),
                         round(n * validation_fraction), group_key)


def load_splits(source: str, *, seed: int = SPLIT_SEED, validation_fraction: float = 0.1,
                test_fraction: float = 0.1, fmt: str | None = None) -> dict[str, list]:
    """Train/validation/test for a configured source.

    Named splits are used when present; a missing test split is replaced by the named
    validation/dev split (public test sets of GLUE-style benchmarks are unlabelled, so the dev
    set is what gets reported), and whatever is still missing is carved from train with a
    seeded split.  A single file is split 80/10/10 by default.
    """
    named = available_splits(source)
    if "train" not in named:
        return split_records(load_records(source, fmt=fmt), seed=seed,
                             test_fraction=test_fraction,
                             validation_fraction=validation_fraction)

    def load(canon: str) -> Records:
        return load_records(source, split=named[canon], fmt=fmt)

    val = load("validation") if "validation" in named and "test" in named else None
    test = load("test") if "test" in named else load("validation") if "validation" in named \
        else None
    parts = split_records(load("train"), seed=seed,
                          test_fraction=0.0 if test is not None else test_fraction,
                          validation_fraction=0.0 if val is not None else validation_fraction)
    return {"train": parts["train"],
            "validation": val if val is not None else parts["validation"],
            "test": test if test is not None else parts["test"]}


def dedupe_records(records: Sequence[dict], key: Callable[[dict], Any]) -> tuple[list, int]:
    """First record of each ``key``, and how many were dropped."""
    first: dict[Any, int] = {}
    for i, rec in enumerate(records):
        first.setdefault(key(rec), i)
    return _subset(records, sorted(first.values())), len(records) - len(first)


def _norm_text(s: Any) -> str:
    return re.sub(r"[^0-9a-z]+", " ", str(s).lower()).strip()


def _asdiv_key(rec: dict) -> str:
    return f"{_norm_text(rec['passage'])} || {_norm_text(rec['question'])}"


def asdiv_splits(seed: int = SPLIT_SEED, test_size: int = 500, validation_size: int = 0,
                 source: str = "asset:asdiv") -> dict[str, list]:
    """ASDiv train/validation/test with duplicate problems (normalised passage + question)
    dropped first, so no problem is in two splits.  Real asset: 1 duplicate, 1,804/0/500."""
    records, dropped = dedupe_records(load_records(source), _asdiv_key)
    if dropped:
        logger.info("ASDiv: dropped %d duplicate problem(s) before splitting", dropped)
    if test_size + validation_size >= len(records):
        raise DataError(f"ASDiv has {len(records)} problems; test_size + validation_size "
                        f"= {test_size + validation_size} leaves no training data")
    return _split_counts(records, seed, test_size, validation_size, _asdiv_key)


def asdiv_instruction_records(records: Sequence[dict]) -> list[dict]:
    """ASDiv rows as ``{query: passage + " " + question, response: "The answer is: X"}``."""
    rows = []
    for i, r in enumerate(records):
        where = _where(records, i, "asdiv")
        q = " ".join(str(_get(r, f, where)).strip() for f in ("passage", "question"))
        a = str(_get(r, "answer", where)).strip()
        rows.append({"query": q, "response": ASDIV_RESPONSE.format(answer=a)})
    return Records(rows, records.source, records.lines) if isinstance(records, Records) else rows


def rotten_tomatoes_splits(seed: int = SPLIT_SEED) -> dict[str, list]:
    """Rotten Tomatoes (no predefined split; texts already deduped): seeded 80/10/10."""
    return load_splits("asset:rotten-tomatoes", seed=seed, validation_fraction=0.1,
                       test_fraction=0.1)


def boolq_splits(seed: int = SPLIT_SEED, validation_fraction: float = 0.1) -> dict[str, list]:
    """BoolQ: train.jsonl -> seeded train/validation; dev.jsonl -> test (the official test set
    is unlabelled)."""
    return load_splits("asset:boolq", seed=seed, validation_fraction=validation_fraction)


# ---------------------------------------------------------------- class (im)balance

def parse_ratio(value: Any) -> float:
    """A minority:majority ratio as a number in (0, 1]: ``0.1``, ``"1:9"`` or ``"1/9"``.

    Raises ``ValueError`` with what was wrong (callers add the option's name)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number in (0, 1] or 'a:b', got {value!r}")
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[:/]\s*(\d+(?:\.\d+)?)\s*", value)
        if not match:
            raise ValueError(f"expected a number in (0, 1] or 'minority:majority' such as '1:9', got {value!r}")
        num, den = float(match.group(1)), float(match.group(2))
        if den == 0:
            raise ValueError(f"{value!r}: the majority side is 0")
        ratio = num / den
    elif isinstance(value, (int, float)):
        ratio = float(value)
    else:
        raise ValueError(f"expected a number in (0, 1] or 'a:b', got {value!r}")
    if not (0 < ratio <= 1):
        raise ValueError(f"{value!r} is minority/majority = {ratio:g}; it must be in (0, 1] "
                         "(e.g. '1:9' or 0.1111 for one minority example per nine majority)")
    return ratio


def _label_groups(records: Sequence[dict], label_field: str, source_name: str | None
                  ) -> dict[Any, list[int]]:
    """label -> indices, in first-appearance order of the labels."""
    groups: dict[Any, list[int]] = {}
    for i, rec in enumerate(records):
        label = _get(rec, label_field, _where(records, i, source_name), "label_field")
        groups.setdefault(label, []).append(i)
    return groups


def _sorted_labels(labels: Iterable[Any]) -> list[Any]:
    labels = list(labels)
    try:
        return sorted(labels)
    except TypeError:  # mixed types (e.g. 0 and "0"): their text still gives a stable order
        return sorted(labels, key=str)


def class_counts(records: Sequence[dict], label_field: str) -> dict[str, int]:
    """``{str(label): count}`` in sorted label order (JSON-ready)."""
    groups = _label_groups(records, label_field, None)
    return {str(lab): len(groups[lab]) for lab in _sorted_labels(groups)}


def _shuffled(indices: list[int], seed: str) -> list[int]:
    # One shuffle per (seed, purpose, label), independent of how many are kept: the kept examples
    # of a stronger imbalance are a prefix of those of a milder one (nested subsets).
    order = list(indices)
    random.Random(seed).shuffle(order)
    return order


def imbalance_subsample(records: Sequence[dict], *, label_field: str, ratio: float,
                        minority_label: Any = None, seed: int = SPLIT_SEED,
                        source_name: str | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Subsample a classification split so that minority / (largest other class) = ``ratio``.

    The minority class is ``minority_label`` (matched by value or by its text), by default the
    least frequent label, ties going to the last label in sorted order. When the split has enough
    minority examples, ``round(ratio * n_largest_other)`` of them are kept (seeded) and every other
    class is kept whole; otherwise (e.g. 1:1 when the "minority" is only slightly smaller) every
    minority example is kept and each other class is cut to ``round(n_minority / ratio)``.
    Kept records stay in their original order. Returns the records and what was done.
    """
    ratio = parse_ratio(ratio)
    groups = _label_groups(records, label_field, source_name)
    labels = _sorted_labels(groups)
    name = source_name or getattr(records, "source", "<records>")
    if len(labels) < 2:
        raise DataError(f"{name}: data.imbalance_ratio needs at least two classes, found "
                        f"{', '.join(map(repr, labels)) or 'none'}")
    if minority_label is None:
        fewest = min(len(groups[lab]) for lab in labels)
        minority = [lab for lab in labels if len(groups[lab]) == fewest][-1]
    else:
        matches = [lab for lab in labels if lab == minority_label or str(lab) == str(minority_label)]
        if not matches:
            raise DataError(f"{name}: data.minority_label {minority_label!r} is not a label of the "
                            f"training split (labels: {', '.join(map(repr, labels))})")
        minority = matches[0]
    others = [lab for lab in labels if lab != minority]
    n_min, n_max = len(groups[minority]), max(len(groups[lab]) for lab in others)
    keep = {lab: len(groups[lab]) for lab in labels}
    want = round(ratio * n_max)
    if want <= n_min:
        if want < 1:
            raise DataError(f"{name}: data.imbalance_ratio {ratio:g} of {n_max} majority examples keeps "
                            "no minority example; use a larger ratio or more data")
        keep[minority] = want
    else:
        cap = round(n_min / ratio)
        for lab in others:
            keep[lab] = min(keep[lab], cap)
    kept: list[int] = []
    for lab in labels:
        kept += _shuffled(groups[lab], f"{seed}/imbalance/{lab!r}")[:keep[lab]]
    majority_after = max(keep[lab] for lab in others)
    info = {"ratio": ratio, "minority_label": minority if isinstance(minority, (int, float, bool)) else str(minority),
            "seed": seed, "counts_before": {str(lab): len(groups[lab]) for lab in labels},
            "counts_after": {str(lab): keep[lab] for lab in labels},
            "achieved_ratio": keep[minority] / majority_after}
    return _subset(records, sorted(kept)), info


def balance_classes(records: Sequence[dict], *, label_field: str, seed: int = SPLIT_SEED,
                    purpose: str = "balance", source_name: str | None = None
                    ) -> tuple[list[dict], dict[str, int]]:
    """Subsample every class to the smallest class's count (seeded; original order kept).

    ``purpose`` separates the random streams of different splits (e.g. "test", "validation")."""
    groups = _label_groups(records, label_field, source_name)
    labels = _sorted_labels(groups)
    if not labels:
        return list(records), {}
    n = min(len(groups[lab]) for lab in labels)
    kept: list[int] = []
    for lab in labels:
        kept += _shuffled(groups[lab], f"{seed}/{purpose}/{lab!r}")[:n]
    return _subset(records, sorted(kept)), {str(lab): n for lab in labels}
