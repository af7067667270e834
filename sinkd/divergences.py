"""Row-wise divergences between teacher and student distributions at a temperature.

All are computed from log-softmax values, so logits of +-1e4 stay finite. Forward KL carries the
usual T^2 factor (Hinton et al.) that keeps its gradient scale independent of T; the others are
reported unscaled, as DistiLLM and the f-divergence literature use them.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_choice, check_logits, check_mask, check_open_unit, check_positive
from .topk import TopKDistribution
from .topk_teacher import check_topk_teacher, teacher_student_log_probs

DIVERGENCES = ("kl", "rkl", "js", "tvd", "skew_kl", "skew_rkl")
REDUCTIONS = ("sum", "mean", "batchmean", "none")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; p = exp(log_p) underflowing to 0 gives 0, never nan."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(weight_p * p + (1 - weight_p) * q), stably."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


def rowwise_divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, name: str, skew_alpha: float = 0.1) -> torch.Tensor:
    """Divergence per row from student / teacher log-probabilities (..., V) -> (...)."""
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
    """D(teacher, student) over rows of logits (N, V) or (B, L, V).

    mask: bool over rows, False rows (padding) contribute nothing. reduction: "sum" over rows,
    "batchmean" = sum / kept rows, "mean" = sum / (kept rows * V) like torch's kl_div, "none" = per row
    (masked rows are 0). teacher_logits may be a TopKDistribution (top-k probabilities at T=1, ids,
    rest mass per row, e.g. from a logit cache): the teacher is then its k probabilities plus the
    rest spread evenly over the other tokens (exact when k = V; see sinkd.topk_teacher).
    """
    check_choice("divergence", name, DIVERGENCES)
    check_choice("reduction", reduction, REDUCTIONS)
    temperature = check_positive("temperature", temperature)
    if name.startswith("skew"):
        check_open_unit("skew_alpha", skew_alpha)
    topk_teacher = isinstance(teacher_logits, TopKDistribution)
    (check_topk_teacher if topk_teacher else check_logits)(student_logits, teacher_logits)
    flat_mask = check_mask(mask, student_logits.shape[:-1])
    if topk_teacher:
        log_ps, log_pt = teacher_student_log_probs(student_logits, teacher_logits, temperature)
    else:
        log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
        log_pt = torch.log_softmax(teacher_logits / temperature, dim=-1)
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
