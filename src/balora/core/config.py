"""Configuration dataclasses: what the regularisers do (`BALoraConfig`) and which adapter to build
(`AdapterConfig`). Defaults are the paper's (docs/method.md §3, §4, §6); a field left at ``None`` takes the
default of its task and variant when the object is built, so a printed config shows the values used.
Every field is documented where it is declared (``dataclasses.fields(BALoraConfig)[i].metadata["help"]``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

Task = Literal["nlg", "nlu"]
Method = Literal["lora", "pissa", "ba-lora", "lora-reg", "dora", "rslora"]

METHODS: tuple[str, ...] = ("lora", "pissa", "ba-lora", "lora-reg", "dora", "rslora")
#: Methods whose training loss carries the three regularisers.
REGULARISED_METHODS: tuple[str, ...] = ("ba-lora", "lora-reg")
#: Methods whose adapter starts from the principal singular triplets of W.
PISSA_METHODS: tuple[str, ...] = ("pissa", "ba-lora")

# (λ1, λ2, λ3), temperature, top-K, k, SVD normalisation -- docs/method.md §3, §4 and the v1 column of §6.
_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("nlg", "v6"): dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005,
                        temperature=2.0, top_k=20, svd_k=10, svd_norm="frobenius"),
    ("nlg", "v1"): dict(lambda_consistency=1e-4, lambda_diversity=3e-4, lambda_svd=1e-4,
                        temperature=1.0, top_k=0, svd_k=10, svd_norm="nuclear"),
    ("nlu", "v6"): dict(lambda_consistency=0.15, lambda_diversity=0.03, lambda_svd=0.03,
                        temperature=1.0, top_k=0, svd_k=5, svd_norm="nuclear"),
    ("nlu", "v1"): dict(lambda_consistency=1e-4, lambda_diversity=4e-4, lambda_svd=1e-4,
                        temperature=1.0, top_k=0, svd_k=5, svd_norm="nuclear"),
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and what is allowed.

    Raised by a dataclass, the message names ``Class.option``; `located` re-labels it with where the
    option sits in a YAML run configuration (``adapter.r``) without parsing the message."""

    def __init__(self, message: str, *, option: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.option = option
        self.detail = detail

    @classmethod
    def invalid(cls, owner: str, option: str, detail: str) -> ConfigError:
        return cls(f"{owner}.{option}: {detail}", option=option, detail=detail)

    def located(self, path: str) -> ConfigError:
        """The same error for the option at ``path`` (e.g. ``"adapter.r"``); unchanged if it names none."""
        if self.option is None or self.detail is None:
            return self
        return ConfigError(f"{path}: {self.detail}", option=self.option, detail=self.detail)


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError.invalid(owner, name, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Lambdas(NamedTuple):
    """The three regulariser weights, named as the `BALoraConfig` fields they come from."""

    consistency: float
    diversity: float
    svd: float


def _opt(default: Any, help: str) -> Any:  # noqa: A002 (PEFT's metadata key is "help")
    return field(default=default, metadata={"help": help})


@dataclass
class BALoraConfig:
    """The BA-LoRA loss ``L = L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD`` (docs/method.md §3, §4, §6).

    Fields left at ``None`` take the paper's default for ``task`` and ``variant`` when the object is
    built, so a printed or saved config shows the values used.
    """

    task: Task = _opt("nlg", "nlg: causal LM (terms on the valid shifted token positions); "
                             "nlu: sequence classification (terms on the class logits of the batch).")
    variant: Literal["v6", "v1"] = _opt("v6", "Which published formulation: v6 (paper v6+, default) or v1 "
                                              "(paper v1-v5: MSE / untempered KL, full entropy, nuclear norm).")
    lambda_consistency: float | None = _opt(None, "λ1, weight of the consistency term L_CR (KL to the pre-trained "
                                                  "model). Default NLG 0.025, NLU 0.15.")
    lambda_diversity: float | None = _opt(None, "λ2, weight of the diversity term L_DR. Default NLG 0.005, NLU 0.03.")
    lambda_svd: float | None = _opt(None, "λ3, weight of the singular-value-share term L_SVD. "
                                          "Default NLG 0.005, NLU 0.03.")
    temperature: float | None = _opt(None, "T of the consistency KL (scaled by T²). Default NLG 2, NLU 1.")
    top_k: int | None = _opt(None, "K of the NLG diversity term: entropy over the K largest logits, "
                                   "renormalised; 0 = the full vocabulary. Default 20 (v1: 0).")
    svd_k: int | None = _opt(None, "k: how many top singular values L_SVD rewards. Default NLG 10, NLU 5.")
    svd_norm: Literal["frobenius", "nuclear"] | None = _opt(
        None, "Denominator of the SVD share: frobenius (‖Z‖_F, NLG v6) or nuclear (Σσ, NLU and v1).")
    nlu_diversity_target: Literal["logits", "features"] = _opt(
        "logits", "NLU only: the diversity term on the class logits (as specified) or on the pooled features "
                  "that feed the classification head.")
    nlu_svd_target: Literal["logits", "features"] = _opt(
        "logits", "NLU only: the SVD term on the class logits (as specified; constant, hence no gradient, "
                  "when svd_k >= the number of classes) or on the pooled features.")
    schedule: Literal["constant", "iclr2026"] = _opt(
        "constant", "constant: fixed λ. iclr2026 (the authors' ICLR 2026 script): cosine λ1 → 0.1·λ1; λ2, λ3 "
                    "off for the first 20 % of optimiser steps, then a linear ramp over 5 %.")
    reference: Literal["snapshot", "teacher"] = _opt(
        "snapshot", "Where the pre-trained outputs come from. snapshot: the same model with its initial "
                    "trainable tensors switched in (no second copy of the weights). teacher: a frozen model "
                    "passed to the trainer as reference_model.")

    def __post_init__(self) -> None:
        owner = "BALoraConfig"
        _check_choice(owner, "task", self.task, ("nlg", "nlu"))
        _check_choice(owner, "variant", self.variant, ("v6", "v1"))
        for name, value in _DEFAULTS[(self.task, self.variant)].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError.invalid(owner, name, f"must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or not self.temperature > 0:
            raise ConfigError.invalid(owner, "temperature", f"must be a finite number > 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError.invalid(owner, "top_k", f"must be an integer >= 0 (0 = full vocabulary), "
                                                      f"got {self.top_k!r}")
        if not _is_int(self.svd_k) or self.svd_k < 1:
            raise ConfigError.invalid(owner, "svd_k", f"must be an integer >= 1, got {self.svd_k!r}")
        _check_choice(owner, "svd_norm", self.svd_norm, ("frobenius", "nuclear"))
        _check_choice(owner, "nlu_diversity_target", self.nlu_diversity_target, ("logits", "features"))
        _check_choice(owner, "nlu_svd_target", self.nlu_svd_target, ("logits", "features"))
        _check_choice(owner, "schedule", self.schedule, ("constant", "iclr2026"))
        _check_choice(owner, "reference", self.reference, ("snapshot", "teacher"))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BALoraConfig:
        """Named presets: ``"paper"`` (the v6 defaults), ``"paper-v1"`` and ``"iclr2026"`` (schedules on)."""
        presets: dict[str, dict[str, Any]] = {
            "paper": {},
            "paper-v1": {"variant": "v1"},
            "iclr2026": {"schedule": "iclr2026"},
        }
        if name not in presets:
            raise ConfigError(f"BALoraConfig.preset: unknown preset {name!r}; known: {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

    @property
    def lambdas(self) -> Lambdas:
        """(λ1, λ2, λ3) as configured: ``lambdas.consistency`` is ``lambda_consistency``, and so on."""
        return Lambdas(self.lambda_consistency, self.lambda_diversity, self.lambda_svd)  # type: ignore[arg-type]

    def lambdas_at(self, step: int, total_steps: int) -> Lambdas:
        """λ1, λ2, λ3 at optimiser step ``step`` of ``total_steps`` under the configured schedule."""
        l1, l2, l3 = self.lambdas
        if self.schedule == "constant" or total_steps <= 0:
            return Lambdas(l1, l2, l3)
        progress = min(max(step / total_steps, 0.0), 1.0)
        cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        ramp = min(max((progress - 0.20) / 0.05, 0.0), 1.0)
        return Lambdas(l1 * cosine, l2 * ramp, l3 * ramp)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: ``AdapterConfig.target_modules`` for every linear layer but the output layer / classification head (PEFT's).
ALL_LINEAR = "all-linear"


def _check_target_modules(owner: str, value: Any) -> None:
    """None, a list of module names, ``"all-linear"``, or a regular expression (PEFT's full match)."""
    if value is None:
        return
    if isinstance(value, str):
        if not value.strip():
            raise ConfigError.invalid(owner, "target_modules", "must not be empty: a list of module names, "
                                                               f"{ALL_LINEAR!r}, or a regular expression")
        if value.lower() == ALL_LINEAR:
            return
        try:
            re.compile(value)
        except re.error as error:
            raise ConfigError.invalid(owner, "target_modules", f"{value!r} is not a valid regular expression "
                                                               f"({error}); give a list of module names, "
                                                               f"{ALL_LINEAR!r}, or a regular expression") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError.invalid(owner, "target_modules", f"must be a list of module names, {ALL_LINEAR!r}, or a "
                                                           f"regular expression (a string), got {value!r}")


@dataclass
class AdapterConfig:
    """Which adapter to build and where (see `balora.core.adapters.build_peft_model`)."""

    method: Method = _opt("ba-lora", "lora (PEFT's default init: Kaiming A, zero B), pissa, ba-lora (PiSSA + the "
                                     "regularisers), lora-reg (the regularisers on plain LoRA), dora, rslora.")
    r: int = _opt(16, "Adapter rank.")
    alpha: float | None = _opt(None, "LoRA alpha (scale alpha/r). None: alpha = r (scale 1), as in the paper.")
    dropout: float = _opt(0.0, "LoRA dropout, in [0, 1).")
    target_modules: list[str] | str | None = _opt(
        None, "Modules to adapt, with PEFT's matching: a list of names (each matches a module named so, or whose "
              "name ends in '.NAME'); 'all-linear' (every linear layer but the output layer / classification "
              "head); any other string is a regular expression that must match a whole module name. None: the "
              "attention and MLP projections of Llama-style models, every linear layer but the output layer / "
              "classification head otherwise.")
    pissa_niter: int | None = _opt(
        None, "PiSSA only. None: exact SVD (deterministic). N: PEFT's randomised pissa_niter_N, seeded by "
              "init_seed (minutes instead of an hour on a 7B model).")
    init_seed: int | None = _opt(
        None, "Seeds the random adapter parts (LoRA's A, pissa_niter's sketch). None: `balora train` uses "
              "training.seed, so a seed sweep varies the initialisation too; build_peft_model uses 0.")
    modules_to_save: list[str] | None = _opt(
        None, "Extra modules trained in full and saved with the adapter. None: the classification head for "
              "NLU, nothing for NLG.")

    def __post_init__(self) -> None:
        owner = "AdapterConfig"
        _check_choice(owner, "method", self.method, METHODS)
        if not _is_int(self.r) or self.r < 1:
            raise ConfigError.invalid(owner, "r", f"must be an integer >= 1, got {self.r!r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not _is_number(self.alpha) or not math.isfinite(self.alpha) or not self.alpha > 0:
            raise ConfigError.invalid(owner, "alpha", f"must be a finite number > 0 (true/false is not a number), "
                                                      f"got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError.invalid(owner, "dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.pissa_niter is not None and (not _is_int(self.pissa_niter) or self.pissa_niter < 1):
            raise ConfigError.invalid(owner, "pissa_niter", f"must be None (exact SVD) or an integer >= 1, "
                                                            f"got {self.pissa_niter!r}")
        if self.init_seed is not None and not _is_int(self.init_seed):
            raise ConfigError.invalid(owner, "init_seed", f"must be None or an integer, got {self.init_seed!r}")
        _check_target_modules(owner, self.target_modules)
        value = self.modules_to_save
        if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
            raise ConfigError.invalid(owner, "modules_to_save", f"must be a list of module names, got {value!r}")

    @property
    def regularised(self) -> bool:
        """Whether the training loss carries the three regularisers (ba-lora, lora-reg)."""
        return self.method in REGULARISED_METHODS

    @property
    def pissa(self) -> bool:
        """Whether the adapter starts from the principal singular triplets of W (pissa, ba-lora)."""
        return self.method in PISSA_METHODS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
