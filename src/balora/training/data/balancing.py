"""Class (im)balance of classification splits: seeded, nested subsampling to a minority:majority ratio, and
equal class counts for evaluation splits."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from typing import Any

from balora.training.data.readers import DataError, field_value, record_where, source_label, subset
from balora.training.data.splits import SPLIT_SEED


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
        label = field_value(rec, label_field, record_where(records, i, source_name), "label_field")
        groups.setdefault(label, []).append(i)
    return groups


def sorted_labels(labels: Iterable[Any]) -> list[Any]:
    """Labels in sorted order; mixed types (e.g. 0 and "0") are ordered by their text."""
    labels = list(labels)
    try:
        return sorted(labels)
    except TypeError:  # mixed types: their text still gives a stable order
        return sorted(labels, key=str)


def class_counts(records: Sequence[dict], label_field: str) -> dict[str, int]:
    """``{str(label): count}`` in sorted label order (JSON-ready)."""
    groups = _label_groups(records, label_field, None)
    return {str(lab): len(groups[lab]) for lab in sorted_labels(groups)}


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
    labels = sorted_labels(groups)
    name = source_label(records, source_name)
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
    return subset(records, sorted(kept)), info


def balance_classes(records: Sequence[dict], *, label_field: str, seed: int = SPLIT_SEED,
                    purpose: str = "balance", source_name: str | None = None
                    ) -> tuple[list[dict], dict[str, int]]:
    """Subsample every class to the smallest class's count (seeded; original order kept).

    ``purpose`` separates the random streams of different splits (e.g. "test", "validation")."""
    groups = _label_groups(records, label_field, source_name)
    labels = sorted_labels(groups)
    if not labels:
        return list(records), {}
    n = min(len(groups[lab]) for lab in labels)
    kept: list[int] = []
    for lab in labels:
        kept += _shuffled(groups[lab], f"{seed}/{purpose}/{lab!r}")[:n]
    return subset(records, sorted(kept)), {str(lab): n for lab in labels}
