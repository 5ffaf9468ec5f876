"""Data for training runs: load records, build instruction-tuning / classification features, make splits.

* ``readers``: ``load_records`` (JSONL, JSON, CSV, Parquet, split directories, ``asset:NAME``, hub ids),
  ``Records`` (records that know their file and line) and ``DataError``.
* ``instruction``: prompt-masked causal-LM examples (``build_instruction_dataset``) and their collator.
* ``classification``: classification / regression examples, label maps and the collator.
* ``splits``: seeded splits, and the registry of datasets with their own splits (``dataset_splits``).
* ``balancing``: class (im)balance: ``imbalance_subsample``, ``balance_classes``, ``class_counts``.

Warnings are logged on the ``balora.training.data`` logger.
"""

from balora.training.data.balancing import (
                                            balance_classes,
                                            class_counts,
                                            imbalance_subsample,
                                            parse_ratio,
                                            sorted_labels,
)
from balora.training.data.classification import (
                                            ClassificationDataConfig,
                                            build_classification_dataset,
                                            classification_collator,
)
from balora.training.data.instruction import (
                                            ALPACA_PROMPT,
                                            IGNORE_INDEX,
                                            InstructionCollator,
                                            InstructionDataConfig,
                                            build_instruction_dataset,
)
from balora.training.data.readers import DataError, Records, available_splits, load_records
from balora.training.data.splits import (
                                            ASDIV_RESPONSE,
                                            BOOLQ_QUERY,
                                            DATASET_SPLITS,
                                            SPLIT_SEED,
                                            asdiv_instruction_records,
                                            asdiv_instruction_splits,
                                            asdiv_key,
                                            asdiv_splits,
                                            boolq_instruction_records,
                                            boolq_splits,
                                            boolq_words_splits,
                                            dataset_splits,
                                            dedupe_records,
                                            load_splits,
                                            privacy_policy_instruction_records,
                                            privacy_policy_splits,
                                            privacy_policy_words_splits,
                                            register_splits,
                                            rotten_tomatoes_splits,
                                            split_records,
)

__all__ = [
    "ALPACA_PROMPT", "ASDIV_RESPONSE", "BOOLQ_QUERY", "DATASET_SPLITS", "IGNORE_INDEX", "SPLIT_SEED",
    "ClassificationDataConfig", "DataError", "InstructionCollator", "InstructionDataConfig", "Records",
    "asdiv_instruction_records", "asdiv_instruction_splits", "asdiv_key", "asdiv_splits", "available_splits",
    "balance_classes", "boolq_instruction_records", "boolq_splits", "boolq_words_splits",
    "privacy_policy_instruction_records", "privacy_policy_splits", "privacy_policy_words_splits",
    "build_classification_dataset", "build_instruction_dataset",
    "class_counts", "classification_collator", "dataset_splits", "dedupe_records", "imbalance_subsample",
    "load_records", "load_splits", "parse_ratio", "register_splits", "rotten_tomatoes_splits",
    "sorted_labels", "split_records",
]
