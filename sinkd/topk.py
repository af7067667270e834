"""A distribution known only on its top-k tokens plus one "rest" bucket, and the sparse L1 cost.

:class:`TopKDistribution` is what a teacher logit cache stores: per row, the k largest
probabilities, their token ids, and the mass of every other token. Build one with
:meth:`TopKDistribution.from_logits` (from logits, the rest mass exact) or
:meth:`TopKDistribution.from_probs` (from probabilities). The divergences and the Sinkhorn loss
accept such a teacher (at temperature 1) wherever they accept teacher logits. Two readings make
that work:

- Temperature: p_T(v) is proportional to p(v)^(1/T). On the k kept tokens that is exact; the rest
  mass r is treated as spread evenly over the V - k other tokens, so it becomes (V - k) (r / (V - k))^(1/T)
  before renormalising. Exact at T = 1 and when k = V (r = 0).
- Divergences use the same reading of the rest bucket: the teacher is rebuilt over the whole
  vocabulary (its k probabilities, and rest / (V - k) on every other token) and compared with the
  student's full distribution. Exact when k = V. (Collapsing the student onto k + 1 buckets instead
  drops its spread over the tail, which is most of the KL at T > 1: 5.3 instead of 38.2 for SmolLM2
  at k = 64, T = 2, where the even spread gives 24.1; at T = 1 it gives 29.7 of 30.5.)

Sparse-vocabulary L1 cost (:func:`topk_l1_cost`): for student row i and teacher row j the support
is U = K_t(j) ∪ K_s(i) (their top-k token ids); all other mass goes to one "rest" bucket per side.
The teacher is known only on its top-k, so its value outside K_t(j) is 0 and that mass sits in its
bucket:

    C[i, j] = sum_{v in U} |p_s[i, v] - t[j, v]| + |rest_s(i, U) - rest_t(j)|

With A = sum_{K_t(j)} |p_s - p_t|, B = sum_{K_t(j)} p_s, D = sum_{K_t(j) ∩ K_s(i)} p_s and
S = sum_{K_s(i)} p_s this is A + (S - D) + |1 - (B + S - D) - rest_t|: gathers of the student's
rows at the teacher's ids, O(N * M * k) work, exact when k = V. That is ``tail="bucket"``: every
token outside the union gets the bucket's one sign in the gradient. ``tail="lognormal"``
(:mod:`sinkd.topk_tail`) instead spreads the teacher's rest around the student's own tail by a
lognormal factor measured on the head: each tail token gets the expected sign of p_s - p_t, and
the gradient follows the full vocabulary's (same O(N * M * k) gathers, exact when k = V).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import check_choice, check_int_at_least, check_logit_values
from .topk_tail import lognormal_chunk_cost

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # gathered (rows, M, k) entries per chunk
LOG_FLOOR = -1e4  # stands for log(0): exp() of it is exactly 0, and it keeps 0 * (a - b) free of nan


class TopKDistribution(NamedTuple):
    r"""A distribution known on k token ids per row, plus the mass outside them.

    A plain named tuple of three tensors, so it can be unpacked, ``._replace``-d and stored field by
    field (a logit cache keeps exactly these three columns). Rows may have any leading shape:

    Attributes
    ----------
    probs : Tensor, shape (..., k), floating point
        The k kept probabilities of each row, largest first when built by the constructors below.
    ids : Tensor, shape (..., k), int64 or int32
        Token ids of ``probs``, in [0, V).
    rest : Tensor, shape (...)
        Probability mass of the V - k tokens not in ``ids`` (0 when k = V). The library reads it as
        spread evenly over those tokens (see the module docstring).

    Constructors: :meth:`from_logits` (exact rest mass, from teacher logits) and
    :meth:`from_probs` (from probabilities, rest = 1 - sum of the kept ones).

    Examples
    --------
    >>> import torch
    >>> from sinkd import TopKDistribution
    >>> top = TopKDistribution.from_logits(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 2)
    >>> top.ids
    tensor([[0, 1]])
    >>> [round(v, 4) for v in top.probs[0].tolist()], round(top.rest.item(), 4)
    ([0.5, 0.3], 0.2)
    """

    probs: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> TopKDistribution:
        r"""The top-k of softmax(logits) at temperature 1, with the exact mass of all other tokens.

        For each row z (last dimension, size V) with p = softmax(z):

        .. math::

            \mathrm{ids} = \operatorname{argtop}_k p, \quad
            \mathrm{probs} = p[\mathrm{ids}], \quad
            \mathrm{rest} = \exp\Big(\operatorname{logsumexp}_{v \notin \mathrm{ids}} \log p_v\Big)

        The rest is summed over the other tokens in the log domain, not taken as 1 - sum(probs), so it
        keeps its relative precision when it is tiny (and is exactly 0 when k >= V).

        Parameters
        ----------
        logits : Tensor, shape (..., V), floating point
            Teacher logits. Detached (no gradient flows into the result); fp16/bf16 inputs are
            computed in float32, float32/float64 in their own dtype. -inf marks a masked token
            (probability 0); NaN, +inf and rows that are -inf everywhere are errors.
        k : int
            Tokens to keep per row, >= 1; values above V keep all V tokens.

        Returns
        -------
        TopKDistribution
            ``probs`` (..., min(k, V)) in the compute dtype, largest first; ``ids`` (..., min(k, V)) int64;
            ``rest`` (...).

        Raises
        ------
        ValueError
            ``topk must be an integer >= 1, got ...`` when k is not an int >= 1 (bools are refused);
            ``logits has non-finite values ...`` / ``logits row (i,) is -inf everywhere ...``.

        Examples
        --------
        >>> import torch
        >>> from sinkd import TopKDistribution
        >>> logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
        >>> top = TopKDistribution.from_logits(logits, 2)
        >>> top.ids
        tensor([[0, 2]])
        >>> bool(torch.allclose(top.probs.sum(-1) + top.rest, torch.ones(1)))
        True
        """
        k = check_int_at_least("topk", k, 1)
        check_logit_values("logits", logits)
        logits = logits.detach()
        logp = torch.log_softmax(logits if logits.dtype in (torch.float32, torch.float64) else logits.float(), dim=-1)
        k = min(k, logp.shape[-1])
        top, ids = logp.topk(k, dim=-1)
        if k == logp.shape[-1]:
            rest = torch.zeros_like(top[..., 0])
        else:  # summed over the other tokens (not 1 - sum(top): no cancellation when the rest is tiny)
            rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1).exp()
        return cls(top.exp(), ids, rest)

    @classmethod
    def from_probs(cls, probs: torch.Tensor, k: int) -> TopKDistribution:
        r"""The k largest entries of each row of ``probs`` and the mass left over.

        .. math::

            \mathrm{ids} = \operatorname{argtop}_k p, \quad \mathrm{probs} = p[\mathrm{ids}], \quad
            \mathrm{rest} = \max\big(0,\ 1 - \textstyle\sum_{v \in \mathrm{ids}} p_v\big)

        Parameters
        ----------
        probs : Tensor, shape (..., V)
            Probabilities (rows summing to 1). Not detached: gradients flow into ``probs``/``rest``.
        k : int
            Tokens to keep per row, >= 1; values above V keep all V tokens.

        Returns
        -------
        TopKDistribution
            ``probs`` and ``ids`` (..., min(k, V)), largest first; ``rest`` (...).

        Raises
        ------
        ValueError
            ``topk must be an integer >= 1, got ...`` for a bad k.

        Examples
        --------
        >>> import torch
        >>> from sinkd import TopKDistribution
        >>> top = TopKDistribution.from_probs(torch.tensor([[0.1, 0.6, 0.3]]), 1)
        >>> top.ids, round(top.rest.item(), 4)
        (tensor([[1]]), 0.4)
        """
        check_int_at_least("topk", k, 1)
        values, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return cls(values, ids, (1 - values.sum(-1)).clamp_min(0))


# ----------------------------------------------------------------------------- checks and tempering


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
    check_logit_values("student_logits", student_logits)


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


# ----------------------------------------------------------------------------- sparse L1 cost


def _chunk_cost(ps, s_member, s_mass, t_probs, t_ids, t_rest):
    """Cost rows for a chunk of students: ps (r, V), s_member (r, V) bool, s_mass (r,)."""
    flat = t_ids.reshape(-1)
    # (r, M, k): each student row at every teacher's ids. index_select, not ps[:, t_ids]: its backward
    # is index_add (12x faster on CPU at k=1024 than advanced indexing's accumulating index_put).
    gathered = ps.index_select(1, flat).view(ps.shape[0], *t_ids.shape)
    a = (gathered - t_probs).abs().sum(-1)
    b = gathered.sum(-1)
    d = (gathered * s_member.index_select(1, flat).view(ps.shape[0], *t_ids.shape)).sum(-1)
    outside = s_mass[:, None] - d  # student top-k mass not on the teacher's ids
    return a + outside + (1 - (b + outside) - t_rest).abs()


TOPK_TAILS = ("bucket", "lognormal")


def topk_l1_cost(ps: torch.Tensor, teacher: TopKDistribution, k: int | None = None, *, tail: str = "bucket",
                 chunk_elements: int | None = None) -> torch.Tensor:
    r"""Sparse L1 cost (N, M) between dense student probabilities and a top-k teacher.

    With :math:`K_j` the teacher's ids, :math:`t_j` its probabilities there and :math:`R_j` its rest
    mass, and :math:`S_{ij} = 1 - \sum_{v \in K_j} p_{iv}` the student's mass outside them:

    .. math::

        C_{ij} = \sum_{v \in K_j} |p_{iv} - t_{jv}| + \mathrm{tail}_{ij}

    - ``tail="bucket"`` (default): the union of both top-k supports, with all other mass in one
      rest bucket per side (the module docstring's formula, O(N M k) gathers): every token outside
      the union gets the bucket's single sign in the gradient.
    - ``tail="lognormal"``: the teacher's tail spread around the student's own tail by a lognormal
      factor whose spread :math:`\sigma_{ij}` is measured on the head,
      :math:`\mathrm{tail}_{ij} = R_j (2\Phi(d_1) - 1) + S_{ij} (1 - 2\Phi(d_2))`,
      :math:`d_{1,2} = \log(R_j / S_{ij}) / \sigma_{ij} \pm \sigma_{ij} / 2` (see
      :mod:`sinkd.topk_tail`): each tail token's gradient is the expected sign of
      :math:`p_{iv} - t_{jv}`; the student's top-k is not used. Far closer to the full-vocabulary
      gradient (benchmarks/RESULTS.md, issue 13); :math:`\sigma` is held constant in the backward.

    Both are the exact L1 cost when the teacher keeps every token (k = V).

    Parameters
    ----------
    ps : Tensor, shape (N, V)
        Student probabilities (rows summing to 1); gradients flow into them.
    teacher : TopKDistribution
        Fields (M, k_t) / (M,): probabilities, ids, rest mass (at the temperature of ``ps``).
    k : int, optional
        The student's top-k (>= 1), required by ``tail="bucket"``; unused by "lognormal".
    tail : {"bucket", "lognormal"}, default "bucket"
        The model of the teacher's unknown tail (above).
    chunk_elements : int, optional
        Gathered (rows, M, k_t) entries per chunk of student rows (default 4M); chunks are
        recomputed in backward (checkpointing), so memory is O(N V + N M) plus one chunk, never
        N M k at once.

    Returns
    -------
    Tensor, shape (N, M)

    Raises
    ------
    ValueError
        ``topk must be an integer >= 1`` (bucket without k), ``tail: unknown value ...``,
        ``chunk_elements must be an integer >= 1``.

    Examples
    --------
    >>> import torch
    >>> from sinkd import TopKDistribution, topk_l1_cost
    >>> ps = torch.softmax(torch.randn(3, 10, dtype=torch.float64), -1)
    >>> pt = torch.softmax(torch.randn(2, 10, dtype=torch.float64), -1)
    >>> full = torch.cdist(ps, pt, p=1)
    >>> bool(torch.allclose(topk_l1_cost(ps, TopKDistribution.from_probs(pt, 10), tail="lognormal"), full))
    True
    >>> topk_l1_cost(ps, TopKDistribution.from_probs(pt, 4), tail="lognormal").shape
    torch.Size([3, 2])
    """
    check_choice("tail", tail, TOPK_TAILS)
    if tail == "bucket" or k is not None:
        k = check_int_at_least("topk", k, 1)
    budget = check_int_at_least("chunk_elements", chunk_elements, 1) if chunk_elements is not None else DEFAULT_CHUNK_ELEMENTS
    n, vocab = ps.shape
    m, kt = teacher.ids.shape
    rows = max(1, min(n, budget // max(m * kt, 1)))
    if tail == "lognormal":
        chunk_fn = lognormal_chunk_cost
        row_args = (ps,)
    else:
        s_ids = ps.detach().topk(min(k, vocab), dim=-1).indices
        s_member = torch.zeros(n, vocab, dtype=ps.dtype, device=ps.device).scatter_(1, s_ids, 1.0)
        chunk_fn = _chunk_cost
        row_args = (ps, s_member, ps.gather(1, s_ids).sum(-1))
    parts = []
    for i0 in range(0, n, rows):
        args = (*(t[i0 : i0 + rows] for t in row_args), teacher.probs, teacher.ids, teacher.rest)
        if torch.is_grad_enabled() and (ps.requires_grad or teacher.probs.requires_grad or teacher.rest.requires_grad):
            parts.append(checkpoint(chunk_fn, *args, use_reentrant=False))
        else:
            parts.append(chunk_fn(*args))
    return torch.cat(parts, 0)
