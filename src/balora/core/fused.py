"""NLG task loss and BA-LoRA's three regularisers from final hidden states (docs/method.md §3), without ever
keeping a (valid tokens × vocabulary) logits tensor for backward.

`nlg_terms_from_hidden` returns the same `MicroBatchTerms` as `losses.nlg_terms` on full logits
``hidden @ weight.T + bias``; it only applies when the output layer is a plain frozen linear map
(`supports_fused` says whether a model qualifies, and why not).

* Cross-entropy, consistency KL and top-K entropy: the valid rows are processed in chunks; each
  chunk's float32 logits give the three per-chunk sums *and* their gradients with respect to the
  hidden states, computed analytically in forward (as Liger-Kernel's fused linear cross-entropy
  does). Backward only mixes three stored (M, d) gradients with its upstream scalars, so it needs no
  second pass over the vocabulary: 4 vocabulary-sized matmuls per chunk in all (student and
  reference logits, then one stacked product for the gradients) against 3 for the naive path.
* With a reference cache (`nlg_cached_terms_from_hidden`) and the loss weights known in advance, the
  three logit-space gradients of a chunk are summed before one product with W: 2 matmuls per chunk,
  the task loss's own cost (docs/design/reference-cache.md).
* SVD share: Z = H̃ W̃ᵀ with H̃ = [H, 1] and W̃ = [W | b]; for any R with RᵀR = W̃ᵀW̃ (QR's R is one),
  Z and H̃ Rᵀ have the same singular values, so the exact term comes from an (M, d + 1) SVD.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer

from balora.core import output_layer
from balora.core import regularizers as R
from balora.core.config import BALoraConfig
from balora.core.losses import MicroBatchTerms, shifted_targets
from balora.core.output_layer import logits_into, times_weight


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1, 1)  # no (m, V) temporary


def _top_k_entropy(z: torch.Tensor, top_k: int) -> tuple[torch.Tensor, ...]:
    """(indices, log-softmax, softmax, entropy (m, 1)) of each row's ``top_k`` largest logits."""
    top, top_idx = z.topk(top_k, -1)
    log_top = F.log_softmax(top, -1)
    p_top = log_top.exp()
    return top_idx, log_top, p_top, -(p_top * log_top).sum(-1, keepdim=True)


class _FusedTokenTerms(torch.autograd.Function):
    """(h, targets, W, b, h_ref) → (Σ CE, Σ KL(ref‖student) at T, Σ top-K entropy), float32 scalars.

    Forward also computes each sum's gradient w.r.t. h (three (M, d) matrices); backward mixes them.
    Every (rows × V) operation writes into buffers allocated once per call and reused by all chunks:
    fresh vocabulary-sized tensors per op would cost their page faults again and again.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, h_ref: torch.Tensor | None, temperature: float,
                top_k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_grad = ctx.needs_input_grad[0]
        m_total, vocab = h.shape[0], weight.shape[0]
        dense_entropy = not 0 < top_k < vocab
        with_ref, scaled = h_ref is not None, temperature != 1.0
        sums = [torch.zeros((), dtype=torch.float32, device=h.device) for _ in range(3)]
        grads = h.new_zeros((3, m_total, h.shape[1]), dtype=torch.float32) if need_grad else None
        m_max = min(chunk_size, m_total)
        # [student | reference] logits, then [softmax − onehot | q − p_ref] for one product with W.
        stacked_buf = h.new_empty((1 + with_ref) * m_max * vocab, dtype=torch.float32)
        log_p_buf = h.new_empty(m_max, vocab, dtype=torch.float32)
        log_q_buf = h.new_empty(m_max, vocab, dtype=torch.float32) if with_ref and scaled else None
        for s0 in range(0, m_total, chunk_size):
            s1 = min(m_total, s0 + chunk_size)
            m, tgt = s1 - s0, targets[s0:s1, None]
            rows = h[s0:s1].float()
            if with_ref:
                rows = torch.cat([rows, h_ref[s0:s1].float()])
            stacked = stacked_buf[: rows.shape[0] * vocab].view(rows.shape[0], vocab)
            logits_into(rows, weight, bias, stacked)
            z, log_p = stacked[:m], log_p_buf[:m]
            if not dense_entropy:
                top_idx, log_top, p_top, entropy = _top_k_entropy(z, top_k)
            torch.log_softmax(z, -1, out=log_p)
            sums[0] -= log_p.gather(1, tgt).sum()

            if with_ref:  # z is free after this block: only log_p is needed from here on
                log_q = log_p
                if scaled:
                    log_q = log_q_buf[:m]
                    torch.log_softmax(z.div_(temperature), -1, out=log_q)
                z_ref = stacked[m:]
                torch.log_softmax(z_ref.div_(temperature), -1, out=z)  # z := log p_ref
                p_ref = torch.exp(z, out=z_ref)
                # Elementwise difference, as in regularizers.kl_rows: exactly 0 when student == ref.
                # torch.sum's cascade summation: a float32 dot over m·V terms that largely cancel
                # loses ~1e-5 relative at M = 4096, V = 49152.
                sums[1] += z.sub_(log_q).mul_(p_ref).sum()
                if need_grad:  # d KL / dz = (q − p_ref) / T; the 1/T is applied below
                    torch.sub(torch.exp(log_q, out=z), p_ref, out=z_ref)

            p = torch.exp(log_p, out=z) if need_grad or dense_entropy else None
            if dense_entropy:
                entropy = -_row_dot(p, log_p)
                if need_grad:  # dH/dz_i = −p_i (log p_i + H)
                    grads[2, s0:s1] = times_weight(log_p.add_(entropy).mul_(p).neg_(), weight)
            elif need_grad:  # only the K selected logits receive gradient
                d_top = -p_top * (log_top + entropy)
                for k in range(top_k):  # one (m, d) gather at a time, not an (m, K, d) tensor
                    grads[2, s0:s1].addcmul_(weight[top_idx[:, k]].float(), d_top[:, k:k + 1])
            sums[2] += entropy.sum()

            if need_grad:  # d CE / dz = softmax(z) − onehot(target)
                p.scatter_add_(1, tgt, p.new_full(tgt.shape, -1.0))
                product = times_weight(stacked, weight)
                grads[0, s0:s1] = product[:m]
                if with_ref:
                    grads[1, s0:s1] = product[m:].div_(temperature)
        if need_grad:
            ctx.save_for_backward(grads)
        ctx.input_dtype = h.dtype
        return sums[0], sums[1], sums[2]

    @staticmethod
    def backward(ctx: Any, g_task: torch.Tensor, g_kl: torch.Tensor, g_ent: torch.Tensor):
        (grads,) = ctx.saved_tensors
        coefficients = torch.stack([g_task, g_kl, g_ent]).float()
        grad_h = torch.einsum("k,kmd->md", coefficients, grads).to(ctx.input_dtype)
        return grad_h, None, None, None, None, None, None, None


def _check_frozen(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the fused loss needs a frozen output layer (weight.requires_grad is True); "
                         "use losses.nlg_terms on full logits instead")


def fused_token_terms(
    h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    h_ref: torch.Tensor | None = None, temperature: float = 2.0, top_k: int = 20,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For valid rows h (M, d) and targets (M,): (Σ CE, Σ KL(ref‖student) at T, Σ top-K entropy).

    The KL sum is 0 when ``h_ref`` is None. Differentiable w.r.t. ``h`` only, for any combination.
    """
    _check_frozen(weight, bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    h_ref = None if h_ref is None else h_ref.detach()
    return _FusedTokenTerms.apply(h, targets, weight, bias, h_ref, float(temperature), int(top_k), chunk_size)


class _WeightedCachedTerms(torch.autograd.Function):
    """(h, targets, W, b, u, s) → c_task·Σ CE + c_kl·Σ KL(p_ref‖student at T) + c_ent·Σ top-K entropy, the
    KL from the reference cache (`balora.core.reference_cache`), plus the three sums (no gradient).

    Because the coefficients are known in forward, each chunk's three logit-space gradients are summed
    *before* the product with W: one vocabulary-sized product for the logits and one for the gradient
    per chunk, as for the task loss alone (PiSSA's cost), instead of four.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, u: torch.Tensor, s: torch.Tensor, temperature: float, top_k: int,
                coefficients: tuple[float, float, float], chunk_size: int):
        need_grad = ctx.needs_input_grad[0]
        c_task, c_kl, c_ent = coefficients
        m_total, vocab = h.shape[0], weight.shape[0]
        dense_entropy = not 0 < top_k < vocab
        wide = torch.float32 if h.device.type == "mps" else torch.float64  # the KL's combination, as _CachedKL
        sums = [torch.zeros((), dtype=wide, device=h.device) for _ in range(3)]
        grad = h.new_zeros((m_total, h.shape[1]), dtype=torch.float32) if need_grad else None
        m_max = min(chunk_size, m_total)
        z_buf, log_p_buf = (h.new_empty(m_max, vocab, dtype=torch.float32) for _ in range(2))
        # softmax(z) gets its own buffer only where log p is still needed after it (the dense entropy)
        p_buf = h.new_empty(m_max, vocab, dtype=torch.float32) if dense_entropy else None
        for s0 in range(0, m_total, chunk_size):
            s1 = min(m_total, s0 + chunk_size)
            m, tgt = s1 - s0, targets[s0:s1, None]
            rows, z, log_p = h[s0:s1].float(), z_buf[:m], log_p_buf[:m]
            logits_into(rows, weight, bias, z)
            if not dense_entropy:
                top_idx, log_top, p_top, entropy = _top_k_entropy(z, top_k)
            torch.log_softmax(z, -1, out=log_p)
            sums[0] -= log_p.gather(1, tgt).sum().to(wide)
            # KL(p_ref ‖ q) = s − u·h / T + logsumexp(z / T), q = softmax(z / T)
            z.div_(temperature)
            lse = torch.logsumexp(z, -1)
            u_rows = u[s0:s1]
            sums[1] += (s[s0:s1].to(wide) - (u_rows.to(wide) * rows.to(wide)).sum(-1) / temperature
                        + lse.to(wide)).sum()
            if need_grad:  # d/dz of the weighted sum, then one product with W
                q = z.sub_(lse[:, None]).exp_()  # z := q
                g = q.mul_(c_kl / temperature)  # d KL / dz = q / T (the −u/T part is added in h-space)
                p = torch.exp(log_p, out=p_buf[:m]) if dense_entropy else log_p.exp_()
                if dense_entropy:
                    entropy = -_row_dot(p, log_p)
                    g.add_(log_p.add(entropy).mul_(p), alpha=-c_ent)  # dH/dz_i = −p_i (log p_i + H)
                g.add_(p, alpha=c_task)  # d CE / dz = softmax(z) − onehot(target)
                g.scatter_add_(1, tgt, g.new_full(tgt.shape, -c_task))
                grad[s0:s1] = times_weight(g, weight).sub_(u_rows.float(), alpha=c_kl / temperature)
                if not dense_entropy:  # only the K selected logits receive the entropy's gradient
                    d_top = -p_top * (log_top + entropy) * c_ent
                    for k in range(top_k):
                        grad[s0:s1].addcmul_(weight[top_idx[:, k]].float(), d_top[:, k:k + 1])
            elif dense_entropy:
                entropy = -_row_dot(torch.exp(log_p, out=p_buf[:m]), log_p)
            sums[2] += entropy.sum().to(wide)
        if need_grad:
            ctx.save_for_backward(grad)
        ctx.input_dtype = h.dtype
        task_sum, kl_sum, ent_sum = (t.float() for t in sums)
        loss = (c_task * sums[0] + c_kl * sums[1] + c_ent * sums[2]).float()
        ctx.mark_non_differentiable(task_sum, kl_sum, ent_sum)
        return loss, task_sum, kl_sum, ent_sum

    @staticmethod
    def backward(ctx: Any, g_loss: torch.Tensor, *unused: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).to(ctx.input_dtype), None, None, None, None, None, None, None, None, None


def fused_cached_weighted_loss(
    h: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    u: torch.Tensor, s: torch.Tensor, temperature: float, top_k: int,
    coefficients: tuple[float, float, float], chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_task·Σ CE + c_kl·Σ KL + c_ent·Σ top-K entropy, Σ CE, Σ KL, Σ entropy) over valid rows h (M, d),
    the KL(p_ref ‖ softmax(z / T)) from cache entries (u, s) (`balora.core.reference_cache`).

    The first value is differentiable w.r.t. ``h``; the sums are for logging. The same values as
    `fused_token_terms` with the reference's hidden states and `reference_cache.consistency_from_cache`,
    at the cost of the task loss alone: 2 vocabulary-sized products per chunk.
    """
    _check_frozen(weight, bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if u.shape != h.shape or s.shape != h.shape[:1]:
        raise ValueError(f"cache entries u {tuple(u.shape)}, s {tuple(s.shape)} do not match h {tuple(h.shape)}")
    coefficients = tuple(float(c) for c in coefficients)
    return _WeightedCachedTerms.apply(h, targets, weight, bias, u.detach(), s.detach(), float(temperature),
                                      int(top_k), coefficients, int(chunk_size))


class OutputLayerFactor:
    """A (d', d') float32 R with RᵀR = W̃ᵀW̃ for W̃ = [W | b] (d' = d, or d + 1 with a bias).

    Computed from the float64 Gram matrix (eigendecomposition: no float32 copy of W, and rank
    deficiency is fine) and recomputed only when the weight or bias changes (storage or version).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight, self.bias = weight, bias
        self._key: tuple | None = None
        self._r: torch.Tensor | None = None

    def _current_key(self) -> tuple:
        key: tuple = (self.weight.data_ptr(), self.weight._version, self.weight.shape, self.weight.dtype)
        if self.bias is not None:
            key += (self.bias.data_ptr(), self.bias._version)
        return key

    @property
    def r(self) -> torch.Tensor:
        key = self._current_key()
        if self._r is None or key != self._key:
            self._r, self._key = self._compute(), key
        return self._r

    @torch.no_grad()
    def _compute(self) -> torch.Tensor:
        w = self.weight
        # float64 is unavailable on MPS; R is small, so compute it on the CPU there.
        device = torch.device("cpu") if w.device.type == "mps" else w.device
        dim = w.shape[1] + (self.bias is not None)
        gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        step = max(1, output_layer.CAST_ELEMENTS // dim)
        for v0 in range(0, w.shape[0], step):
            block = w[v0:v0 + step].to(device, torch.float64)
            if self.bias is not None:
                b = self.bias[v0:v0 + block.shape[0]].to(device, torch.float64)
                block = torch.cat([block, b[:, None]], 1)
            gram += block.T @ block
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)
        r = eigenvalues.clamp_min(0).sqrt()[:, None] * eigenvectors.T
        return r.to(w.device, torch.float32)


def svd_share_from_hidden(h_valid: torch.Tensor, factor: OutputLayerFactor, k: int,
                          norm: R.SvdNorm = "frobenius") -> torch.Tensor:
    """Exactly ``regularizers.svd_share(h_valid @ W.T + b, k, norm)`` from an (M, d + 1) SVD."""
    rows = h_valid.float()
    if factor.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return R.svd_share(rows @ factor.r.T, k, norm)


def nlg_terms_from_hidden(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: BALoraConfig | None,
    ref_hidden: torch.Tensor | None = None,
    *, chunk_size: int = 1024, svd_factor: OutputLayerFactor | None = None,
) -> MicroBatchTerms:
    """`losses.nlg_terms` on the logits ``hidden @ weight.T + bias``, computed from the (B, T, d)
    final hidden states (after the final norm) in chunks of ``chunk_size`` valid positions.

    ``weight`` must be frozen (ValueError otherwise: fall back to full logits). Pass a long-lived
    ``svd_factor`` for this output layer so that its factor is computed once, not per call. With a
    reference cache instead of ``ref_hidden``: `nlg_cached_terms_from_hidden`.
    """
    _check_frozen(weight, bias)
    if svd_factor is not None and (svd_factor.weight is not weight or svd_factor.bias is not bias):
        raise ValueError("svd_factor was built for another output layer")
    mask = R.valid_positions(labels)
    h, count = hidden[mask], mask.sum()
    m, with_ref = h.shape[0], cfg is not None and ref_hidden is not None
    if m == 0:
        zero = hidden.float().sum() * 0.0  # keeps the graph: zero gradients, never NaN
        if cfg is None:
            return MicroBatchTerms(zero, count)
        return MicroBatchTerms(zero, count, zero.clone() if with_ref else None, zero.clone(), zero.clone())
    # Without cfg only the task loss is wanted: top-1 "entropy" is 0 and costs one cheap pass.
    temperature, top_k = (cfg.temperature, cfg.top_k) if cfg is not None else (1.0, 1)
    task_sum, kl_sum, entropy_sum = fused_token_terms(
        h, shifted_targets(labels)[mask], weight, bias, ref_hidden[mask] if with_ref else None,
        temperature, top_k, chunk_size)
    if cfg is None:
        return MicroBatchTerms(task_sum, count)
    svd = svd_share_from_hidden(h, svd_factor or OutputLayerFactor(weight, bias), cfg.svd_k, cfg.svd_norm)
    consistency = temperature**2 * kl_sum / m if with_ref else None
    return MicroBatchTerms(task_sum, count, consistency, -entropy_sum / m, svd)


def nlg_cached_terms_from_hidden(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    cfg: BALoraConfig,
    cached_reference: tuple[torch.Tensor, torch.Tensor],
    task_scale: float | torch.Tensor,
    consistency_weight: float | torch.Tensor,
    diversity_weight: float | torch.Tensor,
    *, chunk_size: int = 1024, svd_factor: OutputLayerFactor | None = None,
) -> MicroBatchTerms:
    """`nlg_terms_from_hidden` with the consistency from cache entries (u, s), for a caller that knows the
    weights of the loss in advance: ``weighted`` = task_scale·Σ CE + consistency_weight·L_CR +
    diversity_weight·L_DR, computed in one pass with one gradient product per chunk
    (`fused_cached_weighted_loss`); ``task_sum``, ``consistency`` and ``diversity`` are then detached
    values (for logging) and ``svd`` is differentiable, to be added by the caller."""
    _check_frozen(weight, bias)
    if svd_factor is not None and (svd_factor.weight is not weight or svd_factor.bias is not bias):
        raise ValueError("svd_factor was built for another output layer")
    mask = R.valid_positions(labels)
    h, count = hidden[mask], mask.sum()
    m = h.shape[0]
    if m == 0:
        zero = hidden.float().sum() * 0.0  # keeps the graph: zero gradients, never NaN
        return MicroBatchTerms(zero.detach(), count, zero.detach(), zero.detach(), zero.clone(), weighted=zero)
    u, s = cached_reference
    t = float(cfg.temperature)
    coefficients = (float(task_scale), float(consistency_weight) * t**2 / m, -float(diversity_weight) / m)
    weighted, task_sum, kl_sum, entropy_sum = fused_cached_weighted_loss(
        h, shifted_targets(labels)[mask], weight, bias, u.to(h.device), s.to(h.device), t, cfg.top_k,
        coefficients, chunk_size)
    svd = svd_share_from_hidden(h, svd_factor or OutputLayerFactor(weight, bias), cfg.svd_k, cfg.svd_norm)
    return MicroBatchTerms(task_sum, count, t**2 * kl_sum / m, -entropy_sum / m, svd, weighted=weighted)


# Config fields by which transformers models change the output layer's logits, and the values
# that leave them unchanged (soft-capping and Cohere's logit_scale change them whatever the value).
_LOGIT_TRANSFORMS: dict[str, tuple] = {
    "final_logit_softcapping": (None,), "logit_scale": (), "logits_scaling": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
}


def supports_fused(model: torch.nn.Module) -> tuple[bool, str]:
    """Whether the model's logits are a plain frozen linear map of its final hidden states, so that
    `nlg_terms_from_hidden` applies; otherwise (False, the reason to log)."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:
        return False, "the model exposes no output layer (get_output_embeddings() is None)"
    if isinstance(head, BaseTunerLayer):
        return False, f"the output layer is adapted by PEFT ({type(head).__module__}.{type(head).__name__})"
    if type(head) is not torch.nn.Linear:
        return False, f"the output layer is a {type(head).__name__}, not a plain nn.Linear"
    if any(p.requires_grad for p in head.parameters()):
        return False, "the output layer is trainable (fused gradients cover the hidden states only)"
    config = getattr(model, "config", None)
    configs = [config] if config is not None else []
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for name, neutral in _LOGIT_TRANSFORMS.items():
            if hasattr(cfg, name) and getattr(cfg, name) not in neutral:
                return False, f"the config has {name}={getattr(cfg, name)!r}: logits are transformed"
    return True, "plain frozen linear output layer"
