"""Known, handled warnings of the libraries balora drives, silenced where balora calls them, and shown
again with ``-v`` (info-level logging of ``balora``).

Each entry is one exact message, silenced only around the calls that emit it; anything else, and every
warning of balora itself, is shown as usual:

* ``is_gradient_checkpointing`` (FutureWarning, transformers 5): PEFT reads the deprecated alias when it
  wraps a model; nothing to do on balora's side.
* ``gradient_checkpointing`` (FutureWarning): the deprecated ``TrainingArguments`` alias of
  ``activation_checkpointing``, which transformers still honours.
* ``'pin_memory' ... no accelerator`` (torch): pinned memory is meaningless on a CPU-only machine;
  `train_run` turns it off there unless ``training.dataloader_pin_memory`` is set.
* ``PiSSA changes the base weights ...`` (PEFT): its advice to convert the PiSSA adapter into plain LoRA,
  which balora does itself (``lora_converted/``).
* ``Unable to fetch remote file ... config.json`` / ``Could not find a config file ... vocabulary was not
  modified`` (PEFT, saving an adapter whose base is a hub id, offline): balora never resizes the vocabulary.
* ``Failed to load CPU gemm_4bit_forward from kernels-community`` (bitsandbytes' logger, whenever
  transformers imports it on a CPU with AVX-512 BF16): an optional faster kernel package is not installed;
  bitsandbytes uses its own; and DeepSpeed's ``Setting accelerator to CPU ...`` on a machine without a GPU.
  PEFT and accelerate import these packages when they are installed, so the filters that drop these two
  records are installed by ``import balora`` itself (``balora/__init__.py``), before anything imports them.
* transformers' load report (a logger warning): a fresh classification head is "MISSING" from the
  checkpoint by design, and ``balora export`` rebuilds one before it loads the trained head.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["KNOWN_WARNINGS", "quiet_transformers", "quiet_warnings", "verbose"]

#: (category, regular expression matched at the start of the message)
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed"),
    (FutureWarning, r"`gradient_checkpointing(_kwargs)?` is deprecated and will be removed in v6\. "
                    r"Use `activation_checkpointing"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (UserWarning, r"PiSSA changes the base weights of the model and should thus not be used with other adapters"),
    # PEFT's save_pretrained(save_embedding_layers="auto") looks the base model's config.json up on the hub
    # when the adapter records a hub id as its base; offline that fails, and its conclusion is right:
    # balora never resizes the vocabulary (saving with save_embedding_layers=False skips the lookup)
    (UserWarning, r"Unable to fetch remote file due to the following error .* - silently ignoring the lookup "
                  r"for the file config\.json in "),
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified"),
)


def verbose() -> bool:
    """Whether ``balora`` logs at info level (``balora -v``): then nothing is silenced."""
    return logging.getLogger("balora").isEnabledFor(logging.INFO)


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence `KNOWN_WARNINGS` inside the block (unless `verbose`)."""
    if verbose():
        yield
        return
    with warnings.catch_warnings():
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' logger at error level inside the block (unless `verbose`): its load report of a
    model whose fresh head is, by design, not in the checkpoint. Its progress bars stay."""
    if verbose():
        yield
        return
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)

