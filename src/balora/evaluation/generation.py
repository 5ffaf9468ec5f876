"""Batched generation for evaluation, and loading a model to evaluate.

``generate`` runs ``model.generate`` (KV cache) on batches of prompts sorted by token length
(restoring the caller's order afterwards), left-padded so that every row's last prompt token sits
at the same position, greedy or sampled (``n_samples`` per prompt, temperature, top-p, seeded),
and cuts every completion at its first stop string. It works on a plain, a PEFT or a merged model.

Stop strings are checked by our own stopping criterion on the *completion* only. transformers'
``stop_strings`` (``StopStringCriteria``) is supported in transformers 5 but also matches a stop
string that starts inside the prompt (``"\\n#"`` when the prompt ends in a newline and the model
writes ``#``), which would end a HumanEval completion after its first comment token.

vLLM would be far faster on a GPU; it is out of scope (CPU machines here, and PiSSA adapters would
have to be merged first).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteriaList

from balora.assets import resolve
from balora.core.export import METADATA_FILE, load_trained
from balora.training.data import ALPACA_PROMPT
from balora.training.run import load_base_model, load_tokenizer
from balora.training.run_config import load_run_config

__all__ = [
    "ALPACA_STOP", "HUMANEVAL_STOP", "EvalModel", "GenerationResult", "GenerationSettings",
    "format_prompt", "generate", "load_for_eval", "load_run_base", "truncate_at_stop",
]

# Codex paper (Chen et al. 2021): a completion ends where the next top-level statement begins.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# A model trained on the Alpaca format ends with EOS; an untuned one tends to start a new
# "### Instruction:" block instead, which is never part of the answer.
ALPACA_STOP = ("\n### ",)


@dataclass
class GenerationSettings:
    """How to generate. ``temperature == 0`` is greedy decoding (then ``n_samples`` must be 1).
    ``batch_size`` counts sequences per forward pass (prompts × samples)."""

    max_new_tokens: int = 256
    batch_size: int = 8
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    add_special_tokens: bool = True  # False for prompts rendered by a chat template

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_samples < 1:
            raise ValueError("max_new_tokens, batch_size and n_samples must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got "
                             f"{self.temperature}, {self.top_p}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives n identical samples; "
                             "set temperature > 0 for n_samples > 1")


@dataclass
class GenerationResult:
    """``completions[i][j]``: sample j for prompt i (stop strings cut off); ``num_tokens`` the
    tokens generated for it (EOS or the token that completed a stop string included)."""

    completions: list[list[str]]
    num_tokens: list[list[int]]
    wall_seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(map(sum, self.num_tokens))

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def throughput(self) -> dict[str, float]:
        return {"generated_tokens": self.generated_tokens,
                "wall_seconds": round(self.wall_seconds, 3),
                "tokens_per_second": round(self.tokens_per_second, 3)}


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class _CompletionStop:
    """Stopping criterion: a row is done once its completion (not the prompt) holds a stop
    string. Records the generated length at which each row stopped, for token counts."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_len: int, rows: int) -> None:
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len
        self.stopped_at: list[int | None] = [None] * rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_len:]
        texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False)
        done = []
        for row, text in enumerate(texts):
            hit = any(s in text for s in self.stop)
            if hit and self.stopped_at[row] is None:
                self.stopped_at[row] = generated.shape[1]
            done.append(hit)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str],
             settings: GenerationSettings | None = None,
             progress: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Complete every prompt ``settings.n_samples`` times (see the module doc); ``progress``
    is called with (prompts done, prompts) after each batch.

    Sampling is seeded per batch (``seed + batch index``) without touching the global RNG, so a
    rerun with the same prompts, settings and batch size gives the same samples.
    """
    s = settings or GenerationSettings()
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = tokenizer(list(prompts), add_special_tokens=s.add_special_tokens)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("an empty prompt has no token to condition on")
    # Longest first: similar lengths share a batch (little padding) and an out-of-memory error,
    # if any, comes on the first batch.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    per_batch = max(1, s.batch_size // s.n_samples)
    config = GenerationConfig(
        max_new_tokens=s.max_new_tokens, do_sample=s.temperature > 0,
        temperature=s.temperature if s.temperature > 0 else None,
        top_p=s.top_p if s.temperature > 0 else None, top_k=0 if s.temperature > 0 else None,
        num_return_sequences=s.n_samples, pad_token_id=pad_id, eos_token_id=eos,
    )
    device = _model_device(model)
    completions: list[list[str]] = [[] for _ in prompts]
    counts: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    for b, start in enumerate(range(0, len(order), per_batch)):
        idx = order[start:start + per_batch]
        ids, mask = _left_pad([encoded[i] for i in idx], pad_id, device)
        stopper = _CompletionStop(tokenizer, s.stop, ids.shape[1], len(idx) * s.n_samples)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                  "generation_config": config}
        if s.stop:
            kwargs["stopping_criteria"] = StoppingCriteriaList([stopper])
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s.seed + b)
            out = model.generate(**kwargs)
        generated = out[:, ids.shape[1]:].tolist()
        for row, tokens in enumerate(generated):
            n = len(tokens)
            for j, t in enumerate(tokens):
                if t in eos:
                    n = j + 1
                    break
            if stopper.stopped_at[row] is not None:
                n = min(n, stopper.stopped_at[row])
            text = tokenizer.decode(tokens[:n], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)
            prompt_i = idx[row // s.n_samples]
            completions[prompt_i].append(truncate_at_stop(text, s.stop))
            counts[prompt_i].append(n)
        if progress is not None:
            progress(min(start + per_batch, len(order)), len(order))
    if was_training:
        model.train()
    return GenerationResult(completions, counts, time.perf_counter() - started)


# ---------------------------------------------------------------- prompts

def format_prompt(query: str, style: str = "alpaca", tokenizer: Any = None) -> str:
    """A math/instruction prompt: ``alpaca`` (the NLG training format of ``balora.training.data``),
    ``chat`` (the tokenizer's chat template, one user turn) or ``plain`` (the query alone)."""
    if style == "alpaca":
        return ALPACA_PROMPT.format(query=query)
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
    if style == "plain":
        return query
    raise ValueError(f"unknown prompt style {style!r}; use alpaca, chat or plain")


# ---------------------------------------------------------------- loading

@dataclass
class EvalModel:
    """A model ready for evaluation. ``load_base`` (runs and adapters only) loads the untouched
    pre-trained model the adapter was trained on, e.g. to measure forgetting."""

    model: Any
    tokenizer: Any
    spec: str
    kind: str  # "run" | "adapter" | "model"
    base_spec: str | None = None
    load_base: Callable[[], EvalModel] | None = field(default=None, repr=False)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _finish_tokenizer(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # generate() pads by hand, but anything else that pads for generation must pad on the left.
    tokenizer.padding_side = "left"
    return tokenizer


def _load_plain(spec: str, dtype: str, device: torch.device) -> EvalModel:
    path = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except OSError as error:
        raise OSError(f"{spec!r} is not a run directory (config.yaml + adapter/), a PEFT adapter "
                      f"directory, a model directory or a reachable hub id: {error}") from error
    return EvalModel(model.to(device).eval(), _finish_tokenizer(tokenizer), spec, "model")


def _run_config(run: Path) -> Any:
    cfg = load_run_config(run / "config.yaml")
    if cfg.model.task != "nlg":
        raise ValueError(f"{run}: a {cfg.model.task} (classification) run; these evaluations "
                         "need a causal LM (model.task: nlg)")
    return cfg


def _base_loader(cfg: Any, device: torch.device) -> Callable[[], EvalModel]:
    def load_base() -> EvalModel:
        return EvalModel(load_base_model(cfg).to(device).eval(),
                         _finish_tokenizer(load_tokenizer(cfg)), cfg.model.name, "model")
    return load_base


def load_run_base(run: str | Path, *, device: str | None = None) -> EvalModel:
    """The untouched base model of a run directory (as its config loads it), for evaluation."""
    dev = torch.device(device) if device else _default_device()
    return _base_loader(_run_config(Path(run)), dev)()


def _load_run(run: Path, device: torch.device) -> EvalModel:
    cfg = _run_config(run)
    load_base = _base_loader(cfg, device)
    model = load_trained(load_base_model(cfg), run / "adapter").to(device).eval()
    return EvalModel(model, _finish_tokenizer(load_tokenizer(cfg)), str(run), "run",
                     cfg.model.name, load_base)


def _load_adapter(adapter: Path, dtype: str, device: torch.device) -> EvalModel:
    # balora's own metadata keeps the spec as configured (asset:NAME); PEFT's field holds the
    # path the base was loaded from, which may be machine-specific.
    meta = adapter / METADATA_FILE
    base_spec = json.loads(meta.read_text()).get("base_model") if meta.is_file() else None
    base_spec = base_spec or json.loads((adapter / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    if not base_spec:
        raise ValueError(f"{adapter}: neither {METADATA_FILE} nor adapter_config.json names the "
                         "base model")
    base = _load_plain(base_spec, dtype, device)
    model = load_trained(base.model, adapter).to(device).eval()
    tokenizer = base.tokenizer
    if (adapter / "tokenizer_config.json").is_file():
        tokenizer = _finish_tokenizer(AutoTokenizer.from_pretrained(adapter))
    return EvalModel(model, tokenizer, str(adapter), "adapter", base_spec,
                     lambda: _load_plain(base_spec, dtype, device))


def load_for_eval(spec: str, *, dtype: str = "float32", device: str | None = None) -> EvalModel:
    """Load what ``spec`` names, for evaluation (eval mode, on ``device``, default CUDA if present):

    * a run directory (``config.yaml`` + ``adapter/``): the base model from its config with the
      trained adapter (``balora.core.export.load_trained``), in the run's dtype;
    * a PEFT adapter directory (``adapter_config.json``): loaded onto its base model;
    * a model directory, a hub id or ``asset:NAME``: ``AutoModelForCausalLM``.
    """
    dev = torch.device(device) if device else _default_device()
    path = Path(spec)
    if (path / "config.yaml").is_file() and (path / "adapter").is_dir():
        return _load_run(path, dev)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return _load_adapter(path, dtype, dev)
    return _load_plain(spec, dtype, dev)
