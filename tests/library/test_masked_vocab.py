"""Issue 13, findings 3 and 4: -inf logits are tokens of probability 0 in every path (the same numbers
as the problem without those tokens; the usual conventions where only one side masks them), NaN and
+inf are still refused, a row that is -inf everywhere is an error naming it; float16 / bfloat16 logits
work on CPU, computed in float32 (the same numbers as float32 logits of the same values)."""

import math

import pytest
import torch

from sinkd import (
    DIVERGENCES,
    DistillationObjective,
    ObjectiveConfig,
    SinkhornConfig,
    TopKDistribution,
    cost_matrix,
    divergence,
    sinkhorn,
    sinkhorn_loss,
)

MASKED = [2, 7]
KEPT = [v for v in range(9) if v not in MASKED]
LOSS_CONFIGS = {
    "l1 dense": SinkhornConfig(l1_impl="dense", max_iter=50),
    "l1 chunked": SinkhornConfig(l1_impl="chunked", max_iter=50, l1_tile_elements=7),
    "paper groups": SinkhornConfig.paper(group_size=3),
    "implicit": SinkhornConfig.paper(grad="implicit"),
    "envelope": SinkhornConfig(grad="envelope", temperature=1.5),
    "l2": SinkhornConfig(cost="l2"),
    "sqeuclidean": SinkhornConfig(cost="sqeuclidean"),
    "cosine": SinkhornConfig(cost="cosine"),
    "topk": SinkhornConfig.paper(topk=4),
    "sample": SinkhornConfig(mode="sample", max_iter=30),
}


def logits(seed, n=5, v=9):
    return 2 * torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def masked(z, columns=MASKED):
    z = z.clone()
    z[:, columns] = -math.inf
    return z


def value_and_grad(fn, z):
    z = z.clone().requires_grad_()
    out = fn(z)
    out.backward()
    return out.detach(), z.grad


@pytest.mark.parametrize("name", list(LOSS_CONFIGS))
def test_sinkhorn_loss_with_masked_tokens_is_the_loss_without_them(name):
    cfg = LOSS_CONFIGS[name]
    zs, zt = logits(0), logits(1)
    got, g_got = value_and_grad(lambda z: sinkhorn_loss(z, masked(zt), cfg), masked(zs))
    ref, g_ref = value_and_grad(lambda z: sinkhorn_loss(z, zt[:, KEPT], cfg), zs[:, KEPT])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got[:, KEPT], g_ref, rtol=1e-8, atol=1e-12)
    assert bool((g_got[:, MASKED] == 0).all())


def test_topk_teacher_from_masked_logits_is_the_teacher_without_them():
    zs, zt = logits(2), logits(3)
    cfg = SinkhornConfig.paper()
    cached = TopKDistribution.from_logits(masked(zt), 4)
    assert not bool(torch.isin(cached.ids, torch.tensor(MASKED)).any())
    reduced = TopKDistribution.from_logits(zt[:, KEPT], 4)
    remap = torch.tensor(KEPT)[reduced.ids]
    torch.testing.assert_close(cached.ids, remap)
    torch.testing.assert_close(cached.rest, reduced.rest)
    # Every kept token masked but 3: k = 4 keeps a zero-probability token and a zero rest.
    few = torch.full((2, 9), -math.inf, dtype=torch.float64)
    few[:, :3] = torch.randn(2, 3, dtype=torch.float64)
    top = TopKDistribution.from_logits(few, 4)
    assert bool((top.probs[:, 3] == 0).all()) and bool((top.rest == 0).all())
    got, g_got = value_and_grad(lambda z: sinkhorn_loss(z, cached, cfg), masked(zs))
    assert math.isfinite(got.item()) and bool(torch.isfinite(g_got).all()) and bool((g_got[:, MASKED] == 0).all())


@pytest.mark.parametrize("name", DIVERGENCES)
def test_divergences_with_the_same_masked_tokens_are_those_without_them(name):
    zs, zt = logits(4), logits(5)
    got, g_got = value_and_grad(lambda z: divergence(z, masked(zt), name, temperature=2.0), masked(zs))
    ref, g_ref = value_and_grad(lambda z: divergence(z, zt[:, KEPT], name, temperature=2.0), zs[:, KEPT])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_got[:, KEPT], g_ref, rtol=1e-10, atol=1e-14)
    assert bool((g_got[:, MASKED] == 0).all())


def test_divergences_where_one_side_masks_a_token_follow_the_usual_conventions():
    """Student masks token 2, teacher masks token 7: 0 log 0 = 0 and p log(p / 0) = +inf."""
    zs, zt = masked(logits(6), [2]), masked(logits(7), [7])
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)

    def kl(p, q):  # by hand over the support of p
        keep = p > 0
        return torch.where(keep, p * (p.log() - q.log()), torch.zeros_like(p)).sum(-1).mean()

    assert divergence(zs, zt, "kl").item() == math.inf  # the teacher has mass where the student has none
    assert divergence(zs, zt, "rkl").item() == math.inf
    m = (ps + pt) / 2
    expected = {"js": 0.5 * kl(pt, m) + 0.5 * kl(ps, m), "tvd": 0.5 * (ps - pt).abs().sum(-1).mean(),
                "skew_kl": kl(pt, 0.1 * pt + 0.9 * ps), "skew_rkl": kl(ps, 0.1 * ps + 0.9 * pt)}
    for name, ref in expected.items():
        got, grad = value_and_grad(lambda z, name=name: divergence(z, zt, name), zs)
        assert got.item() == pytest.approx(ref.item(), rel=1e-12), name
        assert bool(torch.isfinite(grad).all()) and bool((grad[:, 2] == 0).all()), name
    # Student mass only where the teacher has some: RKL is finite and is the formula's (KL stays +inf).
    zs_in = masked(logits(8), [2, 7])
    assert divergence(zs_in, zt, "kl").item() == math.inf
    rkl, grad = value_and_grad(lambda z: divergence(z, zt, "rkl"), zs_in)
    assert rkl.item() == pytest.approx(kl(torch.softmax(zs_in, -1), pt).item(), rel=1e-12)
    assert bool(torch.isfinite(grad).all()) and bool((grad[:, [2, 7]] == 0).all())


def test_objective_with_a_padded_vocabulary_head():
    """A head wider than its tokenizer (Qwen2.5: 151,936 rows for ~151,665 tokens), padding at -inf."""
    zs, zt = logits(9, 6, 12), logits(10, 6, 12)
    zs[:, 9:], zt[:, 9:] = -math.inf, -math.inf
    labels = torch.tensor([0, 3, 8, 1, 5, -100])
    objective = DistillationObjective(ObjectiveConfig.paper(alpha=0.5, sinkhorn=SinkhornConfig.paper(grad="implicit")))
    zs = zs.requires_grad_()
    out = objective(zs, zt, labels=labels)
    out.loss.backward()
    ref_in = zs.detach()[:, :9].clone().requires_grad_()
    ref = objective(ref_in, zt[:, :9], labels=labels)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(zs.grad[:, :9], ref_in.grad, rtol=1e-8, atol=1e-12)
    assert bool((zs.grad[:, 9:] == 0).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_plus_inf_are_still_refused_everywhere(bad):
    z = logits(11)
    z[1, 3] = bad
    message = "has non-finite values (first at index (1, 3)): NaN or +inf"
    for call in (lambda: sinkhorn_loss(z, logits(12)), lambda: sinkhorn_loss(logits(12), z),
                 lambda: divergence(z, logits(12)), lambda: TopKDistribution.from_logits(z, 3),
                 lambda: sinkhorn_loss(z, TopKDistribution.from_logits(logits(12), 3))):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            call()


def test_a_row_that_is_minus_inf_everywhere_is_an_error_naming_the_row():
    z = logits(13)
    z[3] = -math.inf
    for call, field in ((lambda: sinkhorn_loss(logits(14), z), "teacher_logits"), (lambda: divergence(z, logits(14)), "student_logits"),
                        (lambda: TopKDistribution.from_logits(z, 2), "logits"),
                        (lambda: DistillationObjective()(z, logits(14), labels=torch.zeros(5, dtype=torch.long)), "student_logits")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == f"{field} row (3,) is -inf everywhere: no token has probability > 0"


HALF_CONFIGS = {k: LOSS_CONFIGS[k] for k in ("l1 dense", "l1 chunked", "paper groups", "implicit", "sqeuclidean", "topk", "sample")}
HALF_CONFIGS["auto"] = SinkhornConfig.paper()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(HALF_CONFIGS))
def test_half_precision_logits_on_cpu_are_computed_in_float32(dtype, name):
    cfg = HALF_CONFIGS[name]
    zs, zt = logits(15).to(dtype), logits(16).to(dtype)
    got, g_got = value_and_grad(lambda z: sinkhorn_loss(z, zt, cfg), zs)
    ref, g_ref = value_and_grad(lambda z: sinkhorn_loss(z, zt.float(), cfg), zs.float())
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_got, g_ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_costs_divergences_topk_and_solver(dtype):
    x, y = torch.softmax(logits(17), -1).to(dtype), torch.softmax(logits(18), -1).to(dtype)
    for impl in ("auto", "dense", "chunked"):
        cost = cost_matrix(x, y, "l1", impl=impl)
        assert cost.dtype == torch.float32
        torch.testing.assert_close(cost, torch.cdist(x.float(), y.float(), p=1))
    res = sinkhorn(cost.to(dtype), 0.1, max_iter=30)
    assert res.cost.dtype == torch.float32
    torch.testing.assert_close(res.plan, sinkhorn(cost.to(dtype).float(), 0.1, max_iter=30).plan)
    zs, zt = logits(19).to(dtype), logits(20).to(dtype)
    for name in DIVERGENCES:
        got = divergence(zs, zt, name, temperature=2.0)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, divergence(zs.float(), zt.float(), name, temperature=2.0))
    cached = TopKDistribution.from_logits(zt, 4)
    torch.testing.assert_close(sinkhorn_loss(zs, cached), sinkhorn_loss(zs.float(), cached))
