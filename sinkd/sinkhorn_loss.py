"""The SinKD loss: entropic OT between the student's and the teacher's rows of a batch.

Batch-wise (the paper's): the N student distributions and the N teacher distributions are two
point clouds; the loss is sum(P * C) with C[i, j] = cost(p_s[i], p_t[j]) and P the Sinkhorn plan.
group_size G restricts the plan to consecutive blocks of G rows (token-level use, O(N*G) plans);
the marginals stay those of the whole batch, so G >= N is exactly batch mode.
Sample-wise (for comparison): each student row is transported onto its own teacher row over the
vocabulary, with a 0/1 ground cost between classes (its unregularised value is the total variation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_int_at_least,
    check_logits,
    check_mask,
    check_open_unit,
    check_positive,
)
from .costs import COSTS, L1_IMPLS, cost_matrix, l1_backend
from .sinkhorn import GRAD_MODES, sinkhorn
from .topk import TopKDistribution, topk_l1_cost
from .topk_teacher import check_topk_teacher, select_rows, tempered_distribution, truncate

MODES = ("batch", "sample")
NORMALIZATIONS = ("uniform", "plain")
SAMPLE_MODE_MAX_ELEMENTS = 1 << 26  # N * V * V entries of sample-wise plans


@dataclass(frozen=True)
class SinkhornConfig:
    """Options of the Sinkhorn term. normalization "uniform": marginals 1/N (loss = mean cost
    per row); "plain": row and column sums of 1, as the reference's K/K.sum(1), K/K.sum(0) loop."""

    eps: float = 0.1
    max_iter: int = 20
    tol: float | None = None
    cost: str = "l1"
    temperature: float = 1.0
    normalization: str = "uniform"
    grad: str = "unrolled"
    mode: str = "batch"
    group_size: int | None = None
    eps_start: float | None = None
    eps_decay: float = 0.5
    l1_impl: str = "auto"
    block_elements: int | None = None
    topk: int | None = None  # sparse vocabulary: compare each pair on its top-k tokens plus a rest bucket

    def __post_init__(self):
        check_positive("sinkhorn.eps", self.eps)
        check_int_at_least("sinkhorn.max_iter", self.max_iter, 1)
        if self.tol is not None:
            check_positive("sinkhorn.tol", self.tol)
        check_choice("sinkhorn.cost", self.cost, COSTS)
        check_choice("sinkhorn.l1_impl", self.l1_impl, L1_IMPLS)
        check_positive("sinkhorn.temperature", self.temperature)
        check_choice("sinkhorn.normalization", self.normalization, NORMALIZATIONS)
        check_choice("sinkhorn.grad", self.grad, GRAD_MODES)
        check_choice("sinkhorn.mode", self.mode, MODES)
        if self.group_size is not None:
            check_int_at_least("sinkhorn.group_size", self.group_size, 1)
        if self.eps_start is not None:
            check_positive("sinkhorn.eps_start", self.eps_start)
        check_open_unit("sinkhorn.eps_decay", self.eps_decay)
        if self.mode == "sample" and self.grad == "envelope":
            raise ValueError("sinkhorn.grad: 'envelope' needs a cost that depends on the logits; mode 'sample' supports 'unrolled' only")
        if self.block_elements is not None:
            check_int_at_least("sinkhorn.block_elements", self.block_elements, 1)
        if self.topk is not None:
            check_int_at_least("sinkhorn.topk", self.topk, 1)
            if self.cost != "l1" or self.mode != "batch":
                raise ValueError("sinkhorn.topk: the sparse vocabulary works with cost 'l1' in mode 'batch' only")

    @classmethod
    def paper(cls, **overrides) -> "SinkhornConfig":
        """The SinKD paper's setting: T=2, eps=0.1, 20 iterations, L1 cost, plain normalisation."""
        base = dict(eps=0.1, max_iter=20, cost="l1", temperature=2.0, normalization="plain")
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, values: dict | None, prefix: str = "sinkhorn") -> "SinkhornConfig":
        return _dataclass_from_dict(cls, values or {}, prefix)


def _dataclass_from_dict(cls, values: dict, prefix: str):
    """Build a config dataclass, rejecting unknown keys with their full dotted name."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix} must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{prefix}.{unknown[0]}: unknown key; valid: {', '.join(sorted(names))}")
    return cls(**values)


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKDistribution,
    config: SinkhornConfig | None = None,
    *,
    mask: torch.Tensor | None = None,
    **overrides,
) -> torch.Tensor:
    """SinKD loss between logits (N, V) or (B, L, V); rows where mask is False are left out.

    Options come from `config` (default SinkhornConfig()) with keyword overrides, e.g.
    ``sinkhorn_loss(zs, zt, eps=0.05, group_size=256)`` or ``sinkhorn_loss(zs, zt, SinkhornConfig.paper())``.
    The teacher may be a TopKDistribution (top-k probabilities at T=1, ids, rest mass; e.g. read from a
    logit cache): the cost is then the sparse L1 cost on the union of top-k supports plus a rest
    bucket (`topk_l1_cost`), the student's k being `config.topk` or else the teacher's k.
    """
    config = dataclasses.replace(config or SinkhornConfig(), **overrides) if overrides else (config or SinkhornConfig())
    topk_teacher = isinstance(teacher_logits, TopKDistribution)
    if topk_teacher:
        check_topk_teacher(student_logits, teacher_logits)
        if config.mode != "batch" or config.cost != "l1":
            raise ValueError("sinkhorn: a top-k teacher (logit cache) works with cost 'l1' in mode 'batch' only")
    else:
        check_logits(student_logits, teacher_logits)
    flat_mask = check_mask(mask, student_logits.shape[:-1])
    vocab = student_logits.shape[-1]
    zs = student_logits.reshape(-1, vocab)
    if zs.shape[0] == 0 or (flat_mask is not None and not bool(flat_mask.any())):
        return student_logits.sum() * 0.0  # nothing to distil; keeps the graph connected
    if topk_teacher:
        teacher = select_rows(teacher_logits, flat_mask)
        zs = zs[flat_mask] if flat_mask is not None else zs
        ps = torch.softmax(zs / config.temperature, dim=-1)
        teacher = tempered_distribution(teacher, config.temperature, vocab, ps.dtype)
        if config.topk is not None:
            teacher = truncate(teacher, config.topk)
        return _batch_wise(ps, teacher, config)
    zt = teacher_logits.reshape(-1, vocab)
    if flat_mask is not None:
        zs, zt = zs[flat_mask], zt[flat_mask]
    if config.mode == "sample":
        return _sample_wise(zs, zt, config)
    if config.cost == "l1" and config.topk is None and l1_backend(zs, config.l1_impl) == "triton":
        return _batch_wise(zs, zt, config, from_logits=True)
    ps = torch.softmax(zs / config.temperature, dim=-1)
    pt = torch.softmax(zt / config.temperature, dim=-1)
    return _batch_wise(ps, pt, config)


def _row_blocks(x, group: int) -> list:
    """x's rows (N, ...) as [(N // group, group, ...), (1, remainder, ...)] (the second only if any), for a
    dense tensor or each field of a TopKDistribution. Views when group divides N; else one torch.split,
    whose backward is one concatenation: slices would each allocate a zero gradient of x's full size."""
    if isinstance(x, TopKDistribution):
        return [TopKDistribution(*fields) for fields in zip(*(_row_blocks(t, group) for t in x))]
    n = x.shape[0]
    full = n // group * group
    if full == n:
        return [x.reshape(n // group, group, *x.shape[1:])]
    head, tail = torch.split(x, [full, n - full])
    return [head.reshape(full // group, group, *x.shape[1:]), tail.unsqueeze(0)]


def _batch_wise(ps: torch.Tensor, pt, config: SinkhornConfig, from_logits: bool = False) -> torch.Tensor:
    """ps, pt: probabilities (N, V), or logits when from_logits (the fused Triton L1 path)."""
    n = ps.shape[0]
    group = n if config.group_size is None else min(config.group_size, n)
    total = ps.new_zeros(())
    for xs, xt in zip(_row_blocks(ps, group), _row_blocks(pt, group)):
        size = xs.shape[1]
        total = total + _block_loss(xs, xt, config, from_logits) * (size / n if config.normalization == "uniform" else 1.0)
    return total


def _block_loss(xs: torch.Tensor, xt, config: SinkhornConfig, from_logits: bool = False) -> torch.Tensor:
    """Sum over blocks (B, G, V) of the block's sum(P * C), marginals uniform within the block or plain.
    xt: dense teacher probabilities (B, G, V), or a top-k teacher with fields (B, G, k) / (B, G).
    from_logits: xs and xt are logits and the L1 cost is built from them by the Triton kernels, so
    that no softmax output is stored for the backward (extra memory one N x V gradient + O(N^2))."""
    if from_logits:
        from .kernels import softmax_l1_cost

        cost = softmax_l1_cost(xs, xt, config.temperature)
    elif isinstance(xt, TopKDistribution):
        k = config.topk or xt.ids.shape[-1]
        cost = torch.stack([topk_l1_cost(s, TopKDistribution(*t), k) for s, t in zip(xs, zip(*xt))])
    elif config.topk is not None:
        cost = torch.stack([topk_l1_cost(s, TopKDistribution.from_probs(t, config.topk), config.topk) for s, t in zip(xs, xt)])
    else:
        l1_options = {"impl": config.l1_impl, "block_elements": config.block_elements} if config.cost == "l1" else {}
        cost = cost_matrix(xs, xt, config.cost, **l1_options)
    ones = None
    if config.normalization == "plain":
        ones = torch.ones(cost.shape[-1], dtype=cost.dtype, device=cost.device)
    result = sinkhorn(
        cost, config.eps, a=ones, b=ones, max_iter=config.max_iter, tol=config.tol,
        eps_start=config.eps_start, eps_decay=config.eps_decay, grad=config.grad,
    )
    return result.cost.sum()


def _sample_wise(zs: torch.Tensor, zt: torch.Tensor, config: SinkhornConfig) -> torch.Tensor:
    n, vocab = zs.shape
    if n * vocab * vocab > SAMPLE_MODE_MAX_ELEMENTS:
        raise ValueError(
            f"sinkhorn.mode: 'sample' needs N*V*V = {n * vocab * vocab} plan entries (limit {SAMPLE_MODE_MAX_ELEMENTS}); "
            "use mode 'batch' for large vocabularies"
        )
    ground = 1.0 - torch.eye(vocab, dtype=zs.dtype, device=zs.device)
    result = sinkhorn(
        ground.expand(n, vocab, vocab), config.eps,
        log_a=torch.log_softmax(zs / config.temperature, dim=-1),
        log_b=torch.log_softmax(zt / config.temperature, dim=-1),
        max_iter=config.max_iter, tol=config.tol, eps_start=config.eps_start, eps_decay=config.eps_decay,
    )
    return result.cost.mean()
