r"""The teacher's unknown tail in the sparse L1 cost, as a lognormal spread around the student.

A top-k teacher j is known on its ids K_j; outside them only its mass R_j is. For a student row p
(known on every token), the L1 cost splits into the head, exact, and the tail:

.. math::

    C = \sum_{v \in K_j} |p_v - t_v| + \sum_{v \notin K_j} |p_v - t_v|.

Model of the tail: :math:`t_v = \rho\, \eta_v\, p_v` with :math:`\eta_v` lognormal of mean 1 and
log-standard deviation :math:`\sigma`, and :math:`\rho = R / S` so that the tail's mass is R
(S = the student's mass outside K_j). Its expectation has a closed form (the Black-Scholes one):

.. math::

    \mathbb{E} \sum_{v \notin K_j} |p_v - t_v| = R\,(2\Phi(d_1) - 1) + S\,(1 - 2\Phi(d_2)),
    \qquad d_{1,2} = \frac{\log(R / S)}{\sigma} \pm \frac{\sigma}{2}.

Its derivative in any tail token's p_v is :math:`1 - 2\Phi(d_2) = \Pr(t_v < p_v) - \Pr(t_v > p_v)`:
the expected sign of :math:`p_v - t_v`, where the rest bucket (:math:`|S - R|`, the limit
:math:`\sigma \to 0`) gives every tail token the one sign of S - R. :math:`\sigma` is estimated per
pair from the head, where both sides are known: the standard deviation of
:math:`\log(t_v / p_v)` over the ids of K_j with both probabilities > 0, held constant in the
backward (an estimate of the model, like the plan in the envelope gradient; the head's tokens keep
their exact signs). k = V gives S = R = 0: the exact L1 cost.
"""

from __future__ import annotations

import math

import torch

SIGMA_FLOOR = 1e-6  # below it the tail is the rest bucket |S - R| to rounding


def _phi(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _d(student_tail: torch.Tensor, teacher_tail: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d1, d2); a zero mass gives +-inf, both zero give 0 (and a zero tail term)."""
    log_ratio = torch.log(teacher_tail) - torch.log(student_tail)  # +-inf when one side is 0
    log_ratio = torch.where((teacher_tail == 0) & (student_tail == 0), torch.zeros_like(log_ratio), log_ratio)
    d1 = log_ratio / sigma + sigma / 2
    return d1, d1 - sigma


class LognormalTail(torch.autograd.Function):
    """R (2 Phi(d1) - 1) + S (1 - 2 Phi(d2)) elementwise; gradients 1 - 2 Phi(d2) in S and 2 Phi(d1) - 1 in R
    (sigma held constant). Call as ``LognormalTail.apply(S, R, sigma)`` with broadcastable tensors."""

    @staticmethod
    def forward(ctx, student_tail, teacher_tail, sigma):
        d1, d2 = _d(student_tail, teacher_tail, sigma)
        ctx.save_for_backward(d1, d2)
        return teacher_tail * (2 * _phi(d1) - 1) + student_tail * (1 - 2 * _phi(d2))

    @staticmethod
    def backward(ctx, grad):
        d1, d2 = ctx.saved_tensors
        g_s = grad * (1 - 2 * _phi(d2)) if ctx.needs_input_grad[0] else None
        g_r = grad * (2 * _phi(d1) - 1) if ctx.needs_input_grad[1] else None
        return g_s, g_r, None


def head_log_ratio_sigma(gathered: torch.Tensor, t_probs: torch.Tensor) -> torch.Tensor:
    """Per pair, the standard deviation of log(t_v / p_v) over the teacher's ids where both are > 0;
    gathered (r, M, k) student probabilities at the teacher's ids, t_probs (M, k). No gradient; at
    least SIGMA_FLOOR (fewer than two usable ids: the floor)."""
    with torch.no_grad():
        t = t_probs.expand_as(gathered)
        ok = (gathered > 0) & (t > 0)
        tiny = torch.finfo(gathered.dtype).tiny
        ratio = torch.where(ok, t.clamp_min(tiny).log() - gathered.clamp_min(tiny).log(), torch.zeros_like(gathered))
        count = ok.sum(-1).clamp_min(1)
        mean = ratio.sum(-1) / count
        var = (torch.where(ok, ratio - mean[..., None], torch.zeros_like(ratio)) ** 2).sum(-1) / count
        return var.sqrt().clamp_min(SIGMA_FLOOR)


def lognormal_chunk_cost(ps: torch.Tensor, t_probs: torch.Tensor, t_ids: torch.Tensor, t_rest: torch.Tensor) -> torch.Tensor:
    """Cost rows (r, M) for a chunk of student rows ps (r, V) against a top-k teacher (M, k) / (M,)."""
    flat = t_ids.reshape(-1)
    # index_select, not ps[:, t_ids]: its backward is index_add (faster than advanced indexing's index_put).
    gathered = ps.index_select(1, flat).view(ps.shape[0], *t_ids.shape)
    head = (gathered - t_probs).abs().sum(-1)
    student_tail = (1 - gathered.sum(-1)).clamp_min(0)  # rows of ps sum to 1
    sigma = head_log_ratio_sigma(gathered.detach(), t_probs.detach())
    return head + LognormalTail.apply(student_tail, t_rest.expand_as(student_tail), sigma)
