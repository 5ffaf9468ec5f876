"""Configuration dataclasses: what the regularisers do (`BALoraConfig`) and which adapter to build
(`AdapterConfig`). Defaults are the paper's (spec §3, §4, §6); a field left at ``None`` takes the
default of its task and variant when the object is built, so a printed config shows the values used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Task = Literal["nlg", "nlu"]
Method = Literal["lora", "pissa", "ba-lora", "lora-reg", "dora", "rslora"]

METHODS: tuple[str, ...] = ("lora", "pissa", "ba-lora", "lora-reg", "dora", "rslora")
#: Methods whose training loss carries the three regularisers.
REGULARISED_METHODS: tuple[str, ...] = ("ba-lora", "lora-reg")
#: Methods whose adapter starts from the principal singular triplets of W.
PISSA_METHODS: tuple[str, ...] = ("pissa", "ba-lora")

# (λ1, λ2, λ3), temperature, top-K, k, SVD normalisation -- spec §3, §4 and the v1 column of §6.
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
    """A configuration value is invalid; the message names the field and what is allowed."""


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class BALoraConfig:
    """The BA-LoRA loss ``L = L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD``.

    Fields left at ``None`` take the paper's default for ``task`` and ``variant`` (spec §3, §4, §6).
    """

    task: Task = "nlg"
    variant: Literal["v6", "v1"] = "v6"
    lambda_consistency: float | None = None
    lambda_diversity: float | None = None
    lambda_svd: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    svd_k: int | None = None
    svd_norm: Literal["frobenius", "nuclear"] | None = None
    # NLU only: what the diversity and SVD terms look at. The spec's SVD term on (N, D≤3) logits with
    # k = 5 is constant (no gradient); "features" applies it to the pooled features instead.
    nlu_diversity_target: Literal["logits", "features"] = "logits"
    nlu_svd_target: Literal["logits", "features"] = "logits"
    # "constant": fixed λ. "iclr2026": the authors' ICLR 2026 script -- cosine λ1 → 0.1·λ1, λ2 and λ3
    # off for the first 20 % of optimiser steps, then a linear ramp over 5 %.
    schedule: Literal["constant", "iclr2026"] = "constant"
    # "snapshot": reference outputs from the same model with its initial trainable tensors switched in
    # (no second copy of the base weights). "teacher": an explicit frozen model passed to the trainer.
    reference: Literal["snapshot", "teacher"] = "snapshot"

    def __post_init__(self) -> None:
        owner = "BALoraConfig"
        _check_choice(owner, "task", self.task, ("nlg", "nlu"))
        _check_choice(owner, "variant", self.variant, ("v6", "v1"))
        for name, value in _DEFAULTS[(self.task, self.variant)].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{owner}.{name}: must be a finite number >= 0, got {value!r}")
            setattr(self, name, float(value))
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) or not self.temperature > 0:
            raise ConfigError(f"{owner}.temperature: must be a number > 0, got {self.temperature!r}")
        self.temperature = float(self.temperature)
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ConfigError(f"{owner}.top_k: must be an integer >= 0 (0 = full vocabulary), got {self.top_k!r}")
        if not isinstance(self.svd_k, int) or isinstance(self.svd_k, bool) or self.svd_k < 1:
            raise ConfigError(f"{owner}.svd_k: must be an integer >= 1, got {self.svd_k!r}")
        _check_choice(owner, "svd_norm", self.svd_norm, ("frobenius", "nuclear"))
        _check_choice(owner, "nlu_diversity_target", self.nlu_diversity_target, ("logits", "features"))
        _check_choice(owner, "nlu_svd_target", self.nlu_svd_target, ("logits", "features"))
        _check_choice(owner, "schedule", self.schedule, ("constant", "iclr2026"))
        _check_choice(owner, "reference", self.reference, ("snapshot", "teacher"))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "BALoraConfig":
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
    def lambdas(self) -> tuple[float, float, float]:
        return (self.lambda_consistency, self.lambda_diversity, self.lambda_svd)  # type: ignore[return-value]

    def lambdas_at(self, step: int, total_steps: int) -> tuple[float, float, float]:
        """λ1, λ2, λ3 at optimiser step ``step`` of ``total_steps`` under the configured schedule."""
        l1, l2, l3 = self.lambdas
        if self.schedule == "constant" or total_steps <= 0:
            return l1, l2, l3
        progress = min(max(step / total_steps, 0.0), 1.0)
        cosine = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
        ramp = min(max((progress - 0.20) / 0.05, 0.0), 1.0)
        return l1 * cosine, l2 * ramp, l3 * ramp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AdapterConfig:
    """Which adapter to build and where (see `balora.core.adapters.build_peft_model`)."""

    method: Method = "ba-lora"
    r: int = 16
    alpha: float | None = None  # None: alpha = r (scale 1), as in the paper's runs
    dropout: float = 0.0
    target_modules: list[str] | None = None  # None: per-architecture default
    # None: exact SVD for PiSSA (deterministic). N: PEFT's randomised "pissa_niter_N", seeded by init_seed.
    pissa_niter: int | None = None
    # Seeds the random adapter parts (LoRA's A, pissa_niter's sketch). None: `balora train` uses
    # training.seed, so that a seed sweep varies the initialisation too; build_peft_model uses 0.
    init_seed: int | None = None
    modules_to_save: list[str] | None = None  # None: the classification head for NLU, nothing for NLG

    def __post_init__(self) -> None:
        owner = "AdapterConfig"
        _check_choice(owner, "method", self.method, METHODS)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"{owner}.r: must be an integer >= 1, got {self.r!r}")
        if self.alpha is None:
            self.alpha = float(self.r)
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"{owner}.alpha: must be a number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{owner}.dropout: must be in [0, 1), got {self.dropout!r}")
        if self.pissa_niter is not None and (not isinstance(self.pissa_niter, int) or self.pissa_niter < 1):
            raise ConfigError(f"{owner}.pissa_niter: must be None (exact SVD) or an integer >= 1, got {self.pissa_niter!r}")
        for name in ("target_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{owner}.{name}: must be a list of module names, got {value!r}")

    @property
    def regularised(self) -> bool:
        return self.method in REGULARISED_METHODS

    @property
    def pissa(self) -> bool:
        return self.method in PISSA_METHODS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
