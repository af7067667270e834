"""Implicit differentiation of the entropic transport cost <P*, C> at a Sinkhorn fixed point.

P* = exp((f + g - C) / eps) is the exact entropic plan between its own marginals r = P* 1 and
c = P*^T 1 (any plan of that Gibbs form is). Differentiating the optimality conditions (the
Sinkhorn fixed point) with r and c held fixed gives dP = P * (df 1^T + 1 dg^T - dC) / eps, with
(df, dg) solving the linear system H [df; dg] = [(P * dC) 1; (P * dC)^T 1],
H = [[diag(r), P], [P^T, diag(c)]]. The adjoint of that system turns the N x M Jacobian into one
small solve: nothing of the iterations is stored, memory is O(N * M) (the plan) plus the m x m
Schur complement of the smaller side.
"""

from __future__ import annotations

import torch


def _adjoint_potentials(plan: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), (B, n) and (B, m), with H [x; y] = [(P * W) 1; (P * W)^T 1]; float64; the gauge
    (x + t, y - t) is fixed by y summing to 0 over the columns that carry mass."""
    p = plan.double()
    pw = p * weight.double()
    u, v = pw.sum(-1), pw.sum(-2)
    if p.shape[-2] < p.shape[-1]:  # eliminate the larger side: the solve is min(n, m)^3
        y, x = _adjoint_potentials(plan.transpose(-1, -2), weight.transpose(-1, -2))
        return x, y
    r, c = p.sum(-1), p.sum(-2)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))  # an empty row has u = 0 and P y = 0: x = 0
    scaled = p / r_safe[..., :, None]
    schur = -(p.transpose(-1, -2) @ scaled)  # -P^T diag(1/r) P, (B, m, m)
    support = (c > 0).to(p.dtype)
    schur = schur + torch.diag_embed(c + (1 - support))  # + diag(c); an empty column: y = 0
    count = support.sum(-1).clamp_min(1)
    gauge = (c.sum(-1) / count**2)[..., None, None] * support[..., :, None] * support[..., None, :]
    rhs = v - (scaled.transpose(-1, -2) @ u[..., :, None]).squeeze(-1)
    y = torch.linalg.solve(schur + gauge, rhs[..., :, None]).squeeze(-1)
    x = (u - (p @ y[..., :, None]).squeeze(-1)) / r_safe
    return x, y


def transport_cost_grad(plan: torch.Tensor, cost: torch.Tensor, eps: float) -> torch.Tensor:
    r"""Gradient of the transport cost :math:`\langle P^\star(C), C \rangle` with respect to C, by
    implicit differentiation at the plan's Sinkhorn fixed point.

    For a plan of Gibbs form :math:`P = \exp((f 1^\top + 1 g^\top - C)/\varepsilon)` with row sums r
    and column sums c (the exact entropic plan between r and c, held fixed):

    .. math::

        \frac{\partial \langle P^\star, C \rangle}{\partial C}
            = P + P \odot \frac{x 1^\top + 1 y^\top - C}{\varepsilon},
        \qquad
        \begin{pmatrix} \mathrm{diag}(r) & P \\ P^\top & \mathrm{diag}(c) \end{pmatrix}
        \begin{pmatrix} x \\ y \end{pmatrix}
        = \begin{pmatrix} (P \odot C) 1 \\ (P \odot C)^\top 1 \end{pmatrix}

    (x, y: the adjoint potentials, unique up to x + t, y - t, which leaves the gradient unchanged).
    The system is solved through its Schur complement on the smaller side, in float64.

    Parameters
    ----------
    plan : Tensor, shape (..., n, m)
        Sinkhorn plan P (e.g. ``sinkhorn(...).plan``), nonnegative.
    cost : Tensor, shape (..., n, m)
        The cost C it was computed from.
    eps : float
        The entropic regularisation of that plan, > 0.

    Returns
    -------
    Tensor, shape (..., n, m)
        The gradient, in the dtype of ``plan``.

    Examples
    --------
    >>> import torch
    >>> from sinkd import sinkhorn
    >>> from sinkd.implicit import transport_cost_grad
    >>> cost = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    >>> res = sinkhorn(cost, 0.1, max_iter=2000, tol=1e-13)
    >>> (unrolled,) = torch.autograd.grad(res.cost, cost)
    >>> bool(torch.allclose(transport_cost_grad(res.plan.detach(), cost.detach(), 0.1), unrolled, atol=1e-8))
    True
    """
    lead = plan.shape[:-2]
    p3, c3 = plan.reshape(-1, *plan.shape[-2:]), cost.reshape(-1, *cost.shape[-2:]).to(plan.dtype)
    x, y = _adjoint_potentials(p3, c3)
    shift = (x.to(plan.dtype)[..., :, None] + y.to(plan.dtype)[..., None, :] - c3) / eps
    return (p3 + p3 * shift).reshape(*lead, *plan.shape[-2:])


class ImplicitTransport(torch.autograd.Function):
    """(transport, value) = (<P, C>, <P, C> + entropy) for a plan computed without autograd; backward:
    d transport / dC = :func:`transport_cost_grad`, d value / dC = P (envelope theorem at the same
    fixed point). Call as ``ImplicitTransport.apply(cost, plan, entropy_term, eps)``; only ``cost``
    receives a gradient."""

    @staticmethod
    def forward(ctx, cost, plan, entropy_term, eps):
        ctx.save_for_backward(cost, plan)
        ctx.eps = eps
        transport = torch.einsum("...ij,...ij->...", plan, cost)
        return transport, transport + entropy_term

    @staticmethod
    def backward(ctx, grad_transport, grad_value):
        cost, plan = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.zeros_like(plan)
            if grad_transport is not None:
                grad = grad + grad_transport[..., None, None] * transport_cost_grad(plan, cost, ctx.eps)
            if grad_value is not None:
                grad = grad + grad_value[..., None, None] * plan
            grad = grad.to(cost.dtype)
        return grad, None, None, None
