"""The combined distillation objective: CE + alpha * KD(divergence) + beta * Sinkhorn."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._checks import as_real, check_choice, check_logits, check_nonnegative, check_open_unit, check_positive
from .divergences import DIVERGENCES, REDUCTIONS, divergence
from .sinkhorn_loss import SinkhornConfig, _dataclass_from_dict, sinkhorn_loss
from .topk import TopKDistribution, check_topk_teacher


@dataclass(frozen=True)
class ObjectiveConfig:
    """Weights and options of every term; `temperature` is the KD term's, the Sinkhorn term has its own."""

    ce_weight: float = 1.0
    alpha: float = 0.0
    beta: float = 1.0
    temperature: float = 1.0
    divergence: str = "kl"
    skew_alpha: float = 0.1
    reduction: str = "batchmean"
    ignore_index: int = -100
    sinkhorn: SinkhornConfig = field(default_factory=SinkhornConfig)

    def __post_init__(self):
        # Numbers of any real type (Python, numpy, 0-d tensors) are stored as Python floats / ints.
        for name in ("ce_weight", "alpha", "beta"):
            object.__setattr__(self, name, check_nonnegative(name, getattr(self, name)))
        object.__setattr__(self, "temperature", check_positive("temperature", self.temperature))
        check_choice("divergence", self.divergence, DIVERGENCES)
        object.__setattr__(self, "skew_alpha", check_open_unit("skew_alpha", self.skew_alpha))
        index = as_real(self.ignore_index)
        if not isinstance(index, int):
            raise TypeError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        object.__setattr__(self, "ignore_index", index)
        check_choice("reduction", self.reduction, tuple(r for r in REDUCTIONS if r != "none"))
        if not isinstance(self.sinkhorn, SinkhornConfig):
            raise ValueError(f"sinkhorn must be a SinkhornConfig, got {type(self.sinkhorn).__name__}")

    @classmethod
    def paper(cls, alpha: float = 1.0, beta: float = 1.0, **overrides) -> "ObjectiveConfig":
        """SinKD's setting: KD and Sinkhorn at T=2, Sinkhorn eps=0.1, 20 iterations, L1, plain."""
        return cls(**{"alpha": alpha, "beta": beta, "temperature": 2.0, "sinkhorn": SinkhornConfig.paper(), **overrides})

    @classmethod
    def from_dict(cls, values: Mapping | None) -> "ObjectiveConfig":
        """From a plain mapping (e.g. parsed YAML); ``sinkhorn`` may be a nested mapping or a SinkhornConfig.

        Errors are one line naming the dotted key inside ``values``: ``betta: unknown key; valid: ...``,
        ``sinkhorn.eps must be a finite number > 0, got 0``, ``sinkhorn must be a mapping, got list``.
        A caller that nests this mapping (e.g. under ``objective:`` in a YAML file) prefixes its own key.
        """
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise TypeError(f"ObjectiveConfig.from_dict expects a mapping, got {type(values).__name__}")
        values = dict(values)
        if "sinkhorn" in values:
            sink = values.pop("sinkhorn")
            if not isinstance(sink, (Mapping, SinkhornConfig)):
                raise ValueError(f"sinkhorn must be a mapping, got {type(sink).__name__}")
            if not isinstance(sink, SinkhornConfig):
                try:
                    sink = SinkhornConfig.from_dict(sink)
                except ValueError as e:  # name the field from this mapping: sinkhorn.<field> ...
                    raise ValueError(f"sinkhorn.{e}") from None
            values["sinkhorn"] = sink
        return _dataclass_from_dict(cls, values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ObjectiveOutput:
    """The total to backward and each weighted term's unweighted value (0 when its weight is 0)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    sinkhorn: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "ce", "kd", "sinkhorn")}


class DistillationObjective:
    r"""The combined distillation loss: cross-entropy + alpha * KD divergence + beta * SinKD loss.

    .. math::

        \mathcal{L} = w_{ce}\, \mathrm{CE}(z_s, y)
                    + \alpha\, D_{\mathrm{name}}(p_t, p_s; T)
                    + \beta\, \mathcal{L}_{\mathrm{Sinkhorn}}(z_s, z_t)

    with :math:`w_{ce}` = ``config.ce_weight``; CE the mean over rows whose label is not
    ``config.ignore_index`` of :math:`-\log \mathrm{softmax}(z_s)_y` (at temperature 1; 0 when every
    label is ignored); the divergence D of :func:`sinkd.divergence`
    (``config.divergence`` at ``config.temperature``, e.g. :math:`T^2\, \mathrm{KL}(p_t \| p_s)`,
    reduced by ``config.reduction``) and the Sinkhorn term of :func:`sinkd.sinkhorn_loss` with
    ``config.sinkhorn`` (its own temperature) [1]_. A term whose weight is 0 is not computed (its
    value is reported as 0). ``ObjectiveConfig.paper(alpha, beta)`` is the SinKD setting.

    Parameters
    ----------
    config : ObjectiveConfig, optional
        Weights and options of every term (default ``ObjectiveConfig()``: CE + Sinkhorn, no KD).

    Examples
    --------
    >>> import torch
    >>> from sinkd import DistillationObjective, ObjectiveConfig
    >>> objective = DistillationObjective(ObjectiveConfig.paper(alpha=0.5, beta=1.0))
    >>> student = torch.zeros(4, 10, requires_grad=True)
    >>> teacher = torch.eye(4, 10) * 5
    >>> out = objective(student, teacher, labels=torch.tensor([0, 1, 2, 3]))
    >>> out.loss.backward()
    >>> sorted(out.as_dict())
    ['ce', 'kd', 'loss', 'sinkhorn']
    >>> round(out.ce.item(), 4)  # log(10): uniform student
    2.3026

    References
    ----------
    .. [1] X. Cui et al. "Sinkhorn Distance Minimization for Knowledge Distillation".
           LREC-COLING 2024. arXiv:2402.17110.
    """

    def __init__(self, config: ObjectiveConfig | None = None):
        self.config = config or ObjectiveConfig()

    def __call__(self, student_logits, teacher_logits, labels=None, mask=None) -> ObjectiveOutput:
        """Evaluate every term on one batch.

        Parameters
        ----------
        student_logits : Tensor, shape (N, V) (classification) or (B, L, V) (tokens), floating point
            The student's logits; the loss is differentiable in them.
        teacher_logits : Tensor of the same shape, or TopKDistribution
            The teacher's logits, detached here (the teacher is frozen). Or a
            :class:`sinkd.TopKDistribution` over the same rows (a logit cache's top-k probabilities at
            T = 1, ids and rest mass, e.g. ``TopKDistribution.from_logits(logits, k)``): the KD term
            spreads the rest evenly over the other tokens, the Sinkhorn term uses the sparse L1 cost.
        labels : Tensor of int, shape (N,) or (B, L), optional
            Targets of the CE term (required when ``ce_weight > 0``); entries equal to
            ``config.ignore_index`` are left out of CE and, when ``mask`` is None, of KD and Sinkhorn.
        mask : Tensor of bool, shape (N,) or (B, L), optional
            Rows kept by the KD and Sinkhorn terms (CE always uses ``labels`` / ignore_index).
            Default: ``labels != ignore_index`` when labels are given, else every row.

        Returns
        -------
        ObjectiveOutput
            ``loss`` (shape (), the weighted total to backward) and the unweighted ``ce``, ``kd`` and
            ``sinkhorn`` values (0 for a term whose weight is 0); ``as_dict()`` gives them as floats.

        Raises
        ------
        ValueError
            One line: missing labels with ce_weight > 0, a labels or mask shape that is not the
            logits' row shape, and every input error of :func:`sinkd.divergence` /
            :func:`sinkd.sinkhorn_loss`.
        """
        cfg = self.config
        if isinstance(teacher_logits, TopKDistribution):
            check_topk_teacher(student_logits, teacher_logits)
            teacher_logits = TopKDistribution(*(t.detach() for t in teacher_logits))
        else:
            check_logits(student_logits, teacher_logits)
            teacher_logits = teacher_logits.detach()
        zero = student_logits.new_zeros(())
        if labels is not None:
            if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
                raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' row shape {tuple(student_logits.shape[:-1])}")
            if mask is None:
                mask = labels != cfg.ignore_index
        ce = zero
        if cfg.ce_weight > 0:
            if labels is None:
                raise ValueError("labels are required when ce_weight > 0")
            flat_labels = labels.reshape(-1)
            if bool((flat_labels != cfg.ignore_index).any()):
                ce = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), flat_labels, ignore_index=cfg.ignore_index)
        kd = zero
        if cfg.alpha > 0:
            kd = divergence(student_logits, teacher_logits, cfg.divergence, temperature=cfg.temperature,
                            mask=mask, reduction=cfg.reduction, skew_alpha=cfg.skew_alpha)
        sink = zero
        if cfg.beta > 0:
            sink = sinkhorn_loss(student_logits, teacher_logits, cfg.sinkhorn, mask=mask)
        total = cfg.ce_weight * ce + cfg.alpha * kd + cfg.beta * sink
        return ObjectiveOutput(total, ce, kd, sink)
