"""Seeded train/validation/test splits, and the registry of the datasets with splits of their own.

* Splits are seeded permutations (``random.Random(seed)``) with a fixed data seed ``SPLIT_SEED = 1234`` by
  default, independent of the training seed, so that runs with different training seeds are evaluated on
  the same test set.  Presets (seed 1234): Rotten Tomatoes 80/10/10 = 10,202 / 1,275 / 1,275; BoolQ
  train.jsonl -> 8,484 train / 943 validation, dev.jsonl (3,270) -> test, since the official test set is
  unlabelled.  Privacy-policy QA 80/10/10 grouped by clause: 8,739 / 1,092 / 1,092.
* ASDiv SFT target: ``"The answer is: {answer}"`` with the answer verbatim ("9 apples"); ASDiv has no
  rationales, and the evaluation harness extracts "The answer is: X".  The real asset (2,305 rows) holds
  one duplicated problem (same passage and question, same answer); it is dropped before splitting,
  leaving 2,304 problems -> 1,804 train / 500 test.
* ``data.splits: NAME`` in a run config picks ``DATASET_SPLITS[NAME]`` (filled by ``@register_splits``),
  whose splits are ready for training; ``auto`` uses ``load_splits`` on ``data.source``.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from balora.training.data.readers import (
    DataError,
    Records,
    available_splits,
    field_value,
    load_records,
    record_where,
    subset,
)

# The package's name, not this module's: it is the logger users filter data messages on.
logger = logging.getLogger("balora.training.data")

SPLIT_SEED = 1234
ASDIV_RESPONSE = "The answer is: {answer}"
BOOLQ_QUERY = "{passage}\n\nQuestion: {question}?\nAnswer yes or no."
PRIVACY_QUERY = ("Privacy policy clause: {clause}\n\nUser question: {question}\n"
                 "Is the clause relevant to the question? Answer yes or no.")

SplitsFn = Callable[..., dict[str, list]]
_F = TypeVar("_F", bound=SplitsFn)

# Dataset name (``data.splits`` in run configs) -> function returning its train/validation/test splits,
# ready for training; each takes at least ``seed``.
DATASET_SPLITS: dict[str, SplitsFn] = {}


def register_splits(name: str) -> Callable[[_F], _F]:
    """Decorator: make the function the splits of dataset ``name`` (``data.splits: NAME``)."""
    def register(fn: _F) -> _F:
        if name in DATASET_SPLITS:  # a silent replacement would change every run that names it
            raise ValueError(f"dataset splits {name!r} are already registered "
                             f"({DATASET_SPLITS[name].__qualname__})")
        DATASET_SPLITS[name] = fn
        return fn
    return register


def dataset_splits(name: str, **options: Any) -> dict[str, list]:
    """The train/validation/test splits of the registered dataset ``name``; ``options`` (e.g. ``seed``) go
    to its function.  An unknown name is a ``DataError`` listing the known ones."""
    try:
        fn = DATASET_SPLITS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASET_SPLITS))}") from None
    return fn(**options)


# ---------------------------------------------------------------- generic splits

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
    return {k: subset(records, sorted(v)) for k, v in parts.items()}


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
    return subset(records, sorted(first.values())), len(records) - len(first)


# ---------------------------------------------------------------- ASDiv

def _norm_text(s: Any) -> str:
    return re.sub(r"[^0-9a-z]+", " ", str(s).lower()).strip()


def asdiv_key(rec: dict) -> str:
    """An ASDiv problem's identity: its passage and question, lower-cased, punctuation and spacing folded."""
    return f"{_norm_text(rec['passage'])} || {_norm_text(rec['question'])}"


def asdiv_splits(seed: int = SPLIT_SEED, test_size: int = 500, validation_size: int = 0,
                 source: str = "asset:asdiv") -> dict[str, list]:
    """ASDiv train/validation/test with duplicate problems (normalised passage + question)
    dropped first, so no problem is in two splits.  Real asset: 1 duplicate, 1,804/0/500."""
    records, dropped = dedupe_records(load_records(source), asdiv_key)
    if dropped:
        logger.info("ASDiv: dropped %d duplicate problem(s) before splitting", dropped)
    if test_size + validation_size >= len(records):
        raise DataError(f"ASDiv has {len(records)} problems; test_size + validation_size "
                        f"= {test_size + validation_size} leaves no training data")
    return _split_counts(records, seed, test_size, validation_size, asdiv_key)


def asdiv_instruction_records(records: Sequence[dict]) -> list[dict]:
    """ASDiv rows as ``{query: passage + " " + question, response: "The answer is: X"}``."""
    rows = []
    for i, r in enumerate(records):
        where = record_where(records, i, "asdiv")
        q = " ".join(str(field_value(r, f, where)).strip() for f in ("passage", "question"))
        a = str(field_value(r, "answer", where)).strip()
        rows.append({"query": q, "response": ASDIV_RESPONSE.format(answer=a)})
    return Records(rows, records.source, records.lines) if isinstance(records, Records) else rows


@register_splits("asdiv")
def asdiv_instruction_splits(seed: int = SPLIT_SEED, **options: Any) -> dict[str, list]:
    """``asdiv_splits`` (``options`` go to it) as instruction records (query / response), for training."""
    return {k: asdiv_instruction_records(v) if v else v for k, v in asdiv_splits(seed=seed, **options).items()}


# ---------------------------------------------------------------- classification presets

@register_splits("rotten-tomatoes")
def rotten_tomatoes_splits(seed: int = SPLIT_SEED) -> dict[str, list]:
    """Rotten Tomatoes (no predefined split; texts already deduped): seeded 80/10/10."""
    return load_splits("asset:rotten-tomatoes", seed=seed, validation_fraction=0.1,
                       test_fraction=0.1)


@register_splits("boolq")
def boolq_splits(seed: int = SPLIT_SEED, validation_fraction: float = 0.1) -> dict[str, list]:
    """BoolQ: train.jsonl -> seeded train/validation; dev.jsonl -> test (the official test set
    is unlabelled)."""
    return load_splits("asset:boolq", seed=seed, validation_fraction=validation_fraction)


@register_splits("privacy-policy")
def privacy_policy_splits(seed: int = SPLIT_SEED) -> dict[str, list]:
    """Privacy-policy QA: seeded 80/10/10 grouped by clause, so that every test clause is unseen in training
    (each clause comes with ~11 questions; a pair-level split would let the model recall clauses). The
    source file is sorted by label, so each split is put in a seeded order: a prefix (``--limit N``) is then
    a fair sample rather than N "relevant" pairs."""
    records = load_records("asset:privacy-policy")
    parts = split_records(records, seed=seed, test_fraction=0.1, validation_fraction=0.1,
                          group_key=lambda r: r.get("clause"))
    rng = random.Random(seed)
    shuffled = {}
    for name, part in parts.items():
        order = list(range(len(part)))
        rng.shuffle(order)
        shuffled[name] = subset(part, order)
    return shuffled


def privacy_policy_instruction_records(records: Sequence[dict]) -> list[dict]:
    """Privacy-policy rows as ``{query: clause + question (PRIVACY_QUERY), response: "yes" | "no"}`` (relevant
    -> yes): the label as a word, for causal LMs (the NLG testbed; `balora eval --tasks privacy_policy`)."""
    rows = []
    for i, r in enumerate(records):
        where = record_where(records, i, "privacy-policy")
        label = str(field_value(r, "label", where)).strip()
        if label not in ("relevant", "irrelevant"):
            raise DataError(f"{where}: label must be 'relevant' or 'irrelevant', got {label!r}")
        query = PRIVACY_QUERY.format(clause=str(field_value(r, "clause", where)).strip(),
                                     question=str(field_value(r, "question", where)).strip())
        rows.append({"query": query, "response": "yes" if label == "relevant" else "no"})
    return Records(rows, records.source, records.lines) if isinstance(records, Records) else rows


@register_splits("privacy-policy-words")
def privacy_policy_words_splits(seed: int = SPLIT_SEED) -> dict[str, list]:
    """`privacy_policy_splits` as instruction records (the label generated as yes / no), for a causal LM."""
    return {k: privacy_policy_instruction_records(v) if v else v for k, v in privacy_policy_splits(seed=seed).items()}


def boolq_instruction_records(records: Sequence[dict]) -> list[dict]:
    """BoolQ rows as ``{query: passage + question (BOOLQ_QUERY), response: "yes" | "no"}``: the answer as
    a word, for causal LMs (the NLG testbed; `balora eval --tasks boolq` scores it)."""
    rows = []
    for i, r in enumerate(records):
        where = record_where(records, i, "boolq")
        query = BOOLQ_QUERY.format(passage=str(field_value(r, "passage", where)).strip(),
                                   question=str(field_value(r, "question", where)).strip().rstrip("?"))
        rows.append({"query": query, "response": str(field_value(r, "label", where)).strip()})
    return Records(rows, records.source, records.lines) if isinstance(records, Records) else rows


@register_splits("boolq-words")
def boolq_words_splits(seed: int = SPLIT_SEED, validation_fraction: float = 0.1) -> dict[str, list]:
    """`boolq_splits` as instruction records (the answer generated as a word), for training a causal LM."""
    return {k: boolq_instruction_records(v) if v else v
            for k, v in boolq_splits(seed=seed, validation_fraction=validation_fraction).items()}
