"""Issue 13, findings 5 and 6: solver inputs that used to give NaN, a wrong number or a raw torch error
fail up front with one line naming the argument; numeric scalars of any real type are accepted."""

import numpy as np
import ot
import pytest
import torch

from sinkd import ObjectiveConfig, SinkhornConfig, divergence, sinkhorn, sinkhorn_loss


def one_line_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("bad,where", [(float("nan"), "(1, 2)"), (float("inf"), "(1, 2)"), (-float("inf"), "(1, 2)")])
def test_non_finite_cost_is_refused(bad, where):
    cost = torch.rand(3, 4)
    cost[1, 2] = bad
    one_line_error(lambda: sinkhorn(cost, 0.1), f"cost has non-finite values (first at index {where})")


def test_zero_mass_marginals_are_refused():
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, a=torch.zeros(4)), "a has zero total mass")
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, b=torch.zeros(4)), "b has zero total mass")
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, log_b=torch.full((4,), -float("inf"))), "log_b has zero total mass")


def test_unequal_masses_are_refused_instead_of_a_silent_wrong_cost():
    """The issue's case: a = 0.25 * ones(4), b = ones(4) used to return 0.250 with marginal_error ~2."""
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, a=0.25 * torch.ones(4), b=torch.ones(4)),
                   "a and b must have the same total mass (balanced OT; rescale one of them), got 1 and 4")
    batched_b = torch.ones(2, 4)
    batched_b[1] *= 2
    one_line_error(lambda: sinkhorn(torch.rand(2, 4, 4), 0.1, a=torch.ones(4), b=batched_b), "got 4 and 8")
    # Equal masses up to rounding pass, and agree with POT.
    cost = torch.rand(5, 3)
    a, b = torch.full((5,), 0.2), torch.full((3,), 1 / 3)
    res = sinkhorn(cost, 0.1, a=a, b=b, max_iter=100_000, tol=1e-13)
    ref = ot.sinkhorn2(a.numpy(), b.numpy(), cost.numpy(), 0.1, method="sinkhorn_log", stopThr=1e-13, numItermax=100_000)
    assert res.cost.item() == pytest.approx(float(ref), rel=1e-9)


def test_log_weights_with_nan_or_plus_inf_are_refused():
    bad = torch.zeros(4)
    bad[0] = float("nan")
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, log_a=bad), "log_a must not contain NaN or +inf")
    one_line_error(lambda: sinkhorn(torch.rand(4, 4), 0.1, log_b=torch.full((3,), 0.0)), "log_b has 3 entries")


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (3, 0, 4), (0, 4, 4)])
@pytest.mark.parametrize("grad", ["unrolled", "envelope", "implicit"])
def test_empty_problems_return_zeros_of_the_right_shape(shape, grad):
    cost = torch.rand(shape, requires_grad=True)
    res = sinkhorn(cost, 0.1, grad=grad, tol=1e-6)
    assert res.plan.shape == shape and res.cost.shape == shape[:-2] and res.value.shape == shape[:-2]
    assert res.f.shape == shape[:-1] and res.g.shape == shape[:-2] + shape[-1:]
    assert bool((res.cost == 0).all()) and res.n_iter == 0
    res.cost.sum().backward()  # attached to the graph: a training loop can backward through it
    assert cost.grad.shape == shape


def test_cost_that_is_not_a_float_tensor_is_refused():
    one_line_error(lambda: sinkhorn(torch.ones(3, 3, dtype=torch.int64), 0.1), "cost must be a floating-point tensor")


@pytest.mark.parametrize("eps", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), np.array(0.1), 0.1])
@pytest.mark.parametrize("max_iter", [np.int64(50), np.int32(50), torch.tensor(50), 50])
def test_numeric_scalars_of_any_real_type_are_accepted(eps, max_iter):
    cost = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    ref = sinkhorn(cost, 0.1, max_iter=50)
    got = sinkhorn(cost, eps, max_iter=max_iter, tol=np.float32(1e-30), eps_start=np.float64(1.0), eps_decay=torch.tensor(0.5))
    annealed = sinkhorn(cost, 0.1, max_iter=50, tol=1e-30, eps_start=1.0, eps_decay=0.5)
    torch.testing.assert_close(got.plan, annealed.plan, rtol=1e-6, atol=1e-12)
    assert got.n_iter == 50 and ref.n_iter == 50
    cfg = SinkhornConfig(eps=eps, max_iter=max_iter, temperature=np.float32(2.0), group_size=np.int64(4))
    assert type(cfg.eps) is float and type(cfg.max_iter) is int and type(cfg.group_size) is int
    assert cfg == SinkhornConfig(eps=float(eps), max_iter=50, temperature=2.0, group_size=4)
    zs, zt = torch.randn(6, 7), torch.randn(6, 7)
    assert sinkhorn_loss(zs, zt, cfg).item() == pytest.approx(sinkhorn_loss(zs, zt, SinkhornConfig(eps=0.1, max_iter=50, temperature=2.0, group_size=4)).item(), rel=1e-5)


def test_objective_and_divergence_scalars_of_any_real_type():
    cfg = ObjectiveConfig(alpha=np.float32(0.5), beta=torch.tensor(1.0), temperature=np.float64(2.0), ignore_index=np.int64(-100))
    assert (type(cfg.alpha), type(cfg.beta), type(cfg.temperature), type(cfg.ignore_index)) == (float, float, float, int)
    zs, zt = torch.randn(3, 5), torch.randn(3, 5)
    assert divergence(zs, zt, temperature=np.float32(2.0)).item() == pytest.approx(divergence(zs, zt, temperature=2.0).item(), rel=1e-6)


@pytest.mark.parametrize("value", [True, np.bool_(True), torch.tensor(True), "0.1", None, torch.tensor([0.1]), float("nan"), np.float32("inf")])
def test_non_numbers_and_non_finite_scalars_are_still_refused(value):
    one_line_error(lambda: sinkhorn(torch.rand(3, 3), value), "eps must be a finite number > 0, got")
    with pytest.raises(ValueError, match="max_iter must be an integer >= 1"):
        sinkhorn(torch.rand(3, 3), 0.1, max_iter=np.float64(5.0) if value is None else value)
