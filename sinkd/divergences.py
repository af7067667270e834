"""Row-wise divergences between the teacher's and the student's distributions at a temperature.

With p_t = softmax(teacher / T) and p_s = softmax(student / T) per row: kl = T^2 KL(p_t || p_s),
rkl = KL(p_s || p_t), js, tvd, skew_kl = KL(p_t || a p_t + (1 - a) p_s) and
skew_rkl = KL(p_s || a p_s + (1 - a) p_t). All are computed from log-softmax values, so logits of
+-1e4 stay finite. Forward KL carries the usual T^2 factor (Hinton et al.) that keeps its gradient
scale independent of T; the others are reported unscaled, as DistiLLM and the f-divergence
literature use them.
"""

from __future__ import annotations

import math

import torch

from ._checks import (
    at_least_float32,
    check_choice,
    check_logits,
    check_mask,
    check_open_unit,
    check_positive,
)
from .topk import TopKDistribution, check_topk_teacher, teacher_student_log_probs

DIVERGENCES = ("kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl")
REDUCTIONS = ("sum", "mean", "batchmean", "none")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row with 0 log(0 / q) = 0: p = 0 (-inf logits, underflow) gives 0, never nan, in
    the value and the gradient; p > 0 where q = 0 gives +inf (the usual convention)."""
    p = log_p.exp()
    # where() before the product: the masked difference (nan for -inf - -inf) never meets a gradient.
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), stably; -inf where both are 0, with a zero (not nan) gradient."""
    both = torch.isneginf(log_p) & torch.isneginf(log_q)
    safe_p = torch.where(both, torch.zeros_like(log_p), log_p)
    safe_q = torch.where(both, torch.zeros_like(log_q), log_q)
    mix = torch.logaddexp(safe_p + math.log(weight_p), safe_q + math.log1p(-weight_p))
    return torch.where(both, torch.full_like(mix, -math.inf), mix)


def rowwise_divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, name: str, skew_alpha: float = 0.1) -> torch.Tensor:
    """Divergence per row from log-probabilities, no temperature and no T^2 factor: (..., V) -> (...).

    log_ps: the student's log-probabilities, log_pt: the teacher's (same shape). name as in
    :func:`divergence`: kl = KL(p_t || p_s), rkl = KL(p_s || p_t), js = (KL(p_t || m) + KL(p_s || m)) / 2
    with m = (p_t + p_s) / 2, tvd = sum |p_t - p_s| / 2, skew_kl = KL(p_t || a p_t + (1 - a) p_s),
    skew_rkl = KL(p_s || a p_s + (1 - a) p_t), a = skew_alpha.
    """
    if name == "kl":
        return _kl(log_pt, log_ps)
    if name == "rkl":
        return _kl(log_ps, log_pt)
    if name == "js":
        log_m = _log_mix(log_pt, log_ps, 0.5)
        return 0.5 * _kl(log_pt, log_m) + 0.5 * _kl(log_ps, log_m)
    if name == "tvd":
        return 0.5 * (log_pt.exp() - log_ps.exp()).abs().sum(-1)
    if name == "skew_kl":  # DistiLLM: KL(p_t || a p_t + (1 - a) p_s)
        return _kl(log_pt, _log_mix(log_pt, log_ps, skew_alpha))
    if name == "skew_rkl":  # DistiLLM: KL(p_s || a p_s + (1 - a) p_t)
        return _kl(log_ps, _log_mix(log_ps, log_pt, skew_alpha))
    raise ValueError(f"divergence: unknown value {name!r}; valid: {', '.join(DIVERGENCES)}")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKDistribution,
    name: str = "kl",
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "batchmean",
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    r"""Divergence between the teacher's and the student's distribution of each row, reduced over rows.

    Arguments come student first, but every divergence is defined with the teacher as p_t and the
    student as p_s, at temperature T:

    .. math::

        p_s = \mathrm{softmax}(z_s / T), \qquad p_t = \mathrm{softmax}(z_t / T), \qquad
        \mathrm{KL}(p \,\|\, q) = \sum_v p_v \log \frac{p_v}{q_v}

    - ``"kl"``: :math:`T^2\, \mathrm{KL}(p_t \,\|\, p_s)`, forward KL (teacher first); the only
      one scaled by T^2 [3]_.
    - ``"rkl"``: :math:`\mathrm{KL}(p_s \,\|\, p_t)`, reverse KL (student first), unscaled.
    - ``"js"``: :math:`\tfrac12 \mathrm{KL}(p_t \,\|\, m) + \tfrac12 \mathrm{KL}(p_s \,\|\, m)` with
      :math:`m = \tfrac12 (p_t + p_s)`, symmetric, unscaled.
    - ``"tvd"``: :math:`\tfrac12 \sum_v |p_{t,v} - p_{s,v}|`, symmetric, unscaled.
    - ``"skew_kl"``: :math:`\mathrm{KL}(p_t \,\|\, \alpha p_t + (1 - \alpha) p_s)`, forward skew KL
      [2]_ (teacher first, the teacher mixed into the second argument), unscaled.
    - ``"skew_rkl"``: :math:`\mathrm{KL}(p_s \,\|\, \alpha p_s + (1 - \alpha) p_t)`, reverse skew KL
      [2]_ (student first, the student mixed into the second argument), unscaled.

    with :math:`\alpha` = ``skew_alpha``. KL, RKL and JS are the divergences SinKD [1]_ compares the
    Sinkhorn loss with; skew KL and skew RKL are DistiLLM's [2]_. Only "kl" is multiplied by T^2 (which keeps its gradient
    scale independent of T); the others are returned unscaled whatever T is. Everything is computed
    from log-softmax values, so logits of +-1e4 stay finite, and a probability that underflows to
    0 contributes 0, never nan.

    Parameters
    ----------
    student_logits : Tensor, shape (N, V) or (B, L, V), floating point
        The student's logits z_s (gradients flow into them).
    teacher_logits : Tensor of the same shape, or TopKDistribution
        The teacher's logits z_t (not detached here). Or a :class:`sinkd.TopKDistribution` over the
        same rows (top-k probabilities at T = 1, ids and rest mass, e.g. from a logit cache): p_t is
        then its k probabilities plus the rest spread evenly over the V - k other tokens, tempered
        as :math:`p_t \propto p^{1/T}` (exact when k = V; see :mod:`sinkd.topk`).
    name : {"kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl"}, default "kl"
        Which divergence (table above).
    temperature : float, default 1.0
        T, finite and > 0, applied to both sides.
    mask : Tensor of bool, shape (N,) or (B, L), optional
        Rows to keep; False rows (padding) contribute 0 and get no gradient.
    reduction : {"batchmean", "sum", "mean", "none"}, default "batchmean"
        "sum": sum over kept rows; "batchmean": that sum / number of kept rows (what KD uses);
        "mean": that sum / (kept rows * V), like ``torch.nn.functional.kl_div(reduction="mean")``;
        "none": the per-row values, shape (N,) or (B, L), 0 on masked rows.
    skew_alpha : float, default 0.1
        :math:`\alpha` of the skewed divergences, in (0, 1); checked and used only by them.

    Returns
    -------
    Tensor
        Shape () for "sum" / "batchmean" / "mean", the row shape for "none". With no row kept,
        "batchmean" and "mean" return 0. float32 for float16 / bfloat16 logits (computed in float32),
        else the logits' dtype.

    Notes
    -----
    Masked vocabularies: a logit of -inf is a token of probability 0 (NaN and +inf are errors, and
    so is a row that is -inf everywhere). The usual conventions hold: :math:`0 \log(0/q) = 0`, so a
    token with zero probability on the first argument of a KL contributes 0 (value and gradient);
    one with positive probability there and zero on the second makes the KL +inf. JS, TVD and the
    skewed divergences stay finite (their mixtures are positive wherever either side is).

    Raises
    ------
    ValueError
        One line naming the argument: unknown name or reduction, temperature or skew_alpha out of
        range, shape or vocabulary mismatch, non-finite logits, bad mask shape, bad top-k teacher.

    Examples
    --------
    >>> import torch
    >>> from sinkd import divergence
    >>> student = torch.log(torch.tensor([[0.5, 0.5]]))
    >>> teacher = torch.log(torch.tensor([[0.9, 0.1]]))
    >>> round(divergence(student, teacher, "kl").item(), 4)  # KL(teacher || student)
    0.3681
    >>> round(divergence(student, teacher, "rkl").item(), 4)  # KL(student || teacher)
    0.5108
    >>> round(divergence(student, teacher, "tvd").item(), 4)
    0.4
    >>> divergence(torch.randn(2, 4, 10), torch.randn(2, 4, 10), "js", reduction="none").shape
    torch.Size([2, 4])

    References
    ----------
    .. [1] X. Cui et al. "Sinkhorn Distance Minimization for Knowledge Distillation".
           LREC-COLING 2024. arXiv:2402.17110 (KL, RKL and JS as the KD baselines).
    .. [2] J. Ko, S. Kim, T. Chen, S.-Y. Yun. "DistiLLM: Towards Streamlined Distillation for
           Large Language Models". ICML 2024. arXiv:2402.03898 (skew KL and skew reverse KL).
    .. [3] G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network".
           arXiv:1503.02531 (the T^2 factor).
    """
    check_choice("divergence", name, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    temperature = check_positive("temperature", temperature)
    if name.startswith("skew"):
        check_open_unit("skew_alpha", skew_alpha)
    topk_teacher = isinstance(teacher_logits, TopKDistribution)
    (check_topk_teacher if topk_teacher else check_logits)(student_logits, teacher_logits)
    flat_mask = check_mask(mask, student_logits.shape[:-1])
    student_logits = at_least_float32(student_logits)
    if topk_teacher:
        log_ps, log_pt = teacher_student_log_probs(student_logits, teacher_logits, temperature)
    else:
        log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
        log_pt = torch.log_softmax(at_least_float32(teacher_logits) / temperature, dim=-1)
    per_row = rowwise_divergence(log_ps, log_pt, name, skew_alpha)
    if name == "kl":
        per_row = per_row * temperature**2
    if flat_mask is not None:
        per_row = torch.where(flat_mask.reshape(per_row.shape), per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    kept = per_row.numel() if flat_mask is None else int(flat_mask.sum())
    if reduction == "sum":
        return total
    denom = max(kept, 1) * (student_logits.shape[-1] if reduction == "mean" else 1)
    return total / denom
