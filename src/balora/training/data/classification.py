"""Sequence classification (and regression): records -> tokenised examples with label ids, and the collator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balora.training.data.readers import (
    DataError,
    check_label_kinds,
    field_value,
    record_where,
    source_label,
    text_value,
)

# The package's name, not this module's: it is the logger users and tests filter data warnings on.
logger = logging.getLogger("balora.training.data")


@dataclass
class ClassificationDataConfig:
    """Fields for sequence classification; ``labels`` fixes the label order (ids) if given."""

    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list[str] | None = None
    max_length: int = 128
    # a training label seen in fewer rows is refused (a typo, e.g. "frseh", would become a class);
    # 0 or 1: no minimum. Run configs: data.min_label_count (default 2).
    min_label_count: int = 1


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
    texts, pairs, raw = classification_fields(records, cfg, source_name)
    # Regression: numeric labels with at least one float (0 / 0.5 / 1 is not three classes).
    regression = label_map is None and cfg.labels is None and is_regression(raw)
    if regression:
        labels: list = [float(x) for x in raw]
    else:
        if label_map is None:
            if cfg.labels is None:
                check_label_counts(records, raw, cfg.min_label_count, source_name, cfg.label_field)
            names = list(cfg.labels) if cfg.labels is not None else sorted(set(raw))
            label_map = {lab: i for i, lab in enumerate(names)}
        labels = []
        for i, lab in enumerate(raw):
            key = lab if lab in label_map else str(lab)  # int labels vs data.labels strings
            if key not in label_map:
                raise DataError(f"{record_where(records, i, source_name)}: unknown label {lab!r} "
                                f"(known: {', '.join(map(str, label_map))}); the classes are the "
                                f"labels of the training split (field {cfg.label_field!r}, data.label_field)")
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
                       source_label(records, source_name), len(long_rows), len(texts), cfg.max_length)
    out = [{k: enc[k][i] for k in enc} | {"labels": labels[i]} for i in range(len(texts))]
    return out, (None if regression else label_map)


def classification_fields(records: Sequence[dict], cfg: ClassificationDataConfig,
                          source_name: str | None = None) -> tuple[list[str], list[str], list[Any]]:
    """(texts, text pairs, labels) of ``records``, checked: texts are non-empty strings and labels are
    strings, numbers or booleans, all of one kind; a ``DataError`` names the file, line and field."""
    texts, pairs, raw = [], [], []
    for i, rec in enumerate(records):
        where = record_where(records, i, source_name)
        texts.append(text_value(rec, cfg.text_field, where, "text_field"))
        if cfg.text_pair_field:
            pairs.append(text_value(rec, cfg.text_pair_field, where, "text_pair_field"))
        raw.append(field_value(rec, cfg.label_field, where, "label_field"))
    check_label_kinds(records, raw, source_name, cfg.label_field)
    return texts, pairs, raw


def is_regression(labels: Sequence[Any]) -> bool:
    """Numeric labels with at least one float (0 / 0.5 / 1 is not three classes): a regression target."""
    return (all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in labels)
            and any(isinstance(x, float) for x in labels))


def check_label_counts(records: Sequence[dict], labels: Sequence[Any], min_count: int,
                       source_name: str | None = None, label_field: str = "label") -> None:
    """A training split for classification: at least two classes, and each label in at least
    ``min_count`` rows (a rarer one is most likely a typo); else a ``DataError`` with the file, the
    label, where it occurs and the counts. Regression targets (see `is_regression`) are not checked."""
    if not labels or is_regression(labels):
        return
    counts: dict[Any, int] = {}
    first: dict[Any, int] = {}
    for i, lab in enumerate(labels):
        counts[lab] = counts.get(lab, 0) + 1
        first.setdefault(lab, i)
    name = source_label(records, source_name)
    shown = ", ".join(f"{lab!r}: {n}" for lab, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if len(counts) < 2:
        (lab,) = counts
        raise DataError(f"{name}: every one of the {len(labels)} training rows has label {lab!r} "
                        f"(field {label_field!r}, data.label_field): a classifier needs at least two "
                        "classes; check data.label_field and data.source (and data.train_limit, which "
                        "keeps the first N rows)")
    rare = [lab for lab, n in counts.items() if n < min_count]
    if rare:
        lab = min(rare, key=lambda x: (counts[x], first[x]))
        rows = "row" if counts[lab] == 1 else "rows"
        raise DataError(f"{record_where(records, first[lab], source_name)}: label {lab!r} occurs in only "
                        f"{counts[lab]} training {rows} of {name} (counts: {shown}); a class needs at least "
                        f"data.min_label_count={min_count} rows: fix the label, or set "
                        "data.min_label_count=0 to train on it anyway")


def classification_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
    """``DataCollatorWithPadding`` returning torch tensors."""
    from transformers import DataCollatorWithPadding  # why: heavy; loading data alone should not import it

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                   return_tensors="pt")
