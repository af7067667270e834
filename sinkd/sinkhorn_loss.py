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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import (
    at_least_float32,
    check_choice,
    check_int_at_least,
    check_logits,
    check_mask,
    check_open_unit,
    check_positive,
)
from .costs import COSTS, L1_IMPLS, cost_matrix, l1_backend
from .sinkhorn import GRAD_MODES, sinkhorn
from .topk import (
    TOPK_TAILS,
    TopKDistribution,
    check_topk_teacher,
    select_rows,
    tempered_distribution,
    topk_l1_cost,
    truncate,
)

MODES = ("batch", "sample")
NORMALIZATIONS = ("uniform", "plain")
SAMPLE_MODE_MAX_ELEMENTS = 1 << 26  # N * V * V entries of sample-wise plans
TOPK_DIAGONALS = ("model", "exact")


@dataclass(frozen=True)
class SinkhornConfig:
    """Options of the Sinkhorn term (:func:`sinkhorn_loss`); every field is checked on construction.

    Fields and where each one goes:

    - ``eps`` (> 0, default 0.1), ``max_iter`` (>= 1, default 20), ``tol`` (> 0 or None),
      ``eps_start`` (> 0 or None), ``eps_decay`` (in (0, 1), default 0.5), ``grad``
      ("unrolled" / "implicit" / "envelope"), ``slice_elements`` (>= 1 or None: the solver's default
      2**24): passed unchanged to :func:`sinkd.sinkhorn` for every plan, batch and sample mode alike.
      The loss is always the quantity its gradient belongs to: <P, C> under "unrolled" (autograd
      through the iterations) and "implicit" (exact gradient at the plan's fixed point, O(N^2)
      memory: the large-N choice), the regularised value <P, C> + eps KL(P || a b^T) under
      "envelope" (gradient P, exact for that value at convergence). Sample mode: "unrolled" only.
      Numbers of any real type (Python, numpy, 0-d tensors) are accepted and stored as Python ones.
    - ``temperature`` (> 0, default 1): both sides' softmax temperature T (a top-k teacher is
      re-tempered, see :mod:`sinkd.topk`). No T^2 factor is applied to the Sinkhorn term.
    - ``cost`` ("l1", "l2", "sqeuclidean", "cosine"): the ground cost between rows (batch mode).
    - ``normalization``: "uniform" (marginals 1/N: the loss is the mean transport cost per row)
      or "plain" (row and column sums of 1, as the reference's ``K/K.sum(1), K/K.sum(0)`` loop:
      N times the uniform value at convergence). Batch mode only; sample mode's marginals are
      the two distributions themselves.
    - ``mode``: "batch" (the paper's batch-wise OT between the N student and N teacher rows) or
      "sample" (each row alone, over the vocabulary, 0/1 ground cost; needs grad "unrolled").
    - ``group_size`` (>= 1 or None): batch mode plans over consecutive blocks of this many rows.
    - ``l1_impl`` ("auto", "chunked", "dense", "triton") and ``l1_tile_elements`` (>= 1 or None):
      the dense L1 cost's backend and the chunked backend's backward tile budget, passed to
      :func:`sinkd.l1_cost` as ``impl`` / ``tile_elements`` (the tiles apply only when the chunked
      backend runs; the fused Triton path and the top-k cost have none).
    - ``topk`` (>= 1 or None): compare each pair on the union of their top-k tokens plus a rest
      bucket (:func:`sinkd.topk_l1_cost`); cost "l1" and mode "batch" only.
    - ``topk_tail`` ("bucket" or "lognormal", default "bucket"): the sparse cost's model of the
      teacher's unknown tail, for ``topk`` and for top-k teachers (:func:`sinkd.topk_l1_cost`).
      "lognormal" gives each tail token the expected sign of p_s - p_t instead of the bucket's
      one sign: the gradient within 1.2% of the full vocabulary's at k=256, T=1 on SmolLM2
      (benchmarks/RESULTS.md, issue 13), where the bucket is 5-7% off.
    - ``topk_diagonal`` ("model" or "exact", default "model"): with ``topk`` on a dense teacher,
      "exact" computes the aligned pairs' cost C[i, i] (student row i against teacher row i, the
      same token) over the whole vocabulary, O(N V), and keeps the sparse cost off the diagonal.
      Most of the plan sits on those pairs, so this is where the tail's unknown per-token signs
      weigh most: on SmolLM2 with the lognormal tail the gradient error goes from 11.8% to 8.1%
      (k=256, T=2) and from 6.6% to 4.1% (k=1024, T=2) (benchmarks/RESULTS.md, issue 13). Needs
      ``topk``; a top-k teacher (logit cache) has no tail to read and is refused.

    Errors are one line that starts with the field's name, e.g. ``eps must be a finite number > 0,
    got 0`` (``ObjectiveConfig.from_dict`` prefixes them with ``sinkhorn.``).

    Examples
    --------
    >>> from sinkd import SinkhornConfig
    >>> SinkhornConfig.paper().temperature, SinkhornConfig.paper().normalization
    (2.0, 'plain')
    >>> SinkhornConfig.from_dict({"eps": 0.05, "group_size": 128}).eps
    0.05
    """

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
    l1_tile_elements: int | None = None  # chunked L1 backward: entries per (rows, m, vocab) tile of signs
    slice_elements: int | None = None  # solver: problems with more cost entries iterate slice by slice
    topk: int | None = None  # sparse vocabulary: compare each pair on its top-k tokens plus a rest bucket
    topk_tail: str = "bucket"  # the top-k cost's model of the teacher's unknown tail: "bucket" or "lognormal"
    topk_diagonal: str = "model"  # "exact": the aligned pairs' cost over the full vocabulary (dense teacher + topk)

    def __post_init__(self):
        # Numbers of any real type (Python, numpy, 0-d tensors) are checked and stored as Python floats / ints.
        self._set("eps", check_positive("eps", self.eps))
        self._set("max_iter", check_int_at_least("max_iter", self.max_iter, 1))
        if self.tol is not None:
            self._set("tol", check_positive("tol", self.tol))
        check_choice("cost", self.cost, COSTS)
        check_choice("l1_impl", self.l1_impl, L1_IMPLS)
        self._set("temperature", check_positive("temperature", self.temperature))
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("grad", self.grad, GRAD_MODES)
        check_choice("mode", self.mode, MODES)
        if self.group_size is not None:
            self._set("group_size", check_int_at_least("group_size", self.group_size, 1))
        if self.eps_start is not None:
            self._set("eps_start", check_positive("eps_start", self.eps_start))
        self._set("eps_decay", check_open_unit("eps_decay", self.eps_decay))
        if self.mode == "sample" and self.grad != "unrolled":
            raise ValueError(f"grad: {self.grad!r} needs a cost that depends on the logits; mode 'sample' supports 'unrolled' only")
        if self.l1_tile_elements is not None:
            self._set("l1_tile_elements", check_int_at_least("l1_tile_elements", self.l1_tile_elements, 1))
        if self.slice_elements is not None:
            self._set("slice_elements", check_int_at_least("slice_elements", self.slice_elements, 1))
        check_choice("topk_tail", self.topk_tail, TOPK_TAILS)
        check_choice("topk_diagonal", self.topk_diagonal, TOPK_DIAGONALS)
        if self.topk_diagonal == "exact" and self.topk is None:
            raise ValueError("topk_diagonal: 'exact' corrects the sparse cost's diagonal; set topk too")
        if self.topk is not None:
            self._set("topk", check_int_at_least("topk", self.topk, 1))
            if self.cost != "l1" or self.mode != "batch":
                raise ValueError("topk: the sparse vocabulary works with cost 'l1' in mode 'batch' only")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: only __post_init__ normalises its own fields

    @classmethod
    def paper(cls, **overrides) -> "SinkhornConfig":
        """The SinKD paper's setting: T=2, eps=0.1, 20 iterations, L1 cost, plain normalisation."""
        base = dict(eps=0.1, max_iter=20, cost="l1", temperature=2.0, normalization="plain")
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "SinkhornConfig":
        """From a plain mapping of field names (e.g. parsed YAML); None or {} gives the defaults.
        Errors name the field relative to the mapping: ``epsilon: unknown key; valid: ...``."""
        return _dataclass_from_dict(cls, {} if values is None else values)

    def _solver_options(self) -> dict:
        """The keyword arguments of :func:`sinkd.sinkhorn` this config sets (every plan gets them)."""
        return {"max_iter": self.max_iter, "tol": self.tol, "eps_start": self.eps_start, "eps_decay": self.eps_decay,
                "grad": self.grad, "slice_elements": self.slice_elements}


def _dataclass_from_dict(cls, values: Mapping):
    """Build a config dataclass, rejecting unknown keys by name (relative to `values`)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key; valid: {', '.join(sorted(names))}")
    return cls(**values)


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKDistribution,
    config: SinkhornConfig | None = None,
    *,
    mask: torch.Tensor | None = None,
    **overrides,
) -> torch.Tensor:
    r"""The SinKD loss [1]_: entropic optimal transport between the student's and the teacher's rows.

    With :math:`p^s_i = \mathrm{softmax}(z^s_i / T)` and :math:`p^t_j = \mathrm{softmax}(z^t_j / T)`
    for the N kept rows, batch mode (the paper's) builds the N x N cost
    :math:`C_{ij} = c(p^s_i, p^t_j)` (``config.cost``, L1 by default), solves

    .. math::

        P = \operatorname*{argmin}_{P \mathbf{1} = a,\ P^\top \mathbf{1} = b}
            \langle P, C \rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a b^\top)

    with :func:`sinkd.sinkhorn` [2]_ (``config.max_iter`` iterations), and returns the transport cost

    .. math::

        \mathcal{L} = \langle P, C \rangle = \sum_{ij} P_{ij} C_{ij}

    (the entropy term is not added; with ``grad="envelope"`` it is, see below).
    ``normalization="uniform"``: a = b = 1/N, so L is the mean
    cost per row; ``"plain"``: a = b = 1, the reference implementation's scaling (N times larger at
    convergence). ``group_size=G`` solves one G x G plan per block of G consecutive rows (the last
    block may be shorter) and adds them, each weighted by its share of rows (G/N) under "uniform",
    1 under "plain"; G >= N is batch mode exactly. ``mode="sample"`` instead transports each
    student row onto its own teacher row over the vocabulary with the 0/1 ground cost
    :math:`1 - \delta_{uv}` (a = p^s_i, b = p^t_i) and returns the mean over rows; at small eps it
    tends to the total variation distance.

    Parameters
    ----------
    student_logits : Tensor, shape (N, V) or (B, L, V), floating point
        Student logits; rows are samples (classification) or tokens. Gradients flow into them.
        -inf marks a masked token (probability 0, e.g. the padding entries of a vocabulary head
        wider than its tokenizer), on either side and in every path; NaN and +inf are errors, and
        so is a row that is -inf everywhere. float16 / bfloat16 logits are computed in float32
        (the fused Triton path reads them as they are).
    teacher_logits : Tensor of the same shape, or TopKDistribution
        Teacher logits (not detached here: pass detached logits for a frozen teacher, as
        :class:`sinkd.DistillationObjective` does). Or a :class:`sinkd.TopKDistribution` with fields
        (..., k) / (...) over the same rows (e.g. from a logit cache, probabilities at T = 1): it is
        re-tempered at T with its rest spread evenly over the V - k other tokens, and the cost is the
        sparse L1 cost on the union of both top-k supports plus a rest bucket
        (:func:`sinkd.topk_l1_cost`, student k = ``config.topk`` or the teacher's k); needs cost "l1"
        and mode "batch".
    config : SinkhornConfig, optional
        All options (default ``SinkhornConfig()``); see :class:`SinkhornConfig` for each field.
    mask : Tensor of bool, shape (N,) or (B, L), optional
        Rows to keep (False: padding, prompt tokens). The kept rows are flattened to one set of N
        rows; with nothing kept the loss is 0 (still attached to the graph).
    **overrides
        Any :class:`SinkhornConfig` field, replacing the config's value, e.g. ``eps=0.05``.

    Returns
    -------
    Tensor, shape ()
        The loss: :math:`\langle P, C \rangle` summed as above under ``grad`` "unrolled" or
        "implicit"; under "envelope" the regularised value
        :math:`\langle P, C \rangle + \varepsilon\, \mathrm{KL}(P \,\|\, a b^\top)`, the quantity whose
        gradient that mode computes (see :func:`sinkd.sinkhorn`). float32 for float16 / bfloat16
        logits (softmax, cost and solver run in float32), else the logits' dtype (fp32 on the fused
        Triton L1 path).

    Raises
    ------
    ValueError
        One line: shape or vocabulary mismatch, non-finite logits, a bad mask shape, a bad top-k
        teacher, a bad config field (named as the field, e.g. ``eps must be ...``), or
        ``mode: 'sample' needs N*V*V = ... plan entries`` above 2**26.

    Examples
    --------
    >>> import torch
    >>> from sinkd import SinkhornConfig, sinkhorn_loss
    >>> teacher = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    >>> student = teacher.clone().requires_grad_()
    >>> round(sinkhorn_loss(student, teacher, max_iter=50).item(), 4)  # identical rows: near 0
    0.0
    >>> loss = sinkhorn_loss(torch.zeros(2, 3, requires_grad=True), teacher, SinkhornConfig.paper())
    >>> loss.backward()
    >>> loss.item() > 0
    True
    >>> sinkhorn_loss(torch.randn(2, 8, 50), torch.randn(2, 8, 50), group_size=4).shape  # tokens, 4 groups
    torch.Size([])

    References
    ----------
    .. [1] X. Cui, Y. Qin, Y. Gao, E. Zhang, Z. Xu, T. Wu, K. Li, X. Sun, W. Zhou, H. Li.
           "Sinkhorn Distance Minimization for Knowledge Distillation". LREC-COLING 2024.
           arXiv:2402.17110.
    .. [2] M. Cuturi. "Sinkhorn Distances: Lightspeed Computation of Optimal Transport".
           NeurIPS 2013. arXiv:1306.0895.
    """
    config = dataclasses.replace(config or SinkhornConfig(), **overrides) if overrides else (config or SinkhornConfig())
    topk_teacher = isinstance(teacher_logits, TopKDistribution)
    if topk_teacher:
        check_topk_teacher(student_logits, teacher_logits)
        if config.mode != "batch" or config.cost != "l1":
            raise ValueError("teacher_logits: a top-k teacher (logit cache) works with cost 'l1' in mode 'batch' only, "
                             f"got cost {config.cost!r}, mode {config.mode!r}")
        if config.topk_diagonal == "exact":
            raise ValueError("topk_diagonal: 'exact' needs dense teacher logits; a top-k teacher (logit cache) holds "
                             "no tail to compute the aligned pairs from (use 'model')")
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
        ps = torch.softmax(at_least_float32(zs) / config.temperature, dim=-1)
        teacher = tempered_distribution(teacher, config.temperature, vocab, ps.dtype)
        if config.topk is not None:
            teacher = truncate(teacher, config.topk)
        return _batch_wise(ps, teacher, config)
    zt = teacher_logits.reshape(-1, vocab)
    if flat_mask is not None:
        zs, zt = zs[flat_mask], zt[flat_mask]
    if config.mode == "sample":
        return _sample_wise(at_least_float32(zs), at_least_float32(zt), config)
    if config.cost == "l1" and config.topk is None and l1_backend(zs, config.l1_impl) == "triton":
        return _batch_wise(zs, zt, config, from_logits=True)  # the kernels read half logits, compute in fp32
    ps = torch.softmax(at_least_float32(zs) / config.temperature, dim=-1)
    pt = torch.softmax(at_least_float32(zt) / config.temperature, dim=-1)
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
        cost = torch.stack([topk_l1_cost(s, TopKDistribution(*t), k, tail=config.topk_tail) for s, t in zip(xs, zip(*xt))])
    elif config.topk is not None:
        cost = torch.stack([topk_l1_cost(s, TopKDistribution.from_probs(t, config.topk), config.topk, tail=config.topk_tail)
                            for s, t in zip(xs, xt)])
        if config.topk_diagonal == "exact":
            cost = with_exact_diagonal(cost, xs, xt)
    else:
        l1_options = {"impl": config.l1_impl, "tile_elements": config.l1_tile_elements} if config.cost == "l1" else {}
        cost = cost_matrix(xs, xt, config.cost, **l1_options)
    ones = None
    if config.normalization == "plain":
        ones = torch.ones(cost.shape[-1], dtype=cost.dtype, device=cost.device)
    result = sinkhorn(cost, config.eps, a=ones, b=ones, **config._solver_options())
    # The reported loss is what the grad mode differentiates: the regularised value under "envelope".
    return (result.value if config.grad == "envelope" else result.cost).sum()


def _aligned_l1(xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    return (xs - xt).abs().sum(-1)


def with_exact_diagonal(cost: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    r"""``cost`` (B, G, G) with its diagonal replaced by the full-vocabulary L1 of the aligned rows.

    :math:`C_{ii} = \sum_v |p^s_{iv} - p^t_{iv}|` for xs, xt (B, G, V); off the diagonal ``cost`` is kept.
    The gradient reaching ``cost``'s own diagonal is exactly zero (it is added and subtracted), so the
    aligned pairs' gradient is the full vocabulary's, sign by sign. Checkpointed: O(B G V) work and
    one (B, G, V) temporary, recomputed in the backward instead of stored.
    """
    exact = checkpoint(_aligned_l1, xs, xt, use_reentrant=False) if torch.is_grad_enabled() else _aligned_l1(xs, xt)
    return cost + torch.diag_embed(exact - cost.diagonal(dim1=-2, dim2=-1))


def _sample_wise(zs: torch.Tensor, zt: torch.Tensor, config: SinkhornConfig) -> torch.Tensor:
    n, vocab = zs.shape
    if n * vocab * vocab > SAMPLE_MODE_MAX_ELEMENTS:
        raise ValueError(
            f"mode: 'sample' needs N*V*V = {n * vocab * vocab} plan entries (limit {SAMPLE_MODE_MAX_ELEMENTS}); "
            "use mode 'batch' for large vocabularies"
        )
    ground = 1.0 - torch.eye(vocab, dtype=zs.dtype, device=zs.device)
    result = sinkhorn(
        ground.expand(n, vocab, vocab), config.eps,
        log_a=torch.log_softmax(zs / config.temperature, dim=-1),
        log_b=torch.log_softmax(zt / config.temperature, dim=-1),
        **config._solver_options(),
    )
    return result.cost.mean()
