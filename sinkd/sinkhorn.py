"""Log-domain Sinkhorn for entropic optimal transport, batched over leading dimensions.

The plan is P = exp((f_i + g_j - C_ij) / eps) for dual potentials f, g; one iteration is a row
normalisation (f update) then a column normalisation (g update), i.e. exactly the plain
`K / K.sum(1); K / K.sum(0)` loop of the SinKD reference when both marginals are all-ones, but
without under/overflow at small eps or large costs.

Large problems (more than `slice_elements` cost entries, e.g. N=8192: 64M entries) are solved in
slices of rows (f update) and columns (g update), so each half-iteration's temporaries are one
slice, never a fresh N x M copy; with grad="envelope" the iterations keep nothing for autograd and
the plan is built in one buffer, in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_finite,
    check_int_at_least,
    check_open_unit,
    check_positive,
)
from .implicit import ImplicitTransport

GRAD_MODES = ("unrolled", "envelope", "implicit")
DEFAULT_SLICE_ELEMENTS = 1 << 24  # problems up to 16M entries (64 MiB fp32) take the unsliced path


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
        return torch.full((size,), -math.log(max(size, 1)), dtype=cost.dtype, device=cost.device)
    weights = torch.as_tensor(weights, dtype=cost.dtype, device=cost.device)
    if weights.dim() == 0 or weights.shape[-1] != size:
        raise ValueError(f"{field} has {weights.shape[-1] if weights.dim() else 0} entries but the cost has {size} along that side")
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
    slice_elements: int | None = None,
) -> SinkhornResult:
    r"""Entropic optimal transport between the rows and columns of ``cost``, in the log domain.

    Solves, for each problem in the leading (batch) dimensions of ``cost``,

    .. math::

        P^\star = \operatorname*{argmin}_{P \ge 0,\ P \mathbf{1}_m = a,\ P^\top \mathbf{1}_n = b}
                  \langle P, C \rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a b^\top),
        \qquad \mathrm{KL}(P \,\|\, a b^\top) = \sum_{ij} P_{ij} \log \frac{P_{ij}}{a_i b_j}

    by Sinkhorn's alternating scaling [2]_ written on the dual potentials f (n,) and g (m,):

    .. math::

        f_i \leftarrow \varepsilon \Big(\log a_i - \operatorname{logsumexp}_j \frac{g_j - C_{ij}}{\varepsilon}\Big),
        \qquad
        g_j \leftarrow \varepsilon \Big(\log b_j - \operatorname{logsumexp}_i \frac{f_i - C_{ij}}{\varepsilon}\Big),

    and returns the plan :math:`P_{ij} = \exp((f_i + g_j - C_{ij}) / \varepsilon)`. Each iteration
    updates f then g, so after the last one the column sums equal b (up to rounding) and the row
    sums approach a. With ``a = b = 1`` (all-ones) one iteration is the reference SinKD loop
    ``K = K / K.sum(1); K = K / K.sum(0)`` on ``K = exp(-C / eps)`` [1]_, without its under/overflow.

    Parameters
    ----------
    cost : Tensor, shape (..., n, m), floating point
        Ground cost C; leading dimensions are independent problems solved together.
    eps : float
        Entropic regularisation, finite and > 0. Smaller is sharper (closer to unregularised OT) and
        needs more iterations.
    a : Tensor, shape (n,) or (..., n), optional
        Row weights, finite and >= 0 (zeros allowed: that row gets potential -inf and no mass).
        Default uniform 1/n. Pass ``torch.ones(n)`` for the paper's plain normalisation. Their total
        must be > 0 and equal that of ``b`` (a balanced problem; an error otherwise): the solver
        does not renormalise them.
    b : Tensor, shape (m,) or (..., m), optional
        Column weights, as ``a``. Default uniform 1/m.
    max_iter : int, default 100
        Number of (f, g) iterations, >= 1; the solver stops earlier only when ``tol`` is set.
    tol : float, optional
        Stop once the L1 row-marginal error max over the batch of sum_i |P 1 - a|_i is below tol
        (checked every iteration once eps has reached its final value; costs one extra
        log-sum-exp per iteration). None: always run max_iter iterations.
    eps_start : float, optional
        Epsilon annealing: iteration t uses max(eps, eps_start * eps_decay**t). None: eps throughout.
    eps_decay : float, default 0.5
        Annealing factor, in (0, 1); only used with ``eps_start``.
    grad : {"unrolled", "envelope", "implicit"}, default "unrolled"
        How ``cost`` and ``value`` are differentiated with respect to the cost matrix C:

        - "unrolled": autograd through every iteration (as the paper's code): the exact gradient of
          what the iterations computed, converged or not; keeps every iteration's n x m tensors.
        - "implicit": iterations without autograd, then implicit differentiation at the plan's fixed
          point: ``cost`` gets :math:`P + P \odot (x 1^\top + 1 y^\top - C)/\varepsilon` (x, y from one
          small linear solve, see :func:`sinkd.implicit.transport_cost_grad`), the exact gradient
          of :math:`\langle P^\star, C \rangle` for the plan's own marginals (equal to unrolled at
          convergence); ``value`` gets P. O(n m) memory, no stored iterations.
        - "envelope": iterations without autograd and the plan held constant: both ``cost`` and
          ``value`` get P, which is the exact gradient of ``value`` at convergence (envelope theorem)
          but not of ``cost`` (24-39% off on random costs): differentiate ``value`` in this mode.

        In "implicit" and "envelope" ``plan``, ``f`` and ``g`` carry no gradient and the marginals may
        not require one (an error: use "unrolled").
    log_a, log_b : Tensor, optional
        log of the row / column weights, used instead of ``a`` / ``b`` when given (-inf marks a zero
        weight; NaN, +inf, zero or unequal total masses are errors). Useful when the weights are
        log-probabilities already.
    slice_elements : int, optional
        Memory budget of the solver, in tensor entries (>= 1; default 2**24 = 16M). When the cost
        has more entries than this (batch * n * m), each log-sum-exp is computed over slices of
        rows (f update) or columns (g update) holding at most about this many entries, and with
        grad="envelope" the plan is built in one buffer, in place. Same values up to rounding;
        smaller is leaner and slower.

    Returns
    -------
    SinkhornResult
        ``plan`` (..., n, m): P. ``cost`` (...,): the transport cost <P, C>. ``value`` (...,): the
        regularised objective <P, C> + eps * KL(P || a b^T). ``f`` (..., n), ``g`` (..., m): the dual
        potentials. ``n_iter`` (int): iterations run. ``marginal_error`` (float or None): the L1
        row-marginal error at the last check, None when ``tol`` is None.

    Raises
    ------
    ValueError
        One line naming the argument: eps, max_iter, grad, tol, eps_start, eps_decay, slice_elements
        out of range (numbers of any real type are accepted: Python, numpy, 0-d tensors); ``cost``
        not a floating-point tensor of at least 2-D or with NaN / infinite entries; a / b of the
        wrong length, negative or non-finite; log_a / log_b with NaN or +inf; a side with zero total
        mass, or a and b of different total masses (relative gap above sqrt(machine eps)): the solver
        is balanced, it does not renormalise.

    Notes
    -----
    An empty problem (n = 0 or m = 0, or an empty batch) has nothing to transport: the result is a
    zero plan of shape (..., n, m), zero cost and value (still attached to the graph) and n_iter 0.
    float16 / bfloat16 costs are solved in float32 (results in float32, gradients back in the cost's
    dtype).

    Examples
    --------
    >>> import torch
    >>> from sinkd import sinkhorn
    >>> cost = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> result = sinkhorn(cost, eps=0.5, max_iter=100, tol=1e-6)
    >>> result.plan.sum(-1)  # row marginals: uniform 1/n
    tensor([0.5000, 0.5000])
    >>> round(result.cost.item(), 4)  # 2 * 0.5 / (1 + e^2): the off-diagonal mass
    0.1192
    >>> sinkhorn(torch.rand(4, 3, 5), eps=0.1).plan.shape  # a batch of 4 problems
    torch.Size([4, 3, 5])

    References
    ----------
    .. [1] X. Cui, Y. Qin, Y. Gao, E. Zhang, Z. Xu, T. Wu, K. Li, X. Sun, W. Zhou, H. Li.
           "Sinkhorn Distance Minimization for Knowledge Distillation". LREC-COLING 2024.
           arXiv:2402.17110.
    .. [2] M. Cuturi. "Sinkhorn Distances: Lightspeed Computation of Optimal Transport".
           NeurIPS 2013. arXiv:1306.0895.
    """
    eps = check_positive("eps", eps)
    max_iter = check_int_at_least("max_iter", max_iter, 1)
    check_choice("grad", grad, GRAD_MODES)
    if tol is not None:
        tol = check_positive("tol", tol)
    if eps_start is not None:
        eps_start = check_positive("eps_start", eps_start)
        eps_decay = check_open_unit("eps_decay", eps_decay)
    if slice_elements is not None:
        slice_elements = check_int_at_least("slice_elements", slice_elements, 1)
    if not isinstance(cost, torch.Tensor) or not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point tensor, got {getattr(cost, 'dtype', type(cost).__name__)}")
    if cost.dim() < 2:
        raise ValueError(f"cost must have shape (..., n, m), got {tuple(cost.shape)}")
    if cost.dtype in (torch.float16, torch.bfloat16):  # solved in float32 (the gradient returns in the cost's dtype)
        cost = cost.float()
    n, m = cost.shape[-2:]
    log_a = _log_weights(log_a, "log_a", n, cost) if log_a is not None else _log_marginal(a, n, cost, "a")
    log_b = _log_weights(log_b, "log_b", m, cost) if log_b is not None else _log_marginal(b, m, cost, "b")
    if cost.numel() == 0:  # nothing to transport: zeros of the right shapes, still attached to the graph
        zero = cost.sum((-2, -1)) * 0
        f = cost.new_zeros(cost.shape[:-1])
        g = cost.new_zeros(cost.shape[:-2] + cost.shape[-1:])
        return SinkhornResult(cost * 0, zero, zero, f, g, 0, 0.0 if tol is not None else None)
    check_finite("cost", cost)
    _check_masses(log_a, log_b, "log_a" if a is None and log_a is not None else "a", "log_b" if b is None and log_b is not None else "b")
    if grad != "unrolled":
        for field, w in (("a", a), ("b", b), ("log_a", log_a), ("log_b", log_b)):
            if isinstance(w, torch.Tensor) and w.requires_grad:
                raise ValueError(f"{field} requires grad, but grad {grad!r} differentiates the cost only; use grad 'unrolled'")
    budget = slice_elements or DEFAULT_SLICE_ELEMENTS
    batch = cost[..., 0, 0].numel()
    sliced = batch * n * m > budget
    lse = _SlicedLSE(batch * n * m, budget) if sliced else _full_lse
    if grad in ("envelope", "implicit"):
        with torch.no_grad():
            f, g, n_iter, err = _iterate(cost.detach(), log_a.detach(), log_b.detach(), eps, max_iter, tol, eps_start, eps_decay, lse)
            if sliced:
                plan, entropy_term = _lean_plan(cost.detach(), f, g, log_a.detach(), log_b.detach(), eps)
            else:
                log_plan = (f[..., :, None] + g[..., None, :] - cost.detach()) / eps
                plan = log_plan.exp()
                entropy_term = eps * _kl_to_product(plan, log_plan, log_a, log_b)
        if grad == "implicit":
            transport, value = ImplicitTransport.apply(cost, plan, entropy_term, eps)
            return SinkhornResult(plan, transport, value, f, g, n_iter, err)
        transport = (plan * cost).sum((-2, -1))
        return SinkhornResult(plan, transport, transport + entropy_term, f, g, n_iter, err)
    f, g, n_iter, err = _iterate(cost, log_a, log_b, eps, max_iter, tol, eps_start, eps_decay, lse)
    log_plan = (f[..., :, None] + g[..., None, :] - cost) / eps
    plan = log_plan.exp()
    transport = (plan * cost).sum((-2, -1))
    entropy_term = eps * _kl_to_product(plan, log_plan, log_a, log_b)
    return SinkhornResult(plan, transport, transport + entropy_term, f, g, n_iter, err)


def _log_weights(log_w, field: str, size: int, cost: torch.Tensor) -> torch.Tensor:
    """Given log-weights: the right length, no NaN and no +inf (-inf marks a zero weight)."""
    log_w = torch.as_tensor(log_w, dtype=cost.dtype, device=cost.device)
    if log_w.dim() == 0 or log_w.shape[-1] != size:
        raise ValueError(f"{field} has {log_w.shape[-1] if log_w.dim() else 0} entries but the cost has {size} along that side")
    if bool((torch.isnan(log_w) | torch.isposinf(log_w)).any()):
        raise ValueError(f"{field} must not contain NaN or +inf (-inf marks a zero weight)")
    return log_w


def _check_masses(log_a: torch.Tensor, log_b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Each problem's marginals carry mass, the same on both sides (relative tolerance sqrt(machine eps))."""
    mass_a = torch.logsumexp(log_a.double(), -1).exp()
    mass_b = torch.logsumexp(log_b.double(), -1).exp()
    for name, mass in ((name_a, mass_a), (name_b, mass_b)):
        if bool((mass == 0).any()):
            raise ValueError(f"{name} has zero total mass: nothing to transport")
        if not bool(torch.isfinite(mass).all()):
            raise ValueError(f"{name} has an infinite total mass")
    mass_a, mass_b = torch.broadcast_tensors(mass_a, mass_b)
    gap = (mass_a - mass_b).abs() / torch.maximum(mass_a, mass_b)
    if bool((gap > math.sqrt(torch.finfo(log_a.dtype).eps)).any()):
        k = int(gap.reshape(-1).argmax())
        raise ValueError(f"{name_a} and {name_b} must have the same total mass (balanced OT; rescale one of them), "
                         f"got {float(mass_a.reshape(-1)[k]):.6g} and {float(mass_b.reshape(-1)[k]):.6g}")


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
