"""Fused NLG loss from hidden states (balora.fused) against losses.nlg_terms on full logits."""

from __future__ import annotations

import pytest
import torch

from balora.core import losses
from balora.core.config import BALoraConfig
from balora.core.fused import OutputLayerFactor, nlg_terms_from_hidden, supports_fused

B, T, D, V = 3, 9, 16, 300
TERMS = ("task_sum", "consistency", "diversity", "svd")


def _inputs(dtype: torch.dtype, with_bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, D, generator=g) * 2).to(dtype)
    ref = (hidden.float() + 0.3 * torch.randn(B, T, D, generator=g)).to(dtype)
    weight = torch.randn(V, D, generator=g) / D**0.5
    bias = torch.randn(V, generator=g) * 0.5 if with_bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # right padding
    return hidden, ref, weight, bias, labels


def _combine(terms: losses.MicroBatchTerms, coeffs: torch.Tensor) -> torch.Tensor:
    return sum(c * getattr(terms, name) for c, name in zip(coeffs, TERMS))


def _naive(hidden, ref, weight, bias, labels, cfg):
    # The bf16 case: the model's logits are float32 products of the same bf16-rounded tensors.
    logits = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())
    ref_logits = ref.float() @ weight.float().T + (0 if bias is None else bias.float())
    return losses.nlg_terms(logits, labels, cfg, ref_logits)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (5, 2.0), (5, 1.0), (0, 2.0)])
def test_values_and_gradients_match_full_logits(dtype, with_bias, top_k, temperature):
    hidden, ref, weight, bias, labels = _inputs(dtype, with_bias)
    cfg = BALoraConfig(top_k=top_k, temperature=temperature, svd_k=3,
                       svd_norm="nuclear" if top_k == 0 else "frobenius")
    coeffs = torch.tensor([0.7, 1.3, -0.9, 2.1])
    h_naive = hidden.clone().requires_grad_()
    naive = _naive(h_naive, ref, weight, bias, labels, cfg)
    _combine(naive, coeffs).backward()
    factor = OutputLayerFactor(weight, bias)
    for chunk in (1, 4, 1000):
        h = hidden.clone().requires_grad_()
        fused = nlg_terms_from_hidden(h, labels, weight, bias, cfg, ref, chunk_size=chunk, svd_factor=factor)
        assert fused.count == naive.count
        for name in TERMS:
            torch.testing.assert_close(getattr(fused, name), getattr(naive, name), rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name, chunk=chunk: f"{name}, chunk {chunk}: {m}")
        _combine(fused, coeffs).backward()
        assert h.grad.dtype == dtype
        with torch.no_grad():  # the forward-only path skips the gradient work but not the values
            plain = nlg_terms_from_hidden(hidden, labels, weight, bias, cfg, ref, chunk_size=chunk, svd_factor=factor)
        for name in TERMS:
            torch.testing.assert_close(getattr(plain, name), getattr(fused, name).detach())
        # bf16 gradients: both paths round the same float32 gradient, at most one bf16 ulp apart.
        assert _rel(h.grad, h_naive.grad) < (1e-3 if dtype == torch.float32 else 1e-2), chunk


def test_bf16_output_layer_cast_in_vocabulary_blocks(monkeypatch):
    import balora.core.output_layer

    monkeypatch.setattr(balora.core.output_layer, "CAST_ELEMENTS", 7 * D)  # 43 blocks of 7 rows
    hidden, ref, weight, bias, labels = _inputs(torch.bfloat16, True)
    weight, bias = weight.bfloat16(), bias.bfloat16()
    cfg = BALoraConfig(top_k=5, svd_k=3)
    coeffs = torch.tensor([0.7, 1.3, -0.9, 2.1])
    h_naive, h = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    naive = _naive(h_naive, ref, weight, bias, labels, cfg)
    fused = nlg_terms_from_hidden(h, labels, weight, bias, cfg, ref, chunk_size=4)
    for name in TERMS:
        torch.testing.assert_close(getattr(fused, name), getattr(naive, name), rtol=1e-4, atol=1e-5)
    _combine(naive, coeffs).backward()
    _combine(fused, coeffs).backward()
    assert _rel(h.grad, h_naive.grad) < 1e-2


def test_task_only_and_without_reference():
    hidden, ref, weight, bias, labels = _inputs(torch.float32, True)
    naive = _naive(hidden, ref, weight, bias, labels, None)
    fused = nlg_terms_from_hidden(hidden, labels, weight, bias, None, ref, chunk_size=7)
    torch.testing.assert_close(fused.task_sum, naive.task_sum, rtol=1e-5, atol=1e-6)
    assert fused.consistency is fused.diversity is fused.svd is None
    no_ref = nlg_terms_from_hidden(hidden, labels, weight, bias, BALoraConfig(), None)
    assert no_ref.consistency is None and no_ref.diversity is not None


def test_identical_reference_gives_zero_consistency():
    hidden, _, weight, bias, labels = _inputs(torch.float32, False)
    terms = nlg_terms_from_hidden(hidden, labels, weight, bias, BALoraConfig(), hidden.clone())
    assert terms.consistency.item() == 0.0


def test_no_valid_position_gives_zeros_attached_to_the_graph():
    hidden, ref, weight, bias, labels = _inputs(torch.float32, True)
    h = hidden.clone().requires_grad_()
    terms = nlg_terms_from_hidden(h, torch.full_like(labels, -100), weight, bias, BALoraConfig(), ref)
    total = _combine(terms, torch.ones(4))
    total.backward()
    assert terms.count.item() == 0 and total.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h))


def test_trainable_weight_or_foreign_factor_is_refused():
    hidden, ref, weight, bias, labels = _inputs(torch.float32, False)
    with pytest.raises(ValueError, match="another output layer"):
        nlg_terms_from_hidden(hidden, labels, weight, bias, BALoraConfig(), ref,
                              svd_factor=OutputLayerFactor(weight.clone()))
    with pytest.raises(ValueError, match="frozen"):
        nlg_terms_from_hidden(hidden, labels, weight.requires_grad_(), bias, BALoraConfig(), ref)


def test_factor_is_cached_and_recomputed_when_the_weight_changes():
    _, _, weight, bias, _ = _inputs(torch.float32, True)
    factor = OutputLayerFactor(weight, bias)
    first = factor.r
    assert factor.r is first  # cached
    tilde = torch.cat([weight, bias[:, None]], 1)
    torch.testing.assert_close(first.T @ first, tilde.T @ tilde, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        weight.mul_(2.0)
        bias.mul_(2.0)
    second = factor.r
    assert second is not first
    torch.testing.assert_close(second.T @ second, 4 * (tilde.T @ tilde), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        bias.add_(1.0)
    assert factor.r is not second


def _freeze_all(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_supports_fused_on_llama_and_peft():
    from conftest import make_tiny_llama
    from peft import LoraConfig, get_peft_model

    ok, reason = supports_fused(make_tiny_llama())
    assert not ok and "trainable" in reason
    ok, reason = supports_fused(_freeze_all(make_tiny_llama()))
    assert ok, reason
    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert supports_fused(peft_model)[0]
    adapted = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ok, reason = supports_fused(adapted)
    assert not ok and "PEFT" in reason


def test_supports_fused_refuses_soft_capping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    ok, reason = supports_fused(_freeze_all(Gemma2ForCausalLM(cfg)))
    assert not ok and "final_logit_softcapping" in reason


# ------------------------------------------------------- the cached reference, weights known in advance
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("top_k,temperature", [(0, 1.0), (5, 2.0), (5, 1.0), (0, 2.0)])
def test_cached_weighted_pass_matches_full_logits(with_bias, top_k, temperature):
    """nlg_cached_terms_from_hidden's one-product-per-chunk weighted sum = the same weights applied to
    losses.nlg_terms on full logits (reference logits from the reference hidden states), value and
    gradient; the logged terms equal the naive ones; the SVD term stays differentiable on its own."""
    from balora.core.fused import nlg_cached_terms_from_hidden
    from balora.core.reference_cache import cache_entries
    from balora.core.regularizers import valid_positions

    hidden, ref, weight, bias, labels = _inputs(torch.float32, with_bias)
    cfg = BALoraConfig(top_k=top_k, temperature=temperature, svd_k=3)
    mask = valid_positions(labels)
    ref_logits = ref @ weight.T + (0 if bias is None else bias)
    u, s = cache_entries(ref_logits[mask], weight, bias, temperature)
    scale, w_cr, w_dr, w_svd = 1 / 11, 0.6, -0.4, 0.3  # any weights: a negative one too

    h_naive = hidden.clone().requires_grad_()
    naive = _naive(h_naive, ref, weight, bias, labels, cfg)
    want = scale * naive.task_sum + w_cr * naive.consistency + w_dr * naive.diversity + w_svd * naive.svd
    want.backward()
    for chunk in (1, 4, 1000):
        h = hidden.clone().requires_grad_()
        terms = nlg_cached_terms_from_hidden(h, labels, weight, bias, cfg, (u, s), scale, w_cr, w_dr,
                                             chunk_size=chunk)
        got = terms.weighted + w_svd * terms.svd
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for name in ("task_sum", "consistency", "diversity", "svd"):
            torch.testing.assert_close(getattr(terms, name), getattr(naive, name), rtol=1e-4, atol=2e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert not terms.task_sum.requires_grad and not terms.consistency.requires_grad
        got.backward()
        assert _rel(h.grad, h_naive.grad) < 1e-5, chunk


def test_cached_weighted_pass_without_valid_positions_is_zero_with_a_graph():
    from balora.core.fused import nlg_cached_terms_from_hidden

    hidden, _, weight, bias, labels = _inputs(torch.float32, False)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    terms = nlg_cached_terms_from_hidden(h, labels, weight, bias, BALoraConfig(), (torch.zeros(0, D), torch.zeros(0)),
                                         1.0, 1.0, 1.0)
    (terms.weighted + terms.svd).backward()
    assert terms.weighted.item() == 0 and torch.count_nonzero(h.grad) == 0
