"""Log-domain Sinkhorn for entropic optimal transport, batched over leading dimensions.

The plan is P = exp((f_i + g_j - C_ij) / eps) for dual potentials f, g; one iteration is a row
normalisation (f update) then a column normalisation (g update), i.e. exactly the plain
`K / K.sum(1); K / K.sum(0)` loop of the SinKD reference when both marginals are all-ones, but
without under/overflow at small eps or large costs.

Large problems (n * m above `block_elements`, e.g. N=8192: 64M entries) are solved in slices of
rows (f update) and columns (g update), so each half-iteration's temporaries are one slice, never a
fresh N x M copy; with grad="envelope" the iterations keep nothing for autograd and the plan is
built in one buffer, in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import check_choice, check_int_at_least, check_open_unit, check_positive

GRAD_MODES = ("unrolled", "envelope")
DEFAULT_BLOCK_ELEMENTS = 1 << 24  # problems up to 16M entries (64 MiB fp32) take the unsliced path


@dataclass
class SinkhornResult:
    """Output of :func:`sinkhorn`; tensors keep the leading batch dimensions of the cost."""

    plan: torch.Tensor  # (..., n, m)
    cost: torch.Tensor  # (...,) transport cost sum(P * C)
    value: torch.Tensor  # (...,) regularised objective sum(P * C) + eps * KL(P | a b^T)
    f: torch.Tensor  # (..., n) row potential
    g: torch.Tensor  # (..., m) column potential
    n_iter: int
    marginal_error: float | None  # L1 row-marginal error at stop (computed when tol is set)


def _log_marginal(weights: torch.Tensor | None, size: int, cost: torch.Tensor, field: str) -> torch.Tensor:
    if weights is None:
        return torch.full((size,), -math.log(size), dtype=cost.dtype, device=cost.device)
    weights = torch.as_tensor(weights, dtype=cost.dtype, device=cost.device)
    if weights.shape[-1] != size:
        raise ValueError(f"{field} has {weights.shape[-1]} entries but the cost has {size} along that side")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError(f"{field} must be finite and >= 0")
    return torch.log(weights)


def sinkhorn(
    cost: torch.Tensor,
    eps: float,
    *,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    max_iter: int = 100,
    tol: float | None = None,
    eps_start: float | None = None,
    eps_decay: float = 0.5,
    grad: str = "unrolled",
    log_a: torch.Tensor | None = None,
    log_b: torch.Tensor | None = None,
    block_elements: int | None = None,
) -> SinkhornResult:
    """Entropic OT between marginals `a` (rows) and `b` (columns) of `cost` (..., n, m).

    a, b: weights (uniform 1/n, 1/m by default; give all-ones for the paper's plain normalisation),
    or their logs via log_a / log_b. tol: stop once the L1 row-marginal error is below it.
    eps_start: anneal eps geometrically (factor eps_decay per iteration) from eps_start down to eps.
    grad: "unrolled" differentiates through the iterations; "envelope" holds the plan constant,
    so d cost = P * dC (the gradient of the regularised value, exact at convergence).
    block_elements: largest temporary (entries) of one log-sum-exp slice; problems with more than
    that many cost entries (default 16M) iterate slice by slice (same values up to rounding).
    """
    eps = check_positive("eps", eps)
    check_int_at_least("max_iter", max_iter, 1)
    check_choice("grad", grad, GRAD_MODES)
    if tol is not None:
        check_positive("tol", tol)
    if eps_start is not None:
        check_positive("eps_start", eps_start)
        check_open_unit("eps_decay", eps_decay)
    if block_elements is not None:
        check_int_at_least("block_elements", block_elements, 1)
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., n, m), got {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    budget = block_elements or DEFAULT_BLOCK_ELEMENTS
    batch = cost[..., 0, 0].numel()
    sliced = batch * n * m > budget
    log_a = log_a if log_a is not None else _log_marginal(a, n, cost, "a")
    log_b = log_b if log_b is not None else _log_marginal(b, m, cost, "b")

    lse = _SlicedLSE(batch * n * m, budget) if sliced else _full_lse
    if grad == "envelope" and sliced:
        with torch.no_grad():
            f, g, n_iter, err = _iterate(cost.detach(), log_a.detach(), log_b.detach(), eps, max_iter, tol, eps_start, eps_decay, lse)
            plan, entropy_term = _lean_plan(cost.detach(), f, g, log_a.detach(), log_b.detach(), eps)
        transport = (plan * cost).sum((-2, -1))
        return SinkhornResult(plan, transport, transport + entropy_term, f, g, n_iter, err)
    if grad == "envelope":
        with torch.no_grad():
            f, g, n_iter, err = _iterate(cost.detach(), log_a.detach(), log_b.detach(), eps, max_iter, tol, eps_start, eps_decay, lse)
            log_plan = (f[..., :, None] + g[..., None, :] - cost.detach()) / eps
            plan = log_plan.exp()
        transport = (plan * cost).sum((-2, -1))
        entropy_term = (eps * _kl_to_product(plan, log_plan, log_a, log_b)).detach()
    else:
        f, g, n_iter, err = _iterate(cost, log_a, log_b, eps, max_iter, tol, eps_start, eps_decay, lse)
        log_plan = (f[..., :, None] + g[..., None, :] - cost) / eps
        plan = log_plan.exp()
        transport = (plan * cost).sum((-2, -1))
        entropy_term = eps * _kl_to_product(plan, log_plan, log_a, log_b)
    return SinkhornResult(plan, transport, transport + entropy_term, f, g, n_iter, err)


def _kl_to_product(plan, log_plan, log_a, log_b):
    log_ab = log_a[..., :, None] + log_b[..., None, :]
    # Entries with zero mass contribute 0 (x log x -> 0); where() keeps inf/nan out of both passes.
    inner = torch.where(plan > 0, log_plan - log_ab, torch.zeros_like(log_plan))
    return (plan * inner).sum((-2, -1))


def _lean_plan(cost, f, g, log_a, log_b, eps):
    """Plan exp((f + g - C) / eps) in one buffer, and eps * KL(P | a b^T) from O(N + M) sums:
    log P = (f_i + g_j - C_ij) / eps gives KL = (r.f + c.g - <P, C>) / eps - r.log a - c.log b
    for the plan's row and column sums r, c (zero-mass rows and columns contribute 0)."""
    plan = torch.neg(cost).add_(f[..., :, None]).add_(g[..., None, :]).div_(eps).exp_()
    rows, cols = plan.sum(-1), plan.sum(-2)
    transport = torch.einsum("...ij,...ij->...", plan, cost)

    def dot(w, v):  # sum w * v with 0 * (-inf) = 0
        return torch.where(w > 0, w * v, torch.zeros_like(w)).sum(-1)

    entropy = dot(rows, f) + dot(cols, g) - transport - eps * (dot(rows, log_a.expand_as(rows)) + dot(cols, log_b.expand_as(cols)))
    return plan, entropy


def _full_lse(t_fn, cost, dim):
    """logsumexp over `dim` of t_fn(cost), in one piece."""
    return torch.logsumexp(t_fn(cost, None), dim=dim)


class _SlicedLSE:
    """logsumexp over one dimension of t_fn(cost) (..., n, m), slice by slice along the other, so a
    temporary is at most `budget` entries: rows for dim=-1, columns for dim=-2."""

    def __init__(self, total: int, budget: int):
        self.total, self.budget = total, budget

    def __call__(self, t_fn, cost, dim):
        n, m = cost.shape[-2:]
        other = n if dim == -1 else m
        step = max(1, (other * self.budget) // self.total)
        parts = []
        for k0 in range(0, other, step):
            sl = slice(k0, k0 + step)
            piece = cost[..., sl, :] if dim == -1 else cost[..., :, sl]
            parts.append(torch.logsumexp(t_fn(piece, sl), dim=dim))
        return torch.cat(parts, dim=-1)


def _part(v, sl):
    """The part of the row potential for a row slice of the cost (all of it when unsliced)."""
    return v if sl is None else v[..., sl]


def _iterate(cost, log_a, log_b, eps, max_iter, tol, eps_start, eps_decay, lse=_full_lse):
    """Alternate row and column updates of the potentials; returns f, g, iterations, error."""
    f = torch.zeros(cost.shape[:-1], dtype=cost.dtype, device=cost.device)
    g = torch.zeros(cost.shape[:-2] + cost.shape[-1:], dtype=cost.dtype, device=cost.device)
    err = None
    for it in range(max_iter):
        e = eps if eps_start is None else max(eps, eps_start * eps_decay**it)
        f = e * (log_a - lse(lambda c, sl: (g[..., None, :] - c) / e, cost, -1))
        g = e * (log_b - lse(lambda c, sl: (f[..., :, None] - c) / e, cost, -2))
        if tol is not None and e == eps:
            with torch.no_grad():
                rows = lse(lambda c, sl: (_part(f, sl)[..., :, None] + g[..., None, :] - c) / e, cost, -1).exp()
                err = float((rows - log_a.exp()).abs().sum(-1).max())
            if err < tol:
                return f, g, it + 1, err
    return f, g, max_iter, err
