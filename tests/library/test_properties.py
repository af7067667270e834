"""Property tests: non-negativity, minimality at identity, symmetry, stability at extremes, edge sizes."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from sinkd import DIVERGENCES, SinkhornConfig, divergence, sinkhorn_loss


sizes = st.tuples(st.integers(1, 6), st.integers(1, 6))
scales = st.sampled_from([0.1, 1.0, 10.0, 1e4])
seeds = st.integers(0, 2**31 - 1)
costs = st.sampled_from(["l1", "l2", "sqeuclidean", "cosine"])


def draw_logits(seed, n, v, scale):
    gen = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(2, n, v, generator=gen)
    return z[0].clone().requires_grad_(), z[1].clone()


@given(sizes, scales, seeds, costs, st.sampled_from(["unrolled", "envelope"]))
def test_sinkhorn_loss_finite_nonnegative_with_finite_gradients(size, scale, seed, cost, grad):
    zs, zt = draw_logits(seed, *size, scale)
    loss = sinkhorn_loss(zs, zt, cost=cost, grad=grad)
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() >= -1e-12
    assert torch.isfinite(zs.grad).all()


@given(sizes, scales, seeds, st.sampled_from(DIVERGENCES))
def test_divergences_finite_nonnegative_and_zero_at_identity(size, scale, seed, name):
    zs, zt = draw_logits(seed, *size, scale)
    value = divergence(zs, zt, name, temperature=2.0)
    value.backward()
    assert math.isfinite(value.item()) and value.item() >= -1e-12
    assert torch.isfinite(zs.grad).all()
    same = divergence(zt, zt.clone(), name, temperature=2.0)
    assert abs(same.item()) < 1e-9 and same.item() <= value.item() + 1e-12


@given(sizes, st.sampled_from([0.1, 1.0, 10.0]), seeds)
def test_batch_ot_of_identical_sets_is_near_zero_and_below_a_perturbed_student(size, scale, seed):
    """Unregularised OT between a set and itself is 0; the entropic plan leaks at most ~eps per row."""
    n, v = size
    zs, zt = draw_logits(seed, n, v, scale)
    cfg = SinkhornConfig(eps=1e-3, eps_start=1.0, eps_decay=0.8, max_iter=3000, tol=1e-9)
    at_identity = sinkhorn_loss(zt, zt.clone(), cfg)
    assert 0 <= at_identity.item() <= cfg.eps
    assert at_identity.item() <= sinkhorn_loss(zs.detach(), zt, cfg).item() + cfg.eps


@given(sizes, scales, seeds)
def test_symmetric_where_the_math_says_so(size, scale, seed):
    zs, zt = draw_logits(seed, *size, scale)
    zs = zs.detach()
    for name in ("js", "tvd"):
        assert math.isclose(divergence(zs, zt, name).item(), divergence(zt, zs, name).item(), rel_tol=1e-9, abs_tol=1e-12)
    # Uniform marginals, converged plan: swapping the sides transposes the problem.
    cfg = SinkhornConfig(eps=0.1, max_iter=20000, tol=1e-12)
    assert math.isclose(sinkhorn_loss(zs, zt, cfg).item(), sinkhorn_loss(zt, zs, cfg).item(), rel_tol=1e-7, abs_tol=1e-12)


@given(sizes, seeds, st.sampled_from([1e-4, 1e-3, 0.1]), st.sampled_from([torch.float32, torch.float64]))
def test_tiny_eps_and_huge_logits_give_finite_values_and_gradients(size, seed, eps, dtype):
    zs, zt = draw_logits(seed, *size, 1e4)
    zs = zs.detach().to(dtype).requires_grad_()
    for preset in (SinkhornConfig(eps=eps, max_iter=30), SinkhornConfig.paper(eps=eps)):
        loss = sinkhorn_loss(zs, zt.to(dtype), preset)
        (grad,) = torch.autograd.grad(loss, zs)
        assert math.isfinite(loss.item()) and torch.isfinite(grad).all()


def test_single_row_and_single_class():
    zs = torch.randn(4, 1, requires_grad=True)
    for loss in (sinkhorn_loss(zs, torch.randn(4, 1)), sinkhorn_loss(zs, torch.randn(4, 1), SinkhornConfig.paper()),
                 sinkhorn_loss(zs, torch.randn(4, 1), mode="sample")):
        assert loss.item() == 0.0  # a single class: every distribution is the same point
        (grad,) = torch.autograd.grad(loss, zs)
        assert torch.isfinite(grad).all()
    single = sinkhorn_loss(torch.tensor([[0.3, -1.0]], requires_grad=True), torch.tensor([[1.0, 0.0]]))
    p = torch.softmax(torch.tensor([0.3, -1.0]), -1)
    q = torch.softmax(torch.tensor([1.0, 0.0]), -1)
    torch.testing.assert_close(single, (p - q).abs().sum())  # N=1: the plan is the single pair
