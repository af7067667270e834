r"""Distillation between a teacher and a student with different vocabularies: ranked distributions,
ULD and the MultiLevelOT terms.

Teacher and student tokenise a text into different tokens over different vocabularies, so there is no
token-by-token KL. Both methods here compare *ranked* distributions instead: each token's probability
vector sorted in descending order (and truncated to its top k, or zero-padded to a common length),
which needs no shared vocabulary.

- :func:`ranked_probs`: softmax(z / T) sorted descending, the top k (zero-padded when k > V).
- :func:`uld_loss`: ULD [1]_, the L1 distance between the ranked vectors of the i-th real student
  token and the i-th real teacher token, i < min(n_s, n_t) (the shorter side decides).
- :func:`multilevel_ot_loss`: MultiLevelOT [2]_, with :class:`MultiLevelOTConfig`: on the same
  aligned pairs a holistic absolute difference (HAD, L1) and a sequential logarithmic (SL,
  -sum t log s) term, and a sequence-level Sinkhorn distance (SD) between all T_t teacher tokens and
  all T_s student tokens of each sequence (rectangular cost, uniform marginals over each side's real
  tokens, solved by :func:`sinkd.sinkhorn` batched over the sequences).

Inputs are batches of sequences: student logits (B, T_s, V_s), teacher logits (B, T_t, V_t) and boolean
masks (B, T_s) / (B, T_t) that mark the rows to compare (True: a row whose logits predict a response
token; padding and prompt rows False). Real rows need not be contiguous: the k-th True of a sequence
is its k-th token.

Facts of the reference code, and what this module does instead (docs/cross_tokenizer.md has more):

- ULD, github Nicolas-BZRD/llm-recipes, ``models/distillation_model.py``, ``DistillationLoss.forward``:
  softmax at student / teacher temperature (default 1) over each sequence's answer rows, which start
  at the last prompt position (the rows that predict the answer tokens), left-aligned; full-vocabulary
  descending sort; the smaller vocabulary zero-padded to the larger; per sequence
  ``|s[:n] - t[:n]|.sum(-1).mean(-1)`` with n = min(answer sizes), i.e. the first n answer tokens of
  each side are paired; mean over the batch, times ``distillation_weight``, plus CE.
  :func:`uld_loss` is that (``reduction="sequence"``, ``k=None``), with masks instead of label spans.
- MultiLevelOT, github 2018cx/Multi-Level-OT, ``models/distillation_model.py`` (``DistillationLoss``,
  ``Sinkhorn_seq``, ``KL_wo``, ``improved_sort``, ``normalize``) and ``train/train_utils.py``:

  * logits divided by their standard deviation over the vocabulary (+1e-4, no centring; ``normalize``)
    on both sides, then the answer rows' softmax at temperature 1, as ULD; ``skip_student_eos=True``
    drops the student's last answer row;
  * ranking: the first release (2025-01-16) and the 2025-04-20 one sort each token's vector
    descending, then keep the first 50 entries; the 2026-02-04 commit comments the per-token sort out
    and keeps only ``improved_sort``: ONE permutation of the vocabulary for the whole batch, by total
    probability over (batch, tokens), top 50 columns. Here: per-token sort, top k (the paper's ranking);
  * HAD: per sequence ``|s[:n] - t[:n]|.sum(-1).mean(-1)``, n = min(answer sizes) (ULD's pairing);
    mean over the batch. Here: the same;
  * SL: ``KL_wo(teacher, student)`` = ``-(softmax(s_ranked) * log_softmax(t_ranked)).sum(-1).mean()``: a
    second softmax over the already-ranked probability vectors, the student as the target, and the
    mean over all B x L_max rows including padded ones. Here: ``-sum_l t_l log s_l`` on the ranked
    probabilities at tau_SL (the paper's formula), over the aligned real pairs, reduced as HAD;
  * SD: ``Sinkhorn_seq`` (T hard-coded to 2 whatever is passed): ``softmax(ranked / 2)``, again a second
    softmax of the ranked probabilities, over the L_max x L_max square of the batch's longest answer
    (padded rows are uniform 1/50 vectors and carry mass); ``cdist(teacher, student, p=1)``,
    ``K = exp(-C / 0.1)``, 10 row-then-column normalisations (``sinkhorn_loss``'s ``n_iters=10``
    overrides the 20 of ``sinkhorn_normalized``), i.e. all-ones marginals; ``0.001 * sum(P * C)`` summed
    over the sequences (the 2025-01-16 release kept only the last sequence: ``=`` instead of ``+=``);
    unrolled autograd. Here: ranked probabilities at tau_SD = 2 of the logits, a T_t x T_s cost over
    the real tokens only, uniform marginals 1/n_t, 1/n_s (the official plain loop's value on an
    n_t x n_s problem is n_s times this one, exactly, at every iteration count), the paper's 20
    iterations, mean over the sequences;
  * total: ``CE + distil_factor * (mean_b(HAD_b) + 0.1 * SL + 0.1 * SD)`` with distil_factor 1.5 in its
    scripts and argument default (the paper: alpha 0.15, beta 0.1, gamma 0.1). Here
    ``total_kd = alpha * (HAD + beta * SL + gamma * SD)``: add it to the CE.

References
----------
.. [1] N. Boizard, K. El Haddad, C. Hudelot, P. Colombo. "Towards Cross-Tokenizer Distillation: the
       Universal Logit Distillation Loss for LLMs". arXiv:2402.12030.
.. [2] X. Cui, M. Zhu, Y. Qin, L. Xie, W. Zhou, H. Li. "Multi-Level Optimal Transport for Universal
       Cross-Tokenizer Knowledge Distillation on Language Models". AAAI 2025. arXiv:2412.14528.
.. [3] M. Cuturi. "Sinkhorn Distances: Lightspeed Computation of Optimal Transport". NeurIPS 2013.
       arXiv:1306.0895.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ._checks import (
    check_choice,
    check_finite,
    check_int_at_least,
    check_logit_tensor,
    check_logit_values,
    check_nonnegative,
    check_positive,
)
from .costs import cost_matrix
from .ranked import RankedLogits, ranked_log
from .sinkhorn import sinkhorn

SD_GRAD_MODES = ("unrolled", "implicit")
REDUCTIONS = ("sequence", "token")


def _check_k(k):
    return None if k is None else check_int_at_least("k", k, 1)


def ranked_probs(logits: torch.Tensor, k: int | None, temperature: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Each row's probabilities sorted in descending order and truncated to the top k.

    .. math::

        r(z)_l = \mathrm{softmax}(z / T)_{\sigma(l)}, \quad l = 1 \dots k, \qquad
        \mathrm{softmax}(z / T)_{\sigma(1)} \ge \mathrm{softmax}(z / T)_{\sigma(2)} \ge \dots

    with :math:`r_l = 0` for :math:`l > V` (k larger than the vocabulary: zero-padded to k). Ranked
    vectors of two models with different vocabularies have the same length and can be compared entry
    by entry (ULD [1]_, MultiLevelOT [2]_).

    Parameters
    ----------
    logits : Tensor, shape (..., V), floating point
        Logits; -inf marks a masked token (probability 0), NaN and +inf are errors, and so is a row that
        is -inf everywhere. float16 / bfloat16 are computed in float32. Differentiable.
    k : int or None
        How many ranked entries to keep, >= 1 (zero-padded when k > V); None keeps all V.
    temperature : float, default 1
        Softmax temperature T, > 0.
    mask : Tensor of bool, shape (...), optional
        Rows to keep; the others come out as zero vectors.

    Returns
    -------
    Tensor, shape (..., k)
        The ranked probabilities (float32 for half inputs, else the logits' dtype); each row sums to
        at most 1 (exactly 1 when k >= V).

    Raises
    ------
    ValueError
        One line naming the argument: ``k`` < 1, ``temperature`` <= 0, ``logits`` with NaN / +inf or
        of no vocabulary dimension, ``mask`` of the wrong shape.

    Examples
    --------
    >>> import torch
    >>> from sinkd import ranked_probs
    >>> ranked_probs(torch.tensor([[0.0, 2.0, 1.0]]), k=4)  # sorted, zero-padded to k
    tensor([[0.6652, 0.2447, 0.0900, 0.0000]])
    >>> ranked_probs(torch.randn(2, 5, 1000), k=50).shape
    torch.Size([2, 5, 50])

    References
    ----------
    .. [1] N. Boizard et al. "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
           Loss for LLMs". arXiv:2402.12030.
    .. [2] X. Cui et al. "Multi-Level Optimal Transport for Universal Cross-Tokenizer Knowledge
           Distillation on Language Models". AAAI 2025. arXiv:2412.14528.
    """
    _check_logit_tensor("logits", logits, batched=False)
    k = _check_k(k)
    temperature = check_positive("temperature", temperature)
    if mask is not None:
        mask = _as_bool_mask("mask", mask, tuple(logits.shape[:-1]), "the logits' row shape")
    check_logit_values("logits", logits)
    probs = ranked_log(logits, k, temperature).exp()
    return probs if mask is None else probs * mask[..., None]


def _check_logit_tensor(field: str, t, batched: bool = True) -> None:
    """A floating tensor of shape (B, T, V) (batched) or (..., V), V >= 1."""
    if batched:
        check_logit_tensor(field, t, lambda d: d == 3, "(B, T, V)")
    else:
        check_logit_tensor(field, t, lambda d: d >= 1, "(..., V)")
    if t.shape[-1] == 0:
        raise ValueError(f"{field} has an empty vocabulary dimension: shape {tuple(t.shape)}")


def _as_bool_mask(field: str, mask, shape: tuple, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{field} must be a torch.Tensor of bool, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{field} shape {tuple(mask.shape)} must equal {what} {shape}")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{field} must be boolean (True = a real token), got {mask.dtype} values other than 0 / 1")
        mask = mask != 0
    return mask


def _check_pair(student_logits, teacher_logits, student_mask, teacher_mask):
    """Shapes (B, T_s, V_s) / (B, T_t, V_t), masks (B, T_s) / (B, T_t), every sequence with a real
    token on both sides, logits finite or -inf. The teacher may be RankedLogits (its values (B, T_t, w)
    checked as logits). Returns the two boolean masks."""
    _check_logit_tensor("student_logits", student_logits)
    teacher_values = _values(teacher_logits)
    _check_logit_tensor("teacher_logits", teacher_values)
    if student_logits.shape[0] != teacher_values.shape[0]:
        raise ValueError(f"batch mismatch: student_logits has B={student_logits.shape[0]} sequences, "
                         f"teacher_logits has B={teacher_values.shape[0]}")
    masks = []
    for field, logits, mask in (("student_mask", student_logits, student_mask), ("teacher_mask", teacher_values, teacher_mask)):
        rows = tuple(logits.shape[:2])
        side = field.split("_")[0]
        if mask is None:
            mask = torch.ones(rows, dtype=torch.bool, device=logits.device)
        else:
            mask = _as_bool_mask(field, mask, rows, f"{side}_logits' (B, T) =").to(logits.device)
        empty = (~mask.any(1)).nonzero()
        if empty.numel():
            raise ValueError(f"{field} row {int(empty[0])} has no real token: nothing to compare on the {side} side "
                             "(drop that sequence, or keep at least one response token)")
        masks.append(mask)
    check_logit_values("student_logits", student_logits)
    check_logit_values("teacher_logits", teacher_values)
    if teacher_values is not teacher_logits:
        check_finite("teacher_logits.log_normalizers", teacher_logits.log_normalizers)
    return masks


def _values(teacher):
    """The teacher's logits tensor: the logits, or a RankedLogits' kept values."""
    return teacher.values if isinstance(teacher, RankedLogits) else teacher


def _vocab(teacher) -> int:
    return teacher.vocab if isinstance(teacher, RankedLogits) else teacher.shape[-1]


def _front(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each sequence's real tokens first, in their order (B, T), and their counts (B,)."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return order, mask.sum(1)


def _take(x, order: torch.Tensor, length: int):
    """The first `length` rows of x (B, T, D) in `order`: (B, length, D). x may be RankedLogits."""
    if isinstance(x, RankedLogits):
        return x.map(lambda t: _take(t, order, length))
    idx = order[:, :length]
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


def _first(counts: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) bool: position i < counts[b]."""
    return torch.arange(length, device=counts.device) < counts[:, None]


def _reduce(per_token: torch.Tensor, counts: torch.Tensor, reduction: str) -> torch.Tensor:
    """per_token (B, L), zero past each sequence's count: mean per sequence then over sequences, or
    the mean over all pairs."""
    if reduction == "sequence":
        return (per_token.sum(1) / counts.to(per_token.dtype)).mean()
    return per_token.sum() / counts.sum().to(per_token.dtype)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    *,
    k: int | None = None,
    temperature: float = 1.0,
    reduction: str = "sequence",
) -> torch.Tensor:
    r"""Universal Logit Distillation [1]_: L1 between the ranked distributions of paired tokens.

    For sequence b with :math:`n_s` real student tokens and :math:`n_t` real teacher tokens, the i-th
    real token of one side is paired with the i-th of the other, :math:`i < n_b = \min(n_s, n_t)`
    (ULD's own code truncates both sides to the shorter answer); with :math:`s(i), t(i)` their ranked
    probability vectors (:func:`ranked_probs` at temperature T, zero-padded to
    :math:`\max(V_s, V_t)`, or truncated to the top k),

    .. math::

        \ell_b = \frac{1}{n_b} \sum_{i < n_b} \sum_l |s_l(i) - t_l(i)|, \qquad
        \mathcal{L} = \frac{1}{B} \sum_b \ell_b \quad (\text{reduction="sequence"}), \qquad
        \mathcal{L} = \frac{\sum_b n_b \ell_b}{\sum_b n_b} \quad (\text{"token"}).

    That is the closed-form Wasserstein-1 distance ULD uses between the two sorted vectors. The loss of
    the reference code is ``CE + distillation_weight * L`` with "sequence".

    Parameters
    ----------
    student_logits : Tensor, shape (B, T_s, V_s), floating point
        Student logits; gradients flow into them. -inf marks a masked token (NaN / +inf refused).
    teacher_logits : Tensor, shape (B, T_t, V_t), floating point, or RankedLogits
        Teacher logits; not detached here (pass detached logits for a frozen teacher). A
        :class:`sinkd.RankedLogits` of rows (B, T_t) (e.g. read from a logit cache) gives the same loss
        when it keeps at least the top k logits and the normaliser of ``temperature``.
    student_mask, teacher_mask : Tensor of bool, shapes (B, T_s) / (B, T_t), optional
        True on the rows to compare (those whose logits predict response tokens); default all True.
        Every sequence needs a real token on both sides.
    k : int, optional
        Keep the top k ranked entries of each side (zero-padded when k exceeds a vocabulary); None
        (default, as ULD) keeps every entry, the smaller vocabulary zero-padded to the larger.
    temperature : float, default 1
        Softmax temperature of both sides, > 0.
    reduction : {"sequence", "token"}, default "sequence"
        "sequence": mean over each sequence's pairs, then over the sequences (ULD's code); "token":
        mean over all pairs of the batch.

    Returns
    -------
    Tensor, shape ()
        The loss, in [0, 2]. float32 for half inputs.

    Raises
    ------
    ValueError
        One line: logits not 3-D or of different batch sizes, a mask of the wrong shape or not
        boolean, a sequence without a real token on one side (``student_mask row 3 has no real
        token ...``), NaN / +inf logits, ``k`` < 1, ``temperature`` <= 0, an unknown ``reduction``.

    Examples
    --------
    >>> import torch
    >>> from sinkd import uld_loss
    >>> teacher = torch.randn(2, 6, 40)
    >>> student = torch.randn(2, 5, 30, requires_grad=True)  # other vocabulary, other length
    >>> loss = uld_loss(student, teacher)
    >>> loss.backward()
    >>> 0 < loss.item() < 2
    True
    >>> perm = torch.randperm(40)  # a renamed vocabulary: the ranked vectors are the same
    >>> round(uld_loss(teacher[..., perm], teacher).item(), 6)
    0.0

    References
    ----------
    .. [1] N. Boizard, K. El Haddad, C. Hudelot, P. Colombo. "Towards Cross-Tokenizer Distillation:
           the Universal Logit Distillation Loss for LLMs". arXiv:2402.12030.
    """
    mask_s, mask_t = _check_pair(student_logits, teacher_logits, student_mask, teacher_mask)
    k = _check_k(k)
    temperature = check_positive("temperature", temperature)
    check_choice("reduction", reduction, REDUCTIONS)
    if student_logits.shape[0] == 0:
        return (student_logits.sum() + _values(teacher_logits).sum()) * 0.0
    order_s, n_s = _front(mask_s)
    order_t, n_t = _front(mask_t)
    pairs = torch.minimum(n_s, n_t)
    length = int(pairs.max())
    width = k or max(student_logits.shape[-1], _vocab(teacher_logits))
    # Only the paired rows are ranked (a full sort each when k is None).
    ps = ranked_log(_take(student_logits, order_s, length), width, temperature).exp()
    pt = ranked_log(_take(teacher_logits, order_t, length), width, temperature).exp()
    per_token = (ps - pt).abs().sum(-1) * _first(pairs, length)
    return _reduce(per_token, pairs, reduction)


@dataclass(frozen=True)
class MultiLevelOTConfig:
    """Options of :func:`multilevel_ot_loss`; defaults are the paper's [2]_. Checked on construction.

    - ``alpha`` (>= 0, 0.15), ``beta`` (>= 0, 0.1), ``gamma`` (>= 0, 0.1): the weights in
      ``CE + alpha * (HAD + beta * SL + gamma * SD)``; a term whose weight is 0 is not computed.
    - ``k`` (>= 1, 50): ranked entries kept per token.
    - ``tau_had`` (1), ``tau_sl`` (1), ``tau_sd`` (2): the softmax temperature of each term's ranked
      vectors (> 0).
    - ``eps`` (> 0, 0.1): the Sinkhorn regularisation, the paper's lambda (kernel exp(-C / eps)).
    - ``max_iter`` (>= 1, 20), ``tol`` (> 0 or None), ``grad`` ("unrolled", the paper's autograd
      through the iterations, or "implicit": no stored iterations, exact at convergence): passed to
      :func:`sinkd.sinkhorn` for the sequence-level plans.

    Examples
    --------
    >>> from sinkd import MultiLevelOTConfig
    >>> MultiLevelOTConfig().k, MultiLevelOTConfig().max_iter
    (50, 20)
    >>> MultiLevelOTConfig.from_dict({"k": 20, "grad": "implicit"}).k
    20
    """

    alpha: float = 0.15
    beta: float = 0.1
    gamma: float = 0.1
    k: int = 50
    tau_had: float = 1.0
    tau_sl: float = 1.0
    tau_sd: float = 2.0
    eps: float = 0.1
    max_iter: int = 20
    tol: float | None = None
    grad: str = "unrolled"

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma"):
            self._set(name, check_nonnegative(name, getattr(self, name)))
        self._set("k", check_int_at_least("k", self.k, 1))
        for name in ("tau_had", "tau_sl", "tau_sd", "eps"):
            self._set(name, check_positive(name, getattr(self, name)))
        self._set("max_iter", check_int_at_least("max_iter", self.max_iter, 1))
        if self.tol is not None:
            self._set("tol", check_positive("tol", self.tol))
        check_choice("grad", self.grad, SD_GRAD_MODES)

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # frozen: only __post_init__ normalises its own fields

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "MultiLevelOTConfig":
        """From a plain mapping (e.g. parsed YAML); None or {} gives the defaults. Unknown keys are
        refused by name: ``lambda: unknown key; valid: ...``."""
        values = {} if values is None else values
        if not isinstance(values, Mapping):
            raise TypeError(f"MultiLevelOTConfig.from_dict expects a mapping, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names), key=str)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown key; valid: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MultiLevelOTOutput:
    """The three unweighted terms and ``total_kd = alpha * (had + beta * sl + gamma * sd)``, the part
    to add to the cross-entropy (terms of weight 0 are reported as 0)."""

    had: torch.Tensor
    sl: torch.Tensor
    sd: torch.Tensor
    total_kd: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("had", "sl", "sd", "total_kd")}


def multilevel_ot_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_mask: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    config: MultiLevelOTConfig | Mapping | None = None,
    **overrides,
) -> MultiLevelOTOutput:
    r"""The MultiLevelOT distillation terms [2]_ between a student and a teacher of different vocabularies.

    Every real token's probabilities are ranked and truncated to the top k (:func:`ranked_probs`):
    :math:`s(j) \in \mathbb{R}^k` for the j-th real student token of a sequence, :math:`t(i)` for the
    i-th real teacher token, at the temperature of each term. On the aligned pairs
    :math:`i < n_b = \min(n_s, n_t)` of sequence b (the i-th real token of each side, as ULD):

    .. math::

        \mathrm{HAD}_b = \frac{1}{n_b} \sum_{i < n_b} \sum_{l \le k} |t_l(i) - s_l(i)|, \qquad
        \mathrm{SL}_b = -\frac{1}{n_b} \sum_{i < n_b} \sum_{l \le k} t_l(i) \log s_l(i)

    (tau_had, tau_sl). The sequence level (tau_sd) transports the :math:`n_t` teacher tokens onto the
    :math:`n_s` student tokens with the rectangular cost
    :math:`C_{ij} = \sum_l |t_l(i) - s_l(j)|` and the entropic plan of :func:`sinkd.sinkhorn` [3]_
    (kernel :math:`\exp(-C / \varepsilon)`, ``max_iter`` iterations, uniform marginals
    :math:`a = 1/n_t`, :math:`b = 1/n_s` over the real tokens; padding has weight 0):

    .. math::

        \mathrm{SD}_b = \langle P_b, C_b \rangle, \qquad
        \mathcal{L}_{KD} = \alpha \Big(\overline{\mathrm{HAD}} + \beta\, \overline{\mathrm{SL}}
                           + \gamma\, \overline{\mathrm{SD}}\Big)

    with the bars the means over the B sequences; the training loss is
    :math:`\mathrm{CE} + \mathcal{L}_{KD}`. The sequences are solved together: the cost is
    (B, max n_t, max n_s), one batched solve. Where the paper's official code differs (its ranking,
    a second softmax in SL and SD, plain marginals over a padded square, sums vs means, its weights),
    see the module docstring and docs/cross_tokenizer.md.

    Parameters
    ----------
    student_logits : Tensor, shape (B, T_s, V_s), floating point
        Student logits; gradients flow into them. -inf marks a masked token (NaN / +inf refused).
    teacher_logits : Tensor, shape (B, T_t, V_t), floating point, or RankedLogits
        Teacher logits; not detached here (pass detached logits for a frozen teacher). A
        :class:`sinkd.RankedLogits` of rows (B, T_t) (e.g. read from a logit cache) gives the same loss
        when it keeps at least the top k logits and the normaliser of each of tau_had, tau_sl and
        tau_sd (those of the terms of weight > 0).
    student_mask, teacher_mask : Tensor of bool, shapes (B, T_s) / (B, T_t), optional
        True on the rows to compare (those whose logits predict response tokens); default all True.
        Every sequence needs a real token on both sides.
    config : MultiLevelOTConfig or mapping, optional
        Weights, k, temperatures and solver options (default: the paper's); a mapping goes through
        :meth:`MultiLevelOTConfig.from_dict`.
    **overrides
        Any :class:`MultiLevelOTConfig` field, replacing the config's value, e.g. ``k=20``.

    Returns
    -------
    MultiLevelOTOutput
        ``had``, ``sl``, ``sd`` (each a 0-d tensor, unweighted, 0 when its weight is 0) and
        ``total_kd`` = alpha * (had + beta * sl + gamma * sd); ``as_dict()`` gives floats. float32 for
        half inputs. In SL a ranked entry the student lacks (k beyond its vocabulary, a masked token)
        counts as the smallest normal float: finite, large.

    Raises
    ------
    ValueError
        One line: logits not 3-D or of different batch sizes, a mask of the wrong shape or not
        boolean, a sequence without a real token on one side (``teacher_mask row 2 has no real
        token ...``), NaN / +inf logits, a bad config field (named, e.g. ``k must be an integer >=
        1, got 0``).

    Examples
    --------
    >>> import torch
    >>> from sinkd import multilevel_ot_loss
    >>> student = torch.randn(2, 5, 30, requires_grad=True)  # (B, T_s, V_s)
    >>> teacher = torch.randn(2, 7, 40)                      # (B, T_t, V_t)
    >>> teacher_mask = torch.ones(2, 7, dtype=torch.bool)
    >>> teacher_mask[1, 4:] = False                          # the second answer is shorter
    >>> out = multilevel_ot_loss(student, teacher, teacher_mask=teacher_mask, k=20)
    >>> (torch.nn.functional.cross_entropy(student.reshape(-1, 30), torch.randint(30, (10,))) + out.total_kd).backward()
    >>> sorted(out.as_dict())
    ['had', 'sd', 'sl', 'total_kd']

    References
    ----------
    .. [1] N. Boizard et al. "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
           Loss for LLMs". arXiv:2402.12030.
    .. [2] X. Cui, M. Zhu, Y. Qin, L. Xie, W. Zhou, H. Li. "Multi-Level Optimal Transport for
           Universal Cross-Tokenizer Knowledge Distillation on Language Models". AAAI 2025.
           arXiv:2412.14528.
    .. [3] M. Cuturi. "Sinkhorn Distances: Lightspeed Computation of Optimal Transport". NeurIPS 2013.
           arXiv:1306.0895.
    """
    if isinstance(config, Mapping):
        config = MultiLevelOTConfig.from_dict(config)
    config = config or MultiLevelOTConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    mask_s, mask_t = _check_pair(student_logits, teacher_logits, student_mask, teacher_mask)
    if student_logits.shape[0] == 0:
        zero = (student_logits.sum() + _values(teacher_logits).sum()) * 0.0
        return MultiLevelOTOutput(zero, zero, zero, zero)
    order_s, n_s = _front(mask_s)
    order_t, n_t = _front(mask_t)
    pairs = torch.minimum(n_s, n_t)
    length = int(pairs.max())
    # Each side's real rows, moved to the front: (B, max n, V); ranked once per distinct temperature.
    zs = _take(student_logits, order_s, int(n_s.max()))
    zt = _take(teacher_logits, order_t, int(n_t.max()))
    ranked = {}

    def log_ranked(tau):
        if tau not in ranked:
            ranked[tau] = (ranked_log(zs, config.k, tau), ranked_log(zt, config.k, tau))
        return ranked[tau]

    paired = _first(pairs, length)
    log_s, log_t = log_ranked(config.tau_had)
    had_tok = (log_t[:, :length].exp() - log_s[:, :length].exp()).abs().sum(-1)
    had = _reduce(had_tok * paired, pairs, "sequence")
    zero = had * 0.0
    sl = sd = zero
    if config.beta > 0:
        log_s, log_t = log_ranked(config.tau_sl)
        log_s = log_s[:, :length]
        # log 0 (past the student's vocabulary, masked tokens) floored so that 0 * log 0 stays 0.
        log_s = log_s.clamp_min(math.log(torch.finfo(log_s.dtype).tiny))
        sl_tok = -(log_t[:, :length].exp() * log_s).sum(-1)
        sl = _reduce(sl_tok * paired, pairs, "sequence")
    if config.gamma > 0:
        sd = _sequence_sinkhorn(*log_ranked(config.tau_sd), n_s, n_t, config)
    total = config.alpha * (had + config.beta * sl + config.gamma * sd)
    return MultiLevelOTOutput(had, sl, sd, total)


def _sequence_sinkhorn(log_s, log_t, n_s, n_t, config: MultiLevelOTConfig) -> torch.Tensor:
    """Mean over the sequences of <P_b, C_b>, C_b = L1 between the n_t teacher and n_s student ranked
    vectors; log_s (B, max n_s, k), log_t (B, max n_t, k) with the real rows first."""
    real_s = _first(n_s, log_s.shape[1])
    real_t = _first(n_t, log_t.shape[1])
    # Padding rows zeroed so the cost stays finite; their marginal weight is 0, so they get no mass.
    rs = log_s.exp() * real_s[..., None]
    rt = log_t.exp() * real_t[..., None]
    cost = cost_matrix(rt, rs, "l1")  # (B, max n_t, max n_s), batched over the sequences
    # The solver's first row update starts from g = 0 on every column, padding included: a padded
    # entry costs 1000 eps more than any real one, so its kernel weight is exactly 0 (e^-1000
    # underflows in fp32 and fp64) and each sequence's plan is that of its unpadded sub-problem at
    # every iteration count.
    real = real_t[:, :, None] & real_s[:, None, :]
    pad_cost = cost.detach().amax() + 1000 * config.eps
    cost = torch.where(real, cost, pad_cost)
    a = real_t.to(cost.dtype) / n_t[:, None].to(cost.dtype)
    b = real_s.to(cost.dtype) / n_s[:, None].to(cost.dtype)
    result = sinkhorn(cost, config.eps, a=a, b=b, max_iter=config.max_iter, tol=config.tol, grad=config.grad)
    return result.cost.mean()
