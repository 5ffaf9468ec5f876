"""Each regulariser against a naive implementation written here, loop by loop (Liger-Kernel style)."""

import math

import pytest
import torch

from balora.core import regularizers as R

DTYPES = [torch.float32, torch.bfloat16]


def naive_valid(labels):
    B, T = labels.shape
    out = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        for t in range(T - 1):
            out[b, t] = bool(labels[b, t + 1] != -100)
    return out


def naive_kl(p_logits, q_logits, T):
    """KL(softmax(p/T) || softmax(q/T)) for one row, from probabilities, in float64."""
    p = torch.softmax(p_logits.double() / T, -1)
    q = torch.softmax(q_logits.double() / T, -1)
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p.tolist(), q.tolist()) if pi > 0))


def naive_entropy(row, k):
    vals = sorted(row.double().tolist(), reverse=True)
    if k:
        vals = vals[:k]
    m = max(vals)
    exps = [math.exp(v - m) for v in vals]
    s = sum(exps)
    return -sum((e / s) * math.log(e / s) for e in exps)


def naive_svd_share(Z, k, norm):
    s = torch.linalg.svdvals(Z.double()).tolist()
    top = sum(s[:k])
    denom = math.sqrt(sum(x * x for x in s)) if norm == "frobenius" else sum(s)
    return -top / denom


def random_case(dtype, B=3, T=7, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    ref = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100
    labels[-1, -3:] = -100
    return student, ref, labels


def test_valid_positions_matches_naive_and_never_last():
    _, _, labels = random_case(torch.float32)
    mask = R.valid_positions(labels)
    assert torch.equal(mask, naive_valid(labels))
    assert not mask[:, -1].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_nlg_consistency_matches_naive(dtype, T):
    student, ref, labels = random_case(dtype)
    mask = R.valid_positions(labels)
    got = R.nlg_consistency(student, ref, mask, temperature=T)
    assert got.dtype == torch.float32
    rows = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    want = T**2 * sum(naive_kl(ref[b, t].float(), student[b, t].float(), T) for b, t in rows) / len(rows)
    assert got.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_nlg_diversity_matches_naive(dtype, k):
    student, _, labels = random_case(dtype)
    mask = R.valid_positions(labels)
    got = R.nlg_diversity(student, mask, top_k=k)
    rows = [student[b, t].float() for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    want = -sum(naive_entropy(r, k) for r in rows) / len(rows)
    assert got.item() == pytest.approx(want, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["frobenius", "nuclear"])
@pytest.mark.parametrize("shape,k", [((40, 30), 10), ((5, 60), 10), ((12, 3), 5)])
def test_svd_share_matches_naive(dtype, norm, shape, k):
    Z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = R.svd_share(Z, k, norm)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_svd_share(Z.float(), k, norm), rel=1e-4)
    if norm == "nuclear":
        assert -1.0 - 1e-6 <= got.item() < 0
    else:
        assert -math.sqrt(k) - 1e-6 <= got.item() < 0


def test_nlg_svd_share_uses_valid_rows_only():
    student, _, labels = random_case(torch.float32)
    mask = R.valid_positions(labels)
    assert R.nlg_svd_share(student, mask, 4).item() == pytest.approx(naive_svd_share(student[mask], 4, "frobenius"), rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["v6", "v1"])
def test_nlu_consistency_matches_naive(dtype, variant):
    g = torch.Generator().manual_seed(2)
    s, r = torch.randn(6, 3, generator=g).to(dtype), torch.randn(6, 3, generator=g).to(dtype)
    got = R.nlu_consistency(s, r, temperature=1.5, variant=variant)
    if variant == "v6":
        want = 1.5**2 * sum(naive_kl(r[n].float(), s[n].float(), 1.5) for n in range(6)) / 6
    else:
        sq = 0.0
        for n in range(6):
            a, b = s[n].double(), r[n].double()
            a, b = a / a.norm(), b / b.norm()
            sq += float(((a - b) ** 2).sum())
        want = sq / (6 * 3)
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_nlu_consistency_regression_is_mse():
    s, r = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[1.5], [2.0], [3.0]])
    assert R.nlu_consistency(s, r).item() == pytest.approx((0.25 + 0 + 1) / 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nlu_diversity_matches_naive(dtype):
    Z = torch.randn(9, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    N, D = Z.shape
    z = Z.double()
    means = [sum(z[n, j] for n in range(N)) / N for j in range(D)]
    total = 0.0
    for i in range(D):
        for j in range(D):
            if i != j:
                c = sum((z[n, i] - means[i]) * (z[n, j] - means[j]) for n in range(N)) / (N - 1)
                total += float(c) ** 2
    assert R.nlu_diversity(Z).item() == pytest.approx(total / D, rel=1e-4)


def test_empty_and_single_cases_are_zero_not_nan_and_backprop():
    student = torch.randn(2, 5, 11, requires_grad=True)
    ref = torch.randn(2, 5, 11)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    terms = [
        R.nlg_consistency(student, ref, mask),
        R.nlg_diversity(student, mask),
        R.nlg_svd_share(student, mask, 10),
        R.svd_share(torch.zeros(4, 3, requires_grad=True), 2),
    ]
    one = torch.randn(1, 3, requires_grad=True)
    terms += [R.nlu_diversity(one), R.nlu_diversity(torch.randn(5, 1, requires_grad=True))]
    for t in terms:
        assert torch.isfinite(t) and t.item() == 0.0
    sum(terms[:3]).backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_gradients_reach_student_only():
    student = torch.randn(2, 6, 13, requires_grad=True)
    ref = torch.randn(2, 6, 13, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    (R.nlg_consistency(student, ref, mask) + R.nlu_consistency(student[0], ref[0])).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert ref.grad is None


def test_log_softmax_is_finite_for_extreme_logits():
    student = torch.tensor([[[0.0, -1e4, 1e4]]])
    ref = torch.tensor([[[1e4, -1e4, 0.0]]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    assert torch.isfinite(R.nlg_consistency(student, ref, mask))
    assert torch.isfinite(R.nlg_diversity(student, mask, top_k=0))


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="norm"):
        R.svd_share(torch.randn(3, 3), 1, "spectral")
    with pytest.raises(ValueError, match="k must be"):
        R.svd_share(torch.randn(3, 3), 0)
    with pytest.raises(ValueError, match="mask shape"):
        R.nlg_diversity(torch.randn(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
