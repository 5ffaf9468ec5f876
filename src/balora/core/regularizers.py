"""BA-LoRA's three output-space regularisers as pure functions (docs/method.md §3, §4).

This module imports only torch so that each term can be read, tested and reused on its own.
Every function:

* computes in float32 whatever the input dtype (bf16 logits lose too much in log-softmax),
* uses log-softmax, never ``softmax(...).log()`` (which gives ``-inf`` and then NaN),
* returns 0 -- attached to the graph, never NaN -- when nothing is valid or the batch has one example,
* is differentiable with respect to the *student* tensors only (reference logits are detached).

All terms are written so that *minimising* them is what BA-LoRA wants: the diversity and SVD terms
return the negated entropy / negated share.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

SvdNorm = Literal["frobenius", "nuclear"]


def _zero_like(t: torch.Tensor) -> torch.Tensor:
    # A zero that keeps the graph: backward through it gives zero gradients instead of an error.
    return t.float().sum() * 0.0


def valid_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean mask (B, T): logit row t is valid where ``labels[:, t + 1] != -100``.

    These are exactly the positions that the shifted causal-LM cross-entropy uses (response tokens;
    prompt and padding excluded). The last position predicts nothing and is never valid.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _select(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Valid rows of ``logits`` as an (M, V) float32 matrix."""
    if mask is None:
        rows = logits.reshape(-1, logits.shape[-1])
    else:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}")
        rows = logits[mask]
    return rows.float()


def kl_rows(ref_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row KL(softmax(ref / T) || softmax(student / T)) for (M, V) float32 rows."""
    ref_logp = F.log_softmax(ref_logits.detach().float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (ref_logp.exp() * (ref_logp - student_logp)).sum(-1)


def nlg_consistency(
    student_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float = 2.0,
) -> torch.Tensor:
    """L_CR = T² · mean over valid positions of KL(P_ref,t || P_student,t), both at temperature T."""
    student = _select(student_logits, mask)
    if student.shape[0] == 0:
        return _zero_like(student_logits)
    ref = _select(ref_logits, mask)
    return temperature**2 * kl_rows(ref, student, temperature).mean()


def entropy_rows(student_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per-row entropy of the softmax over the ``top_k`` largest logits (all logits when 0)."""
    logits = student_logits.float()
    if 0 < top_k < logits.shape[-1]:
        logits = logits.topk(top_k, dim=-1).values
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def nlg_diversity(student_logits: torch.Tensor, mask: torch.Tensor | None, top_k: int = 20) -> torch.Tensor:
    """L_DR = −mean over valid positions of the top-K renormalised entropy (K = 0: full vocabulary)."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    student = _select(student_logits, mask)
    if student.shape[0] == 0:
        return _zero_like(student_logits)
    return -entropy_rows(student, top_k).mean()


def share_of_top_k(singular_values: torch.Tensor, k: int, norm: SvdNorm) -> torch.Tensor:
    """(σ_1 + … + σ_k) / denominator for descending singular values; the denominator is ‖Z‖_F
    (= sqrt(Σσ²)) for "frobenius" and Σσ for "nuclear"."""
    if norm == "frobenius":
        denom = singular_values.square().sum().sqrt()
    elif norm == "nuclear":
        denom = singular_values.sum()
    else:
        raise ValueError(f"norm must be 'frobenius' or 'nuclear', got {norm!r}")
    # clamp instead of a Python-side check: no host sync; an all-zero matrix gives 0 / tiny = 0.
    return singular_values[:k].sum() / denom.clamp_min(torch.finfo(torch.float32).tiny)


def svd_share(matrix: torch.Tensor, k: int, norm: SvdNorm = "frobenius") -> torch.Tensor:
    """L_SVD = −(σ_1 + … + σ_k) / norm of any (M, N) matrix (float32, exact singular values).

    "frobenius" divides by ‖Z‖_F (the ratio can exceed 1, up to √k); "nuclear" by Σσ (ratio in (0, 1]).
    An empty or all-zero matrix gives 0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if matrix.dim() != 2:
        raise ValueError(f"svd_share expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        return _zero_like(matrix)
    sigma = torch.linalg.svdvals(matrix.float())
    return -share_of_top_k(sigma, k, norm)


def nlg_svd_share(
    student_logits: torch.Tensor, mask: torch.Tensor | None, k: int = 10, norm: SvdNorm = "frobenius"
) -> torch.Tensor:
    """L_SVD on the (M, V) matrix of valid student logits."""
    return svd_share(_select(student_logits, mask), k, norm)


def nlu_consistency(
    student_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    temperature: float = 1.0,
    variant: Literal["v6", "v1"] = "v6",
) -> torch.Tensor:
    """L_CR for (N, D) class logits.

    v6: T² · mean_n KL(softmax(Z_ref/T) || softmax(Z_student/T)). v1: MSE between the row-wise
    L2-normalised logits. Regression (D = 1): MSE between the outputs in both variants.
    """
    student = student_logits.float()
    ref = ref_logits.detach().float()
    if student.shape[0] == 0:
        return _zero_like(student_logits)
    if student.dim() == 1 or student.shape[-1] == 1:
        return F.mse_loss(student.reshape(-1), ref.reshape(-1))
    if variant == "v6":
        return temperature**2 * kl_rows(ref, student, temperature).mean()
    if variant == "v1":
        return F.mse_loss(F.normalize(student, dim=-1), F.normalize(ref, dim=-1))
    raise ValueError(f"variant must be 'v6' or 'v1', got {variant!r}")


def nlu_diversity(logits: torch.Tensor) -> torch.Tensor:
    """L_DR = (1/D) · Σ_{i≠j} C_ij² with C the column covariance (over the batch) of (N, D) logits."""
    z = logits.float()
    n, d = z.shape
    if n <= 1 or d <= 1:
        return _zero_like(logits)
    centred = z - z.mean(dim=0, keepdim=True)
    cov = centred.T @ centred / (n - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.square().sum() / d
