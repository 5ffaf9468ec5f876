"""Instruction tuning: records -> causal-LM examples with the prompt masked out, and their collator.

* Examples are ``prompt + response + EOS``; labels are -100 on the prompt (and on padding), so the loss
  covers the response and the EOS.  Prompt and response are tokenised separately (chat templates: the
  rendered conversation, checked to start with the prompt's tokens), so the label boundary is exact.
* Truncation to ``max_length`` cuts the response's end (and then no EOS is added: the answer did not end
  there).  An example whose prompt leaves no room for one response token is *dropped*: cutting the
  prompt's left side would remove the instruction header or the question's start.  Both are counted in
  the returned stats and logged as warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from balora.training.data.readers import DataError, record_where, source_label, text_value

# The package's name, not this module's: it is the logger users and tests filter data warnings on.
logger = logging.getLogger("balora.training.data")

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{query}\n\n"
                 "### Response:\n")
IGNORE_INDEX = -100


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


def instruction_fields(records: Sequence[dict], cfg: InstructionDataConfig,
                       source_name: str | None = None) -> list[tuple[str, str]]:
    """(query, response) of each record, the context (``cfg.context_field``, may be empty) prepended to
    the query with a newline. Query and response must be non-empty strings, the context a string; a
    ``DataError`` names the file, the line and the field."""
    out = []
    for i, rec in enumerate(records):
        where = record_where(records, i, source_name)
        query = text_value(rec, cfg.query_field, where, "query_field")
        response = text_value(rec, cfg.response_field, where, "response_field")
        if cfg.context_field:
            query = f"{text_value(rec, cfg.context_field, where, 'context_field', allow_empty=True)}\n{query}"
        out.append((query, response))
    return out


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
    for i, (query, response) in enumerate(instruction_fields(records, cfg, source_name)):
        where = record_where(records, i, source_name)
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
        pairs.append(_chat_split(first, second, eos, record_where(records, i, source_name)) if chat
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
    name = source_label(records, source_name)
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
