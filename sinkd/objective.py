"""The combined distillation objective: CE + alpha * KD(divergence) + beta * Sinkhorn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._checks import check_choice, check_logits, check_nonnegative, check_open_unit, check_positive
from .divergences import DIVERGENCES, REDUCTIONS, divergence
from .sinkhorn_loss import SinkhornConfig, _dataclass_from_dict, sinkhorn_loss
from .topk import TopKDistribution
from .topk_teacher import check_topk_teacher


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
        for name in ("ce_weight", "alpha", "beta"):
            check_nonnegative(name, getattr(self, name))
        check_positive("temperature", self.temperature)
        check_choice("divergence", self.divergence, DIVERGENCES)
        check_open_unit("skew_alpha", self.skew_alpha)
        check_choice("reduction", self.reduction, tuple(r for r in REDUCTIONS if r != "none"))
        if not isinstance(self.sinkhorn, SinkhornConfig):
            raise ValueError(f"sinkhorn must be a SinkhornConfig, got {type(self.sinkhorn).__name__}")

    @classmethod
    def paper(cls, alpha: float = 1.0, beta: float = 1.0, **overrides) -> "ObjectiveConfig":
        """SinKD's setting: KD and Sinkhorn at T=2, Sinkhorn eps=0.1, 20 iterations, L1, plain."""
        return cls(alpha=alpha, beta=beta, temperature=2.0, sinkhorn=SinkhornConfig.paper(), **overrides)

    @classmethod
    def from_dict(cls, values: dict | None) -> "ObjectiveConfig":
        """From a plain mapping (YAML); errors name the dotted key, e.g. 'objective.sinkhorn.eps'."""
        values = dict(values or {})
        if not isinstance(values.get("sinkhorn", {}), (dict, SinkhornConfig)):
            raise ValueError("objective.sinkhorn must be a mapping")
        sink = values.pop("sinkhorn", None)
        if not isinstance(sink, SinkhornConfig):
            sink = SinkhornConfig.from_dict(sink, prefix="objective.sinkhorn")
        return _dataclass_from_dict(cls, {**values, "sinkhorn": sink}, prefix="objective")

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
    """Callable objective: objective(student_logits, teacher_logits, labels=None, mask=None).

    Logits are (N, V) for classification or (B, L, V) for tokens. The teacher is treated as frozen
    (its logits are detached). mask selects rows for the KD and Sinkhorn terms; when it is None and
    labels are given, rows whose label is ignore_index are left out (padding, prompt tokens).
    The teacher may also be a TopKDistribution (a logit cache's top-k probabilities, ids and rest
    mass per row): KD spreads the rest evenly over the other tokens, Sinkhorn uses the sparse L1 cost.
    """

    def __init__(self, config: ObjectiveConfig | None = None):
        self.config = config or ObjectiveConfig()

    def __call__(self, student_logits, teacher_logits, labels=None, mask=None) -> ObjectiveOutput:
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
