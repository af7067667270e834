"""The solver against POT in float64, its options, gradients and bad inputs."""

import numpy as np
import ot
import pytest
import torch

from sinkd import sinkhorn



def random_problem(seed, n, m, uniform=False):
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(n, m, generator=gen)
    if uniform:
        return cost, torch.full((n,), 1 / n), torch.full((m,), 1 / m)
    a = torch.rand(n, generator=gen) + 0.1
    b = torch.rand(m, generator=gen) + 0.1
    return cost, a / a.sum(), b / b.sum()


def pot_plan(cost, a, b, eps):
    return ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)


@pytest.mark.parametrize("seed,n,m,eps", [(0, 5, 7, 0.05), (1, 12, 12, 0.1), (2, 30, 17, 0.02), (3, 1, 4, 0.1), (4, 9, 1, 0.5)])
def test_plan_and_cost_match_pot(seed, n, m, eps):
    cost, a, b = random_problem(seed, n, m)
    res = sinkhorn(cost, eps, a=a, b=b, max_iter=200_000, tol=1e-13)
    ref = pot_plan(cost, a, b, eps)
    assert res.marginal_error < 1e-13
    np.testing.assert_allclose(res.plan.numpy(), ref, rtol=1e-6, atol=1e-14)
    ref_cost = ot.sinkhorn2(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    np.testing.assert_allclose(res.cost.item(), float(ref_cost), rtol=1e-6)


def test_batched_equals_each_problem_alone():
    problems = [random_problem(s, 6, 6, uniform=True)[0] for s in range(4)]
    batch = sinkhorn(torch.stack(problems).reshape(2, 2, 6, 6), 0.1, max_iter=50)
    assert batch.plan.shape == (2, 2, 6, 6) and batch.cost.shape == (2, 2)
    for k, cost in enumerate(problems):
        alone = sinkhorn(cost, 0.1, max_iter=50)
        torch.testing.assert_close(batch.plan.reshape(4, 6, 6)[k], alone.plan, rtol=1e-12, atol=1e-15)


def test_tolerance_stops_early_and_meets_marginals():
    cost, a, b = random_problem(5, 20, 20)
    res = sinkhorn(cost, 0.5, a=a, b=b, max_iter=10_000, tol=1e-9)
    assert res.n_iter < 10_000 and res.marginal_error < 1e-9
    torch.testing.assert_close(res.plan.sum(-1), a, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.plan.sum(-2), b, atol=1e-12, rtol=0)


def test_eps_scaling_reaches_the_same_plan_faster_at_small_eps():
    cost, a, b = random_problem(6, 25, 25)
    plain = sinkhorn(cost, 0.002, a=a, b=b, max_iter=100_000, tol=1e-10)
    annealed = sinkhorn(cost, 0.002, a=a, b=b, max_iter=100_000, tol=1e-10, eps_start=1.0, eps_decay=0.7)
    torch.testing.assert_close(annealed.plan, plain.plan, rtol=1e-5, atol=1e-9)
    assert annealed.n_iter < plain.n_iter


def test_plain_marginals_are_the_reference_normalisation_loop():
    cost = random_problem(7, 8, 8)[0]
    ones = torch.ones(8)
    res = sinkhorn(cost, 0.1, a=ones, b=ones, max_iter=20)
    plan = torch.exp(-cost / 0.1)
    for _ in range(20):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    torch.testing.assert_close(res.plan, plan, rtol=1e-12, atol=1e-15)


def test_unrolled_gradcheck():
    cost = random_problem(8, 4, 5)[0].requires_grad_()
    assert torch.autograd.gradcheck(lambda c: sinkhorn(c, 0.2, max_iter=15).cost, (cost,))


def test_envelope_gradient_is_the_plan_and_matches_finite_differences_of_the_value():
    cost, a, b = random_problem(9, 5, 6)
    cost.requires_grad_()
    res = sinkhorn(cost, 0.3, a=a, b=b, max_iter=100_000, tol=1e-14, grad="envelope")
    (grad,) = torch.autograd.grad(res.value, cost)
    torch.testing.assert_close(grad, res.plan, rtol=1e-12, atol=0)
    h = 1e-6
    fd = torch.zeros_like(cost)
    for i in range(cost.shape[0]):
        for j in range(cost.shape[1]):
            bump = torch.zeros_like(cost)
            bump[i, j] = h
            vals = [sinkhorn(cost.detach() + s * bump, 0.3, a=a, b=b, max_iter=100_000, tol=1e-14).value for s in (1, -1)]
            fd[i, j] = (vals[0] - vals[1]) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_envelope_and_unrolled_agree_on_the_value_gradient_at_convergence():
    cost = random_problem(10, 6, 6, uniform=True)[0].requires_grad_()
    (g_env,) = torch.autograd.grad(sinkhorn(cost, 0.2, max_iter=5000, tol=1e-14, grad="envelope").value, cost)
    (g_unr,) = torch.autograd.grad(sinkhorn(cost, 0.2, max_iter=5000, tol=1e-14).value, cost)
    torch.testing.assert_close(g_env, g_unr, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"eps": 0.0}, "eps must be"),
        ({"eps": -1.0}, "eps must be"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"grad": "implict"}, "grad: unknown value 'implict'; valid: unrolled, envelope, implicit"),
        ({"tol": 0}, "tol must be"),
        ({"a": torch.ones(3)}, "a has 3 entries"),
        ({"b": -torch.ones(4)}, "b must be finite and >= 0"),
        ({"eps_start": 1.0, "eps_decay": 1.5}, "eps_decay must be in (0, 1)"),
        ({"slice_elements": 0}, "slice_elements must be an integer >= 1, got 0"),
    ],
)
def test_bad_inputs_are_rejected_with_the_field_named(kwargs, message):
    args = {"eps": 0.1, **kwargs}
    with pytest.raises(ValueError) as err:
        sinkhorn(torch.rand(4, 4), args.pop("eps"), **args)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("grad", ["unrolled", "envelope"])
def test_sliced_iterations_give_the_unsliced_results(grad):
    """slice_elements far below n*m forces the slice-by-slice path; values, plan, potentials and the
    gradient must be the unsliced ones (zero weights included: their potentials are -inf)."""
    cost, a, b = random_problem(11, 3 * 13, 17)
    a = a.clone()
    a[4] = 0
    cost = cost.reshape(3, 13, 17).requires_grad_()
    a3 = a.reshape(3, 13)
    a3 = a3 / a3.sum(-1, keepdim=True)  # each problem balanced (sum 1, as b): unequal masses are an error
    whole = sinkhorn(cost, 0.05, a=a3, max_iter=40, tol=1e-30, grad=grad)
    sliced = sinkhorn(cost, 0.05, a=a3, max_iter=40, tol=1e-30, grad=grad, slice_elements=40)
    for name in ("plan", "cost", "value", "g"):
        torch.testing.assert_close(getattr(sliced, name), getattr(whole, name), rtol=1e-12, atol=1e-15)
    assert sliced.marginal_error == pytest.approx(whole.marginal_error, rel=1e-10)
    g_whole, g_sliced = (torch.autograd.grad(r.value.sum(), cost)[0] for r in (whole, sliced))
    torch.testing.assert_close(g_sliced, g_whole, rtol=1e-12, atol=1e-15)


def _big_allocations(fn):
    """Number of fresh tensors (not views, not in-place results) of at least 64*64 entries made while fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        big = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            flat = [*args, *(kwargs or {}).values()]
            seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= Count.limit and t.untyped_storage().data_ptr() not in seen:
                    Count.big += 1
            return out

    Count.limit = 64 * 64
    with Count():
        fn()
    return Count.big


def test_sliced_envelope_path_allocates_no_plan_sized_tensor_per_iteration():
    cost = torch.rand(64, 64).requires_grad_()

    def count(iters, block):
        return _big_allocations(lambda: sinkhorn(cost, 0.1, max_iter=iters, grad="envelope", slice_elements=block).cost.backward())

    sliced = [count(it, 512) for it in (5, 50)]
    unsliced = [count(it, None) for it in (5, 50)]
    assert sliced[0] == sliced[1] <= 4, sliced  # the plan, P * C and its backward: a constant few
    assert unsliced[1] > unsliced[0], unsliced  # the one-piece loop makes N x M temporaries every iteration


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliced_envelope_iterations_at_n8192_stay_within_a_few_plans_on_cuda():
    n = 8192
    cost = torch.rand(n, n, device="cuda", dtype=torch.float32).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sinkhorn(cost, 0.1, max_iter=20, grad="envelope").cost.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 5 * 4 * n * n, extra / 2**20  # plan, P * C, its gradient, the cost's gradient, slices
