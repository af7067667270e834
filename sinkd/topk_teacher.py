"""A teacher known only on its top-k tokens plus one "rest" bucket (what a teacher logit cache stores).

The divergences and the Sinkhorn loss accept such a teacher (:class:`sinkd.TopKDistribution`, at
temperature 1) wherever they accept teacher logits. Two facts make it work:

- Temperature: p_T(v) is proportional to p(v)^(1/T). On the k kept tokens that is exact; the rest
  mass r is treated as spread evenly over the V - k other tokens, so it becomes (V - k) (r / (V - k))^(1/T)
  before renormalising. Exact at T = 1 and when k = V (r = 0).
- Divergences use the same reading of the rest bucket: the teacher is rebuilt over the whole
  vocabulary (its k probabilities, and rest / (V - k) on every other token) and compared with the
  student's full distribution. Exact when k = V. (Collapsing the student onto k + 1 buckets instead
  drops its spread over the tail, which is most of the KL at T > 1: 5.3 instead of 38.2 for SmolLM2
  at k = 64, T = 2, where the even spread gives 24.1; at T = 1 it gives 29.7 of 30.5.)
"""

from __future__ import annotations

import math

import torch

from .topk import TopKDistribution

LOG_FLOOR = -1e4  # stands for log(0): exp() of it is exactly 0, and it keeps 0 * (a - b) free of nan


def teacher_topk(teacher_logits: torch.Tensor, k: int) -> TopKDistribution:
    """Top-k probabilities (temperature 1), their ids and the exact mass of all other tokens."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"topk must be an integer >= 1, got {k!r}")
    logits = teacher_logits.detach()
    logp = torch.log_softmax(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), dim=-1)
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    if k == logp.shape[-1]:
        rest = torch.zeros_like(top[..., 0])
    else:  # summed over the other tokens (not 1 - sum(top): no cancellation when the rest is tiny)
        rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1).exp()
    return TopKDistribution(top.exp(), ids, rest)


def check_topk_teacher(student_logits: torch.Tensor, teacher: TopKDistribution) -> None:
    """One-line errors for a top-k teacher that cannot describe the student's rows."""
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 2 or not student_logits.is_floating_point():
        raise ValueError("student_logits must be a floating-point tensor of shape (N, V) or (B, L, V)")
    probs, ids, rest = teacher
    rows, vocab = tuple(student_logits.shape[:-1]), student_logits.shape[-1]
    if tuple(probs.shape[:-1]) != rows or probs.shape != ids.shape or tuple(rest.shape) != rows:
        raise ValueError(f"teacher (top-k): probs {tuple(probs.shape)}, ids {tuple(ids.shape)} and rest {tuple(rest.shape)} "
                         f"must cover the student's rows {rows} (probs and ids (..., k), rest (...))")
    if probs.shape[-1] > vocab:
        raise ValueError(f"teacher (top-k): k={probs.shape[-1]} exceeds the student's vocabulary V={vocab}")
    if ids.dtype not in (torch.int64, torch.int32) or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab)):
        raise ValueError(f"teacher (top-k): ids must be integer token ids in [0, {vocab})")
    for name, t in (("probs", probs), ("rest", rest)):
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"teacher (top-k): {name} must be finite and >= 0")
    if torch.isfinite(student_logits).all().logical_not():
        raise ValueError("student_logits has non-finite values")


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), torch.full_like(x, LOG_FLOOR))


def tempered_log_probs(teacher: TopKDistribution, temperature: float, vocab: int, dtype=None):
    """(log p_T on the k ids (..., k), log p_T of the rest bucket (...)): the teacher at temperature T."""
    probs, ids, rest = (t.detach() for t in teacher)
    dtype = dtype or probs.dtype
    probs, rest = probs.to(dtype), rest.to(dtype)
    others = vocab - probs.shape[-1]
    log_top = _log(probs) / temperature
    if others > 0:
        log_rest = torch.where(rest > 0, math.log(others) + (_log(rest) - math.log(others)) / temperature,
                               torch.full_like(rest, LOG_FLOOR))
    else:
        log_rest = torch.full_like(rest, LOG_FLOOR)
    norm = torch.logsumexp(torch.cat([log_top, log_rest[..., None]], -1), dim=-1)
    return (log_top - norm[..., None]).clamp_min(LOG_FLOOR), (log_rest - norm).clamp_min(LOG_FLOOR)


def dense_log_probs(teacher: TopKDistribution, temperature: float, vocab: int, dtype=None) -> torch.Tensor:
    """log p_T over the whole vocabulary (..., V): the k kept values, the rest spread evenly."""
    top, rest = tempered_log_probs(teacher, temperature, vocab, dtype)
    others = vocab - top.shape[-1]
    fill = (rest - math.log(others)).clamp_min(LOG_FLOOR) if others > 0 else torch.full_like(rest, LOG_FLOOR)
    dense = fill[..., None].expand(*top.shape[:-1], vocab).clone()
    return dense.scatter_(-1, teacher.ids.long(), top)


def teacher_student_log_probs(student_logits: torch.Tensor, teacher: TopKDistribution, temperature: float):
    """(student log p_T, teacher log p_T), both (..., V), for the row-wise divergences."""
    log_ps = torch.log_softmax(student_logits / temperature, dim=-1)
    return log_ps, dense_log_probs(teacher, temperature, student_logits.shape[-1], log_ps.dtype)


def tempered_distribution(teacher: TopKDistribution, temperature: float, vocab: int, dtype=None) -> TopKDistribution:
    """The teacher at temperature T as a TopKDistribution (probabilities, same ids, rest mass)."""
    log_top, log_rest = tempered_log_probs(teacher, temperature, vocab, dtype)
    return TopKDistribution(log_top.exp(), teacher.ids.long(), log_rest.exp())


def truncate(teacher: TopKDistribution, k: int) -> TopKDistribution:
    """Keep the k most probable of the teacher's ids; the mass of the others joins the rest bucket."""
    if k >= teacher.probs.shape[-1]:
        return teacher
    probs, order = teacher.probs.topk(k, dim=-1)
    dropped = teacher.probs.sum(-1) - probs.sum(-1)
    return TopKDistribution(probs, teacher.ids.gather(-1, order), teacher.rest + dropped.clamp_min(0))


def select_rows(teacher: TopKDistribution, mask: torch.Tensor | None) -> TopKDistribution:
    """Rows flattened to (N, k) / (N,), keeping those where the flat mask is True."""
    k = teacher.probs.shape[-1]
    probs, ids, rest = teacher.probs.reshape(-1, k), teacher.ids.reshape(-1, k), teacher.rest.reshape(-1)
    if mask is not None:
        probs, ids, rest = probs[mask], ids[mask], rest[mask]
    return TopKDistribution(probs, ids, rest)
