"""From model outputs to the task loss and the three raw regulariser values of one micro-batch.

The trainer weights and normalises them (λ schedules, gradient accumulation); this module only says
what each term is for NLG and NLU. Torch-only, like `regularizers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from balora.core import regularizers as R
from balora.core.config import BALoraConfig


@dataclass
class MicroBatchTerms:
    """Raw quantities of one micro-batch. ``task_sum`` is the *summed* task loss over ``count``
    items (valid tokens for NLG, labelled examples for NLU); the regularisers are per-item means."""

    task_sum: torch.Tensor
    count: torch.Tensor
    consistency: torch.Tensor | None = None
    diversity: torch.Tensor | None = None
    svd: torch.Tensor | None = None
    # Set by a path that combines the task loss, consistency and diversity with known weights in one pass
    # (`fused.nlg_cached_terms_from_hidden`): the differentiable weighted sum of those three; task_sum,
    # consistency and diversity are then detached values, for logging only.
    weighted: torch.Tensor | None = None


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t + 1] at position t, -100 at the last position: the causal-LM targets per logit row."""
    return F.pad(labels[:, 1:], (0, 1), value=R.IGNORE_INDEX)


def nlg_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: BALoraConfig | None,
    ref_logits: torch.Tensor | None = None,
) -> MicroBatchTerms:
    """Causal-LM cross-entropy (float32, summed over valid positions) and, when ``cfg`` is given,
    the consistency / diversity / SVD terms over exactly those positions."""
    mask = R.valid_positions(labels)
    targets = shifted_targets(labels)[mask]
    rows = student_logits[mask].float()
    terms = MicroBatchTerms(task_sum=F.cross_entropy(rows, targets, reduction="sum"), count=mask.sum())
    if cfg is None:
        return terms
    if ref_logits is not None:
        terms.consistency = R.nlg_consistency(rows, ref_logits[mask], None, cfg.temperature)
    terms.diversity = R.nlg_diversity(rows, None, cfg.top_k)
    terms.svd = R.svd_share(rows, cfg.svd_k, cfg.svd_norm)
    return terms


def nlu_terms(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    cfg: BALoraConfig | None,
    ref_logits: torch.Tensor | None = None,
    features: torch.Tensor | None = None,
) -> MicroBatchTerms:
    """Classification cross-entropy (or MSE for one output = regression), summed over the labelled
    examples, and the NLU regularisers (docs/method.md §4) on the logits or the pooled ``features``."""
    logits = student_logits.float()
    if logits.shape[-1] == 1:
        keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        task_sum = F.mse_loss(logits.reshape(-1), labels.float().reshape(-1), reduction="sum")
    else:
        keep = labels != R.IGNORE_INDEX
        task_sum = F.cross_entropy(logits, labels, reduction="sum", ignore_index=R.IGNORE_INDEX)
    terms = MicroBatchTerms(task_sum=task_sum, count=keep.sum())
    if cfg is None:
        return terms
    if ref_logits is not None:
        terms.consistency = R.nlu_consistency(logits, ref_logits, cfg.temperature, cfg.variant)
    if features is not None and features.dim() == 3:
        features = features[:, 0]  # a head fed with the whole sequence reads its first token
    div_input = features if cfg.nlu_diversity_target == "features" else logits
    svd_input = features if cfg.nlu_svd_target == "features" else logits
    if div_input is None or svd_input is None:
        raise ValueError("nlu target 'features' needs the classification head's input features")
    terms.diversity = R.nlu_diversity(div_input)
    terms.svd = R.svd_share(svd_input.float(), cfg.svd_k, cfg.svd_norm)
    return terms


def nlu_svd_is_degenerate(cfg: BALoraConfig, num_labels: int, batch_size: int) -> bool:
    """True when the spec's NLU SVD term on logits is constantly -1 (k ≥ min(N, D) ≥ rank)."""
    return cfg.nlu_svd_target == "logits" and cfg.svd_k >= min(num_labels, batch_size)
