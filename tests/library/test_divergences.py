"""Each divergence against its formula written with plain probabilities, masks, reductions, errors."""

import math

import pytest
import torch

from sinkd import TopKDistribution, divergence



def logits(seed, *shape, scale=2.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def kl(p, q):
    return (p * (p / q).log()).sum(-1)


HAND = {
    "kl": lambda ps, pt, T, a: T**2 * kl(pt, ps),
    "rkl": lambda ps, pt, T, a: kl(ps, pt),
    "js": lambda ps, pt, T, a: 0.5 * kl(pt, (pt + ps) / 2) + 0.5 * kl(ps, (pt + ps) / 2),
    "tvd": lambda ps, pt, T, a: 0.5 * (pt - ps).abs().sum(-1),
    "skew_kl": lambda ps, pt, T, a: kl(pt, a * pt + (1 - a) * ps),
    "skew_rkl": lambda ps, pt, T, a: kl(ps, a * ps + (1 - a) * pt),
}


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_hand_formula(name, temperature):
    zs, zt = logits(0, 6, 9), logits(1, 6, 9)
    ps, pt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    expected = HAND[name](ps, pt, temperature, 0.3)
    got = divergence(zs, zt, name, temperature=temperature, reduction="none", skew_alpha=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(HAND))
def test_divergence_gradcheck(name):
    zs, zt = logits(2, 3, 5).requires_grad_(), logits(3, 3, 5).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: divergence(a, b, name, temperature=1.7), (zs, zt))


def test_forward_kl_matches_torch_kl_div_with_t_squared():
    zs, zt = logits(4, 8, 10), logits(5, 8, 10)
    T = 3.0
    ref = torch.nn.functional.kl_div(torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1),
                                     reduction="batchmean", log_target=True) * T * T
    torch.testing.assert_close(divergence(zs, zt, "kl", temperature=T), ref)


def test_reductions_and_mask_drop_padding_rows():
    zs, zt = logits(6, 2, 4, 7), logits(7, 2, 4, 7)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])
    per_row = divergence(zs, zt, "js", reduction="none")
    kept = per_row[mask]
    assert divergence(zs, zt, "js", mask=mask, reduction="sum").item() == pytest.approx(kept.sum().item())
    assert divergence(zs, zt, "js", mask=mask, reduction="batchmean").item() == pytest.approx(kept.mean().item())
    assert divergence(zs, zt, "js", mask=mask, reduction="mean").item() == pytest.approx(kept.sum().item() / (4 * 7))
    # Padding content must not matter, nor leak gradient.
    zs2 = zs.clone()
    zs2[~mask] = 1e3
    zs2.requires_grad_()
    out = divergence(zs2, zt, "js", mask=mask, reduction="sum")
    assert out.item() == pytest.approx(kept.sum().item())
    out.backward()
    assert (zs2.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", sorted(HAND))
def test_extreme_logits_stay_finite(name):
    zs = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], requires_grad=True)
    zt = torch.tensor([[-1e4, 1e4, 0.0], [-1e4, 1e4, -5.0]])
    out = divergence(zs, zt, name)
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 4)), {}, "vocabulary mismatch: student_logits has V=3, teacher_logits has V=4"),
        ((torch.zeros(2, 3), torch.zeros(3, 3)), {}, "shape mismatch"),
        ((torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2)), {}, "student_logits has non-finite values (first at index (0, 1))"),
        ((torch.zeros(1, 2), torch.tensor([[float("inf"), 0.0]])), {}, "teacher_logits has non-finite values"),
        ((torch.zeros(3), torch.zeros(3)), {}, "student_logits must have shape (N, V)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), {"name": "hellinger"}, "divergence: unknown value 'hellinger'; valid: kl, rkl, js, tvd, skew_kl, skew_rkl"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), {"temperature": 0}, "temperature must be"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), {"name": "skew_kl", "skew_alpha": 1.0}, "skew_alpha must be in (0, 1)"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), {"reduction": "avg"}, "reduction: unknown value 'avg'"),
        ((torch.zeros(2, 3), torch.zeros(2, 3)), {"mask": torch.ones(3, dtype=torch.bool)}, "mask shape (3,) must equal"),
    ],
)
def test_bad_inputs(args, kwargs, message):
    with pytest.raises(ValueError) as err:
        divergence(*args, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- top-k teacher (logit cache)


def topk_teacher(zt, k):
    """The reference top-k teacher in float64: kept probabilities, ids, and 1 - their sum as the rest."""
    p = torch.softmax(zt, -1)
    values, ids = p.topk(k, -1)
    return TopKDistribution(values, ids, 1 - values.sum(-1))


def teacher_by_hand(zt, k, T):
    """The teacher at T over the whole vocabulary, with loops: each kept token p^(1/T), each other
    token (rest / (V - k))^(1/T), normalised."""
    V = zt.shape[-1]
    p = torch.softmax(zt, -1)
    rows = []
    for i in range(zt.shape[0]):
        ids = p[i].topk(k).indices.tolist()
        others = [v for v in range(V) if v not in ids]
        teacher = torch.zeros(V)
        teacher[ids] = p[i, ids] ** (1 / T)
        if others:
            teacher[others] = (p[i, others].sum() / len(others)) ** (1 / T)
        rows.append(teacher / teacher.sum())
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_teacher_with_k_equal_v_is_the_full_divergence(name, temperature):
    zs, zt = logits(20, 2, 4, 9).requires_grad_(), logits(21, 2, 4, 9)
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    dense = divergence(zs, zt, name, temperature=temperature, mask=mask, skew_alpha=0.3)
    sparse = divergence(zs, TopKDistribution.from_logits(zt, 9), name, temperature=temperature, mask=mask, skew_alpha=0.3)
    torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-14)
    g_dense, = torch.autograd.grad(dense, zs)
    g_sparse, = torch.autograd.grad(sparse, zs)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("k,temperature", [(1, 1.0), (3, 1.0), (3, 2.0), (6, 0.7)])
def test_topk_teacher_matches_hand_formula_with_the_rest_spread_evenly(name, k, temperature):
    zs, zt = logits(22, 5, 9), logits(23, 5, 9)
    expected = HAND[name](torch.softmax(zs / temperature, -1), teacher_by_hand(zt, k, temperature), temperature, 0.3)
    got = divergence(zs, topk_teacher(zt, k), name, temperature=temperature, reduction="none", skew_alpha=0.3)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_topk_kl_approaches_the_full_kl_as_k_grows_and_stays_finite():
    zs, zt = logits(24, 16, 50).requires_grad_(), 3 * logits(25, 16, 50)
    full = divergence(zs, zt, "kl").item()
    errors = [abs(divergence(zs, TopKDistribution.from_logits(zt, k), "kl").item() - full) for k in (1, 5, 20, 50)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12 * full
    assert errors[2] < 0.02 * full
    zero_rest = TopKDistribution.from_logits(torch.tensor([[50.0, -50.0, -50.0]]), 1)  # rest underflows to exactly 0
    student = torch.zeros(1, 3, requires_grad=True)
    out = divergence(student, zero_rest, "rkl")
    out.backward()
    assert math.isfinite(out.item()) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize(
    "teacher,message",
    [
        (lambda t: t._replace(ids=t.ids[:1]), "must cover the student's rows"),
        (lambda t: t._replace(ids=t.ids + 10), "ids must be integer token ids in [0, 5)"),
        (lambda t: t._replace(probs=-t.probs), "probs must be finite and >= 0"),
        (lambda t: t._replace(rest=t.rest * float("nan")), "rest must be finite and >= 0"),
    ],
)
def test_bad_topk_teacher_is_rejected_in_one_line(teacher, message):
    with pytest.raises(ValueError) as err:
        divergence(torch.zeros(3, 5), teacher(topk_teacher(logits(26, 3, 5), 2)))
    assert message in str(err.value) and "\n" not in str(err.value)
