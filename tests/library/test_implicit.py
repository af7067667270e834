"""Issue 13, finding 1: grad="implicit" is the exact gradient of the reported transport cost <P*, C>
(float64 finite differences, unrolled autograd at convergence), and every grad mode of sinkhorn_loss
reports the quantity it differentiates (envelope: the regularised value)."""

import pytest
import torch
from autograd_helpers import graph_names

from sinkd import SinkhornConfig, sinkhorn, sinkhorn_loss

CONVERGED = {"max_iter": 100_000, "tol": 1e-14}


def rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def finite_differences(fn, x, h=1e-6):
    fd = torch.zeros_like(x)
    flat = fd.view(-1)
    for k in range(x.numel()):
        bump = torch.zeros_like(x).view(-1)
        bump[k] = h
        bump = bump.view_as(x)
        flat[k] = (fn(x + bump) - fn(x - bump)) / (2 * h)
    return fd


def test_issue_reproducer_implicit_is_the_gradient_of_the_cost_envelope_is_not():
    cost = rand(0, 7, 5).requires_grad_()
    grads = {g: torch.autograd.grad(sinkhorn(cost, 0.1, max_iter=300, grad=g).cost, cost)[0] for g in ("envelope", "unrolled", "implicit")}
    fd = finite_differences(lambda c: sinkhorn(c, 0.1, **CONVERGED).cost, cost.detach())
    torch.testing.assert_close(grads["implicit"], fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads["implicit"], grads["unrolled"], rtol=1e-8, atol=1e-12)
    assert (grads["envelope"] - fd).norm() / fd.norm() > 0.1  # the plan alone is the value's gradient, not the cost's


@pytest.mark.parametrize("n,m", [(6, 4), (4, 6), (5, 5), (1, 3)])
def test_implicit_cost_and_value_gradients_match_finite_differences_with_given_marginals(n, m):
    cost = rand(n * 10 + m, n, m).requires_grad_()
    a, b = rand(1, n) + 0.2, rand(2, m) + 0.2
    a, b = a / a.sum(), b / b.sum()
    res = sinkhorn(cost, 0.2, a=a, b=b, grad="implicit", **CONVERGED)
    g_cost, = torch.autograd.grad(res.cost, cost, retain_graph=True)
    g_value, = torch.autograd.grad(res.value, cost)
    torch.testing.assert_close(g_cost, finite_differences(lambda c: sinkhorn(c, 0.2, a=a, b=b, **CONVERGED).cost, cost.detach()), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_value, finite_differences(lambda c: sinkhorn(c, 0.2, a=a, b=b, **CONVERGED).value, cost.detach()), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(g_value, res.plan, rtol=1e-12, atol=0)


def test_implicit_batched_plain_marginals_zero_weights_and_sliced_path_equal_unrolled_at_convergence():
    cost = rand(3, 2, 6, 7).requires_grad_()
    a = torch.ones(6)
    a[2] = 0  # a row without mass: potential -inf, no gradient
    b = torch.ones(7) * 5 / 7
    weights = rand(4, 2)  # a different upstream gradient per problem
    ref, = torch.autograd.grad((sinkhorn(cost, 0.15, a=a, b=b, **CONVERGED).cost * weights).sum(), cost)
    for sliced in (None, 5):
        res = sinkhorn(cost, 0.15, a=a, b=b, grad="implicit", slice_elements=sliced, **CONVERGED)
        got, = torch.autograd.grad((res.cost * weights).sum(), cost)
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-11)
    assert bool((got[:, 2] == 0).all())


def test_implicit_before_convergence_is_exact_for_the_plans_own_marginals():
    """After 20 iterations the plan is the exact entropic plan between its own row sums r and b; the
    implicit gradient is the gradient of that problem's converged cost (unrolled autograd as reference)."""
    cost = rand(5, 8, 8).requires_grad_()
    early = sinkhorn(cost, 0.05, max_iter=20, grad="implicit")
    assert early.plan.sum(-1).sub(1 / 8).abs().max() > 1e-4  # genuinely not converged
    got, = torch.autograd.grad(early.cost, cost)
    r, c = early.plan.sum(-1).detach(), early.plan.sum(-2).detach()
    ref, = torch.autograd.grad(sinkhorn(cost, 0.05, a=r, b=c, **CONVERGED).cost, cost)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10)


def test_implicit_keeps_no_iteration_in_the_graph_and_refuses_marginals_with_grad():
    cost = rand(6, 9, 9).requires_grad_()
    names = graph_names(sinkhorn(cost, 0.1, max_iter=50, grad="implicit").cost)
    assert "ImplicitTransportBackward" in names and not any("Logsumexp" in n or "Exp" in n for n in names)
    with pytest.raises(ValueError, match="^a requires grad, but grad 'implicit' differentiates the cost only; use grad 'unrolled'$"):
        sinkhorn(cost, 0.1, a=torch.full((9,), 1 / 9, requires_grad=True), grad="implicit")


@pytest.mark.parametrize("grad", ["unrolled", "implicit", "envelope"])
@pytest.mark.parametrize("normalization", ["uniform", "plain"])
def test_every_grad_mode_reports_the_loss_it_differentiates(grad, normalization):
    """Finite differences of the returned loss (a converged solver) against its autograd gradient on the
    logits. Before issue 13, envelope returned <P, C> with the gradient of the regularised value."""
    zs = torch.randn(6, 5, generator=torch.Generator().manual_seed(7)).requires_grad_()
    zt = torch.randn(6, 5, generator=torch.Generator().manual_seed(8))
    cfg = SinkhornConfig(eps=0.1, temperature=2.0, normalization=normalization, grad=grad, **CONVERGED)
    got, = torch.autograd.grad(sinkhorn_loss(zs, zt, cfg), zs)
    fd = finite_differences(lambda z: sinkhorn_loss(z, zt, cfg), zs.detach())
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-8)
    n = zs.shape[0]
    cost = torch.cdist(torch.softmax(zs.detach() / 2, -1), torch.softmax(zt / 2, -1), p=1)
    marg = torch.ones(n) if normalization == "plain" else None
    res = sinkhorn(cost, 0.1, a=marg, b=marg, **CONVERGED)
    expected = res.value if grad == "envelope" else res.cost  # envelope reports <P, C> + eps KL(P | a b^T)
    assert sinkhorn_loss(zs, zt, cfg).item() == pytest.approx(expected.item(), rel=1e-12)
    assert abs(res.value.item() - res.cost.item()) > 1e-3


def test_implicit_equals_unrolled_through_sinkhorn_loss_with_groups_at_convergence():
    zs = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(9)).requires_grad_()
    zt = torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(10))
    cfg = SinkhornConfig.paper(group_size=4, **CONVERGED)
    ref, = torch.autograd.grad(sinkhorn_loss(zs, zt, cfg), zs)
    got, = torch.autograd.grad(sinkhorn_loss(zs, zt, cfg, grad="implicit"), zs)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-12)


def test_sample_mode_refuses_modes_without_marginal_gradients():
    for grad in ("envelope", "implicit"):
        with pytest.raises(ValueError, match=f"^grad: '{grad}' needs a cost that depends on the logits; mode 'sample' supports 'unrolled' only$"):
            SinkhornConfig(mode="sample", grad=grad)
