"""The losses of a student and a teacher with different vocabularies, on the task's paired rows:

    ce             CE                                      (the student's next-token loss alone)
    uld            ce_weight * CE + weight * ULD           (Boizard et al. 2024: L1 of ranked vectors)
    multilevel_ot  ce_weight * CE + alpha * (HAD + beta * SL + gamma * SD)   (Cui et al., AAAI 2025)
    dskd           (1 - kd_rate) * CE + kd_rate * (t2s_CE + t2s_KD + s2t_KD)  (Zhang et al., EMNLP 2024;
                   cross-model attention through trained projectors: dskd.py)

from sinkd.cross_vocab. The YAML mapping (`objective:`, a baseline's overrides merged over it):

    objective: {method: multilevel_ot, ce_weight: 1.0, multilevel_ot: {k: 50, gamma: 0.1}}
    baselines: {uld: {method: uld, uld: {weight: 1.0}}, ce: {method: ce}}

Logged terms: `kd` is ULD, alpha * (HAD + beta * SL), or kd_rate * DSKD's KD; `sinkhorn` is
alpha * gamma * SD (0 for the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import ConfigError
from .dskd import DEFAULTS as DSKD_KEYS
from .dskd import dskd_cma_terms

METHODS = ("ce", "uld", "multilevel_ot", "dskd")
ULD_KEYS = {"weight": 1.0, "k": None, "temperature": 1.0, "reduction": "sequence"}


@dataclass
class CrossTerms:
    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    sinkhorn: torch.Tensor


class CrossTokenizerObjective:
    """A task Objective on Rows with `extra` student_mask (B, T_s) and teacher_mask (B, T_t)."""

    def __init__(self, values: dict, prefix: str = "objective"):
        from sinkd import MultiLevelOTConfig

        values = dict(values or {})
        known = {"method", "ce_weight", "uld", "multilevel_ot", "dskd"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{prefix}.{unknown[0]}: unknown key for task_type cross_tokenizer; valid: {', '.join(sorted(known))}")
        self.method = values.get("method", "multilevel_ot")
        if self.method not in METHODS:
            raise ConfigError(f"{prefix}.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.ce_weight = values.get("ce_weight", 1.0)
        if not isinstance(self.ce_weight, (int, float)) or isinstance(self.ce_weight, bool) or self.ce_weight < 0:
            raise ConfigError(f"{prefix}.ce_weight: must be a number >= 0, got {self.ce_weight!r}")
        uld = values.get("uld") or {}
        bad = sorted(set(uld) - set(ULD_KEYS)) if isinstance(uld, dict) else ["(not a mapping)"]
        if bad:
            raise ConfigError(f"{prefix}.uld.{bad[0]}: unknown key; valid: {', '.join(ULD_KEYS)}")
        self.uld = {**ULD_KEYS, **uld}
        self._check_uld(prefix)
        try:
            self.mlot = MultiLevelOTConfig.from_dict(values.get("multilevel_ot") or {})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix}.multilevel_ot.{str(e).splitlines()[0]}") from None
        dskd = values.get("dskd") or {}
        bad = sorted(set(dskd) - set(DSKD_KEYS)) if isinstance(dskd, dict) else ["(not a mapping)"]
        if bad:
            raise ConfigError(f"{prefix}.dskd.{bad[0]}: unknown key; valid: {', '.join(DSKD_KEYS)}")
        self.dskd = {**DSKD_KEYS, **dskd}
        for key, value in self.dskd.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (key != "kd_rate" and value == 0):
                raise ConfigError(f"{prefix}.dskd.{key}: must be a number {'>= 0' if key == 'kd_rate' else '> 0'}, got {value!r}")
        if self.dskd["kd_rate"] > 1:
            raise ConfigError(f"{prefix}.dskd.kd_rate: must be in [0, 1] (the loss is (1 - kd_rate) * CE + kd_rate * KD), "
                              f"got {self.dskd['kd_rate']}")

    @property
    def projector_lr(self) -> float | None:
        """The learning rate of DSKD's projectors (their own parameter group), None for other methods."""
        return self.dskd["projector_lr"] if self.method == "dskd" else None

    def ranked_needs(self) -> tuple[int | None, set[float]] | None:
        """(k, the temperatures its ranked teacher vectors are read at) of ULD and MultiLevelOT (k None:
        whole vocabularies); None for a method that reads more of the teacher (DSKD) or nothing (CE)."""
        if self.method == "uld":
            return self.uld["k"], {float(self.uld["temperature"])}
        if self.method == "multilevel_ot":
            c = self.mlot
            taus = {c.tau_had} | ({c.tau_sl} if c.beta > 0 else set()) | ({c.tau_sd} if c.gamma > 0 else set())
            return c.k, {float(t) for t in taus}
        return None

    def _check_uld(self, prefix: str) -> None:
        from sinkd import uld_loss

        u = self.uld
        if not isinstance(u["weight"], (int, float)) or u["weight"] < 0:
            raise ConfigError(f"{prefix}.uld.weight: must be a number >= 0, got {u['weight']!r}")
        try:  # the library's own checks, on a tiny pair
            uld_loss(torch.zeros(1, 1, 2), torch.zeros(1, 1, 3), k=u["k"], temperature=u["temperature"], reduction=u["reduction"])
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{prefix}.uld.{str(e).splitlines()[0]}") from None

    def __call__(self, rows) -> CrossTerms:
        from sinkd import multilevel_ot_loss, uld_loss

        s_mask, t_mask = rows.extra["student_mask"], rows.extra["teacher_mask"]
        ce = F.cross_entropy(rows.student[s_mask], rows.labels[s_mask])
        zero = ce.detach() * 0.0
        kd = sd = zero
        if self.method == "uld":
            kd = self.uld["weight"] * uld_loss(rows.student, rows.teacher, s_mask, t_mask, k=self.uld["k"],
                                               temperature=self.uld["temperature"], reduction=self.uld["reduction"])
        elif self.method == "multilevel_ot":
            out = multilevel_ot_loss(rows.student, rows.teacher, s_mask, t_mask, config=self.mlot)
            c = self.mlot
            kd, sd = c.alpha * (out.had + c.beta * out.sl), c.alpha * c.gamma * out.sd
        elif self.method == "dskd":
            d = self.dskd
            terms = dskd_cma_terms(rows.extra["projectors"], rows.extra["student_side"], rows.extra["teacher_side"],
                                   d["temperature"], d["teacher_temperature"])
            kd = d["kd_rate"] * sum(terms.values())
            return CrossTerms((1 - d["kd_rate"]) * ce + kd, ce, kd, zero)
        loss = self.ce_weight * ce + kd + sd
        return CrossTerms(loss, ce, kd, sd)

    def describe(self) -> str:
        parts = [f"ce {self.ce_weight:g}"]
        if self.method == "uld":
            u = self.uld
            parts.append(f"{u['weight']:g} x ULD (k {u['k'] or 'all'}, T {u['temperature']:g})")
        elif self.method == "multilevel_ot":
            c = self.mlot
            parts.append(f"{c.alpha:g} x (HAD + {c.beta:g} SL + {c.gamma:g} SD) (k {c.k}, eps {c.eps:g}, "
                         f"{c.max_iter} its, tau {c.tau_had:g}/{c.tau_sl:g}/{c.tau_sd:g})")
        elif self.method == "dskd":
            d = self.dskd
            return (f"{1 - d['kd_rate']:g} x ce + {d['kd_rate']:g} x DSKD-CMA (T {d['temperature']:g}, "
                    f"projector lr {d['projector_lr']:g})")
        return " + ".join(parts)
