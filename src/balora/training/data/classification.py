"""Sequence classification (and regression): records -> tokenised examples with label ids, and the collator."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balora.training.data.readers import DataError, field_value, record_where, source_label

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
        where = record_where(records, i, source_name)
        texts.append(str(field_value(rec, cfg.text_field, where, "text_field")))
        if cfg.text_pair_field:
            pairs.append(str(field_value(rec, cfg.text_pair_field, where, "text_pair_field")))
        raw.append(field_value(rec, cfg.label_field, where, "label_field"))
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
                raise DataError(f"{source_label(records, source_name)}: labels of mixed types cannot be "
                                "ordered; set data.labels") from None
            label_map = {lab: i for i, lab in enumerate(names)}
        labels = []
        for i, lab in enumerate(raw):
            key = lab if lab in label_map else str(lab)  # int labels vs data.labels strings
            if key not in label_map:
                raise DataError(f"{record_where(records, i, source_name)}: unknown label {lab!r} "
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
                       source_label(records, source_name), len(long_rows), len(texts), cfg.max_length)
    out = [{k: enc[k][i] for k in enc} | {"labels": labels[i]} for i in range(len(texts))]
    return out, (None if regression else label_map)


def classification_collator(tokenizer: Any, pad_to_multiple_of: int | None = None) -> Any:
    """``DataCollatorWithPadding`` returning torch tensors."""
    from transformers import DataCollatorWithPadding  # why: heavy; loading data alone should not import it

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of,
                                   return_tensors="pt")
