r"""Ranked log-probabilities of logits, and :class:`RankedLogits`: a teacher kept as only what the
ranked losses read, so that its logits can be cached.

The ranked losses (ULD, MultiLevelOT; :mod:`sinkd.cross_vocab`) read each row's probabilities
softmax(z / T) sorted in descending order and cut to the top k. Since z / T keeps the order of z,

.. math::

    \log r(z)_l = \frac{z_{(l)}}{T} - \log \sum_v e^{z_v / T}, \qquad l = 1 \dots k,

where :math:`z_{(1)} \ge z_{(2)} \ge \dots` are the sorted logits: the k largest logits and one
normaliser per temperature give the ranked vector exactly, whatever the vocabulary. A row of
:class:`RankedLogits` holds w sorted logits and the normalisers of a few temperatures, w + m floats
instead of V.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ._checks import at_least_float32, check_int_at_least, check_logit_tensor, check_logit_values, check_positive


def _sorted_top(z: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` largest entries of each row, descending (all V, sorted, when width >= V)."""
    return z.topk(width, dim=-1).values if width < z.shape[-1] else z.sort(dim=-1, descending=True).values


def _pad_to(log_p: torch.Tensor, k: int) -> torch.Tensor:
    """log-probabilities widened to k entries with -inf (probability 0) past those there are."""
    short = k - log_p.shape[-1]
    return torch.nn.functional.pad(log_p, (0, short), value=-math.inf) if short > 0 else log_p


def ranked_log(logits: torch.Tensor, k: int | None, temperature: float) -> torch.Tensor:
    """log of softmax(logits / T) sorted descending, (..., k): the top k, or all V when k is None;
    -inf past the vocabulary when k > V (probability 0). topk on the logits, then one logsumexp:
    no (..., V) softmax is kept for the backward when k < V. `logits` may be a RankedLogits."""
    if isinstance(logits, RankedLogits):
        return logits.log_ranked(k, temperature)
    z = at_least_float32(logits) / temperature
    width = z.shape[-1] if k is None else k
    return _pad_to(_sorted_top(z, width) - torch.logsumexp(z, dim=-1, keepdim=True), width)


@dataclass(frozen=True)
class RankedLogits:
    r"""Each row's w largest logits, sorted descending, and its log-normaliser at each of a few
    temperatures: a teacher as the ranked losses read it (module docstring).

    Pass it as ``teacher_logits`` to :func:`sinkd.uld_loss` or :func:`sinkd.multilevel_ot_loss`: for a
    k <= w and temperatures among ``temperatures`` the loss equals the one on the full logits (the same
    floating-point operations, so to the last bit in float32). A k above w (or ULD's ``k=None``) and an
    unstored temperature are refused, since the rest of the vocabulary is not kept; when w = V the
    whole ranked vocabulary is kept and any k works.

    Attributes
    ----------
    values : Tensor, shape (..., w), floating point
        The w largest logits of each row (temperature 1), in descending order.
    log_normalizers : Tensor, shape (..., m)
        :math:`\log \sum_v e^{z_v / T_j}` over the whole vocabulary, for the j-th temperature.
    temperatures : tuple of m floats
        The temperatures of ``log_normalizers``, in that order.
    vocab : int
        V, the size of the vocabulary the logits were over (w <= V).

    Examples
    --------
    >>> import torch
    >>> from sinkd import RankedLogits, ranked_probs
    >>> logits = torch.randn(2, 7, 1000)
    >>> cached = RankedLogits.from_logits(logits, width=64, temperatures=(1.0, 2.0))
    >>> cached.values.shape, cached.log_normalizers.shape
    (torch.Size([2, 7, 64]), torch.Size([2, 7, 2]))
    >>> torch.equal(cached.log_ranked(50, 2.0).exp(), ranked_probs(logits, k=50, temperature=2.0))
    True
    """

    values: torch.Tensor
    log_normalizers: torch.Tensor
    temperatures: tuple
    vocab: int

    def __post_init__(self):
        check_logit_tensor("values", self.values, lambda d: d >= 1, "(..., w)")
        temps = tuple(check_positive("temperatures", t) for t in self.temperatures)
        object.__setattr__(self, "temperatures", temps)
        if tuple(self.log_normalizers.shape) != (*self.values.shape[:-1], len(temps)):
            raise ValueError(f"log_normalizers shape {tuple(self.log_normalizers.shape)} must be the values' rows "
                             f"{tuple(self.values.shape[:-1])} by {len(temps)} temperatures")
        check_int_at_least("vocab", self.vocab, self.values.shape[-1])

    @classmethod
    def from_logits(cls, logits: torch.Tensor, width: int, temperatures: Sequence[float]) -> "RankedLogits":
        """The w = min(width, V) largest logits of each row of `logits` (..., V) and their log-normalisers
        at `temperatures` (float32 for half logits). Raises ValueError naming a bad argument."""
        check_logit_tensor("logits", logits, lambda d: d >= 1, "(..., V)")
        width = check_int_at_least("width", width, 1)
        if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence) or not temperatures:
            raise ValueError(f"temperatures must be a non-empty sequence of numbers > 0, got {temperatures!r}")
        temps = tuple(check_positive("temperatures", t) for t in temperatures)
        if len(set(temps)) != len(temps):
            raise ValueError(f"temperatures has a repeated value: {list(temps)}")
        check_logit_values("logits", logits)
        z = at_least_float32(logits)
        normalizers = torch.stack([torch.logsumexp(z / t, dim=-1) for t in temps], dim=-1)
        return cls(_sorted_top(z, width), normalizers, temps, z.shape[-1])

    @property
    def width(self) -> int:
        return self.values.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The rows' shape (the values' without w)."""
        return self.values.shape[:-1]

    def log_ranked(self, k: int | None, temperature: float) -> torch.Tensor:
        """log softmax(z / T) sorted descending, the top k (..., k), as :func:`ranked_log` gives on the
        full logits; k None: the whole vocabulary (needs w = V). -inf past the vocabulary."""
        width, vocab = self.width, self.vocab
        k = vocab if k is None else k
        if k > width and width < vocab:
            raise ValueError(f"k: {k} ranked entries asked, but only the top {width} of {vocab:,} logits are kept per row")
        match = [j for j, t in enumerate(self.temperatures) if math.isclose(t, temperature, rel_tol=1e-9)]
        if not match:
            raise ValueError(f"temperature: {temperature:g} has no stored normaliser (stored: "
                             f"{', '.join(f'{t:g}' for t in self.temperatures)})")
        j = match[0]
        z = at_least_float32(self.values[..., :k]) / self.temperatures[j]
        return _pad_to(z - self.log_normalizers[..., j:j + 1], k)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "RankedLogits":
        """The same row operation (indexing, gathering, moving) on values and normalisers alike."""
        return RankedLogits(fn(self.values), fn(self.log_normalizers), self.temperatures, self.vocab)

    def __getitem__(self, index) -> "RankedLogits":
        """Rows selected as on a tensor of the rows' shape (the last dimension untouched)."""
        return self.map(lambda t: t[index])

    def to(self, *args, **kwargs) -> "RankedLogits":
        return self.map(lambda t: t.to(*args, **kwargs))
