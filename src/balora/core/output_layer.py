"""Products with a frozen output layer (lm_head) without a float32 copy of it: the logit-free NLG path
(`balora.core.fused`) and the reference cache (`balora.core.reference_cache`) both need rows × Wᵀ and
(rows × V) × W, chunk by chunk, with W possibly stored in bf16."""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Vocabulary rows cast at a time when the output layer is stored in another dtype: a whole float32 copy
# of a large lm_head can outweigh the logits chunk the callers are trying to avoid.
CAST_ELEMENTS = 1 << 24


def weight_blocks(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """(start, stop, W block, b block) in ``dtype``; the whole matrix (no copy) when already ``dtype``."""
    vocab, dim = weight.shape
    step = vocab if weight.dtype == dtype else max(1, CAST_ELEMENTS // dim)
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        yield v0, v1, weight[v0:v1].to(dtype), None if bias is None else bias[v0:v1].to(dtype)


def logits_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out (m, V) := rows (m, d) @ Wᵀ + b, written in place in ``out``'s dtype."""
    for v0, v1, w, b in weight_blocks(weight, bias, out.dtype):
        if b is None:
            torch.matmul(rows, w.T, out=out[:, v0:v1])
        else:
            torch.addmm(b, rows, w.T, out=out[:, v0:v1])


def times_weight(rows_by_vocab: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(m, V) @ W → (m, d) in the rows' dtype, W cast in blocks when needed."""
    out = rows_by_vocab.new_zeros(rows_by_vocab.shape[0], weight.shape[1])
    for v0, v1, w, _ in weight_blocks(weight, None, rows_by_vocab.dtype):
        out.addmm_(rows_by_vocab[:, v0:v1], w)
    return out
