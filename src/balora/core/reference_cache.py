"""BA-LoRA's consistency term from a per-position cache of the pre-trained model, instead of a reference
forward pass and reference logits (docs/method.md §3, §4; the logit-free path: docs/design/logit-free.md).

**NLG.** With student logits z = W·h + b (W, b: the *frozen* output layer; h: the final hidden state after
the final norm) and any reference distribution p = softmax(z_ref / T) over the same vocabulary,

    KL(p ‖ softmax(z / T)) = Σ p log p − p·z / T + logsumexp(z / T)          (Σ p = 1)
                           = s − u·h / T + logsumexp(z / T),
    u = Wᵀp ∈ ℝ^d,    s = −H(p) − p·b / T ∈ ℝ,

and d KL / d h = (Wᵀ softmax(z / T) − u) / T. So one d-vector and one scalar per valid position give the
term and its gradient exactly: no reference forward, no reference logits. The identity needs nothing of
p (it holds for any distribution, e.g. bf16-rounded reference logits); it needs the *student's* logits to
be W·h + b with the same W and b as when the cache was built: a plain, frozen, unadapted output layer
(`balora.core.fused.supports_fused`; balora's default targets never adapt lm_head). The logsumexp comes
from the student's (chunk × V) logits, which the fused task loss computes anyway.

**NLU.** The reference logits are the step-0 head applied to the pre-trained model's pooled features;
the features do not depend on the head, so caching them keeps a per-seed (fresh) head exact
(`nlu_reference_logits`).

Pure functions, torch only (no transformers, no file I/O).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from balora.core.output_layer import logits_into as _chunk_logits
from balora.core.output_layer import times_weight as _times_weight

# Vocabulary rows cast at a time when the output layer is stored in another dtype than the computation
# (as balora.core.fused): a whole float32 / float64 copy of a large lm_head can outweigh a logits chunk.


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for float32 / bf16 / fp16 inputs, float64 for float64 ones (exact tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the per-row combinations and the cache building; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, d), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},), got shape {tuple(bias.shape)}")


def _check_common(temperature: float, chunk_size: int) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


# ---------------------------------------------------------------------------------------------- building
def _entries_of_chunk(ref_logits: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, s) in float64 for an (m, V) chunk of reference logits."""
    wide = _wide_dtype(ref_logits.device)
    log_p = F.log_softmax(ref_logits.to(wide) / temperature, dim=-1)
    p = log_p.exp()
    s = (p * log_p).sum(-1)  # −H(p), from log-softmax: never log(0)
    if bias is not None:
        s = s - (p @ bias.to(wide)) / temperature
    return _times_weight(p, weight), s


@torch.no_grad()
def cache_entries(
    ref_logits_valid: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache entries (u, s) of M valid positions from their (M, V) reference logits.

    u = Wᵀ softmax(z_ref / T) (M, d) and s = −H(p) − p·b / T (M,), both returned in float32, computed in
    float64 (the softmax, the entropy and the products with W and b), ``chunk_size`` rows at a time so
    that at most (chunk_size × V) float64 values exist at once. ``weight``/``bias``: the frozen output
    layer of the *student* (they need not be what produced ``ref_logits_valid``: any reference
    distribution over the same vocabulary works). No gradient.
    """
    _check_layer(weight, bias)
    _check_common(temperature, chunk_size)
    if ref_logits_valid.dim() != 2 or ref_logits_valid.shape[1] != weight.shape[0]:
        raise ValueError(f"ref_logits_valid must be (M, V={weight.shape[0]}), got {tuple(ref_logits_valid.shape)}")
    m_total, device = ref_logits_valid.shape[0], ref_logits_valid.device
    u = torch.empty(m_total, weight.shape[1], dtype=torch.float32, device=device)
    s = torch.empty(m_total, dtype=torch.float32, device=device)
    for s0 in range(0, m_total, chunk_size):
        s1 = min(m_total, s0 + chunk_size)
        u_chunk, s_chunk = _entries_of_chunk(ref_logits_valid[s0:s1], weight, bias, float(temperature))
        u[s0:s1], s[s0:s1] = u_chunk, s_chunk
    return u, s


@torch.no_grad()
def cache_entries_from_hidden(
    ref_hidden_valid: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    *,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_entries` of the logits ``ref_hidden_valid @ W.T + b`` (float32, as `balora.core.fused`
    computes the reference logits online), built ``chunk_size`` rows at a time: never an (M, V) tensor."""
    _check_layer(weight, bias)
    _check_common(temperature, chunk_size)
    if ref_hidden_valid.dim() != 2 or ref_hidden_valid.shape[1] != weight.shape[1]:
        raise ValueError(f"ref_hidden_valid must be (M, d={weight.shape[1]}), got {tuple(ref_hidden_valid.shape)}")
    m_total, vocab, device = ref_hidden_valid.shape[0], weight.shape[0], ref_hidden_valid.device
    dtype = _compute_dtype(ref_hidden_valid)
    u = torch.empty(m_total, weight.shape[1], dtype=torch.float32, device=device)
    s = torch.empty(m_total, dtype=torch.float32, device=device)
    buffer = torch.empty(min(chunk_size, m_total), vocab, dtype=dtype, device=device)
    for s0 in range(0, m_total, chunk_size):
        s1 = min(m_total, s0 + chunk_size)
        logits = buffer[: s1 - s0]
        _chunk_logits(ref_hidden_valid[s0:s1].to(dtype), weight, bias, logits)
        u[s0:s1], s[s0:s1] = _entries_of_chunk(logits, weight, bias, float(temperature))
    return u, s


# ---------------------------------------------------------------------------------------------- the term
class _CachedKL(torch.autograd.Function):
    """(h, W, b, u, s) → Σ_rows KL(p ‖ softmax((h Wᵀ + b) / T)) from the cache, a float32 scalar.

    As balora.core.fused: each chunk's logits give the KL values *and* the gradient (Wᵀq − u) / T with
    respect to h in forward; backward only scales the stored (M, d) gradient. One (chunk × V) buffer
    is allocated per call and reused by every chunk.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                s: torch.Tensor, temperature: float, chunk_size: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        m_total, vocab, dtype, wide = h.shape[0], weight.shape[0], _compute_dtype(h), _wide_dtype(h.device)
        total = torch.zeros((), dtype=wide, device=h.device)
        grad = h.new_zeros(h.shape, dtype=dtype) if need_grad else None
        buffer = h.new_empty(min(chunk_size, m_total), vocab, dtype=dtype)
        for s0 in range(0, m_total, chunk_size):
            s1 = min(m_total, s0 + chunk_size)
            rows, z = h[s0:s1].to(dtype), buffer[: s1 - s0]
            _chunk_logits(rows, weight, bias, z)
            lse = torch.logsumexp(z.div_(temperature), dim=-1)
            # The combination in float64: s, u·h/T and the logsumexp are each O(log V + |z|/T) while
            # the KL can be far smaller.
            u_rows = u[s0:s1].to(wide)
            kl = s[s0:s1].to(wide) - (u_rows * rows.to(wide)).sum(-1) / temperature
            total += (kl + lse.to(wide)).sum()
            if need_grad:  # d KL / d h = (Wᵀ softmax(z / T) − u) / T
                q = z.sub_(lse[:, None]).exp_()
                grad[s0:s1] = _times_weight(q, weight).sub_(u_rows.to(dtype)).div_(temperature)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.input_dtype = h.dtype
        return total.to(dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g).to(ctx.input_dtype), None, None, None, None, None, None


def consistency_from_cache(
    hidden_valid: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    s: torch.Tensor,
    temperature: float,
    *,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """L_CR = T² · (1/M) · Σ_valid KL(p_ref,t ‖ softmax(z_t / T)), z = hidden_valid @ W.T + b, from the cache.

    The same quantity and normalisation as `balora.core.regularizers.nlg_consistency` (and the
    ``consistency`` of `losses.nlg_terms` / `fused.nlg_terms_from_hidden`) with the reference logits
    that built (u, s). Differentiable w.r.t. ``hidden_valid`` only (so through it the adapters); the
    output layer must be frozen. Computed in float32 (float64 for float64 hidden states), ``chunk_size``
    rows at a time: at most (chunk_size × V) logits exist. u may be stored in any float dtype. M = 0
    gives 0 attached to the graph.
    """
    _check_layer(weight, bias)
    _check_common(temperature, chunk_size)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the cached consistency needs a frozen output layer (weight.requires_grad is True)")
    m_total = hidden_valid.shape[0]
    if hidden_valid.dim() != 2 or hidden_valid.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden_valid must be (M, d={weight.shape[1]}), got {tuple(hidden_valid.shape)}")
    if u.shape != hidden_valid.shape or s.shape != (m_total,):
        raise ValueError(f"cache entries u {tuple(u.shape)}, s {tuple(s.shape)} do not match "
                         f"hidden_valid {tuple(hidden_valid.shape)}")
    if m_total == 0:
        return hidden_valid.float().sum() * 0.0  # keeps the graph: zero gradients, never NaN
    temperature = float(temperature)
    kl_sum = _CachedKL.apply(hidden_valid, weight, bias, u.detach(), s.detach(), temperature, int(chunk_size))
    return temperature**2 * kl_sum / m_total


# ---------------------------------------------------------------------------------------------- NLU
@torch.no_grad()
def nlu_reference_logits(
    features: torch.Tensor,
    head: nn.Module,
    head_state: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Reference class logits (N, D) from cached pre-trained pooled features: the step-0 head applied to them.

    Exact: the reference forward (`balora.core.reference.reference_forward`) runs the pre-trained encoder
    and then the snapshot's step-0 head on its output; the encoder's output (the head's input, what
    `balora.training.trainer.capture_head_input` captures) does not depend on the head. So features
    cached once serve every seed, each with its own fresh head: pass ``head`` as it is at step 0, or the
    current head with ``head_state`` = its step-0 tensors (names relative to ``head``, e.g. from the
    `ReferenceSnapshot`), applied with `torch.func.functional_call` without touching the module.
    The head runs in eval mode (no dropout), as in the reference forward. A head that reads a whole
    sequence (RoBERTa's reads token 0) can be given the cached first-token features as (N, 1, h).
    """
    was_training = head.training
    head.eval()
    try:
        if head_state is None:
            out = head(features)
        else:
            out = functional_call(head, dict(head_state), args=(features,), strict=False)
    finally:
        head.train(was_training)
    return out.float()
