"""Singular-value spectra and effective rank (numpy only, so it is easy to check by hand).

Effective rank (Roy & Vetterli, "The effective rank: a measure of effective dimensionality",
EUSIPCO 2007): with singular values σ_1 ≥ … ≥ σ_n ≥ 0 and p_i = σ_i / Σ_j σ_j,

    erank = exp(H(p)),   H(p) = −Σ_i p_i log p_i   (0 · log 0 = 0)

so erank lies in [1, rank]; it is n for n equal singular values and 1 for a rank-one matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["effective_rank", "singular_values"]


def _array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: no torch import needed here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def singular_values(matrix: Any, center: bool = False) -> np.ndarray:
    """Singular values (descending, float64) of a 2-D matrix (examples × dimensions).

    ``center``: subtract the column means first (the spectrum of the covariance's square root);
    off by default, as in the paper's spectra of the raw outputs."""
    m = _array(matrix)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix (examples × dimensions), got shape {m.shape}")
    if center:
        m = m - m.mean(axis=0, keepdims=True)
    return np.linalg.svd(m, compute_uv=False)


def effective_rank(values: Any) -> float:
    """Roy & Vetterli's effective rank of singular values ``values`` (any order, all ≥ 0)."""
    s = _array(values).reshape(-1)
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("effective rank: need a non-empty vector of finite singular values")
    if np.any(s < 0):
        raise ValueError("effective rank: singular values must be >= 0")
    total = s.sum()
    if total == 0:
        raise ValueError("effective rank of a zero matrix is undefined (all singular values are 0)")
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))
