r"""DSKD with cross-model attention (Zhang et al., EMNLP 2024, arXiv 2406.17328): a teacher and a student
with different vocabularies distil in both models' spaces through trainable projectors.

For a block with student tokens j (input x_j, target y_j, last hidden h_j, d_s wide) and teacher
tokens i (x'_i, y'_i, h'_i, d_t wide), E / E' the embeddings, W / W' the LM heads (read, not trained
here), and sigma(.) the std over a tensor's real rows:

    q_j = query([E x_j ; E y_j])                          (2 d_s -> 2 d_t, trained)
    k_i = [E' x'_i ; E' y'_i] / sigma                    (the teacher's index, fixed)
    A   = softmax_i(q_j . k_i / sqrt(2 d_t))               (each student token attends to the teacher's)
    t2s_logits_j = W (sum_i A_ji t2s(h'_i / sigma + E' y'_i / sigma))     (d_t -> d_s, trained)
    s2t_logits_i = W' (sum_j A^T_ij s2t(h_j))              (softmax over j of the same scores; d_s -> d_t)

    KD = t2s_CE + t2s_KD + s2t_KD,   each a sum over tokens divided by the student's token count:
      t2s_CE = CE(t2s_logits_j, y_j)                                 (trains query and t2s)
      t2s_KD = KL(softmax(t2s_logits_j / (T tau)) || softmax(z_j / T))  on the tokens whose t2s argmax is y_j
      s2t_KD = KL(softmax(z'_i / T) || softmax(s2t_logits_i / T))     (trains s2t and the student)
    loss = (1 - kd_rate) * CE + kd_rate * KD

z / z' the student's / teacher's logits, T the KD temperature, tau the teacher temperature. Defaults
are the official scripts' (scripts/gpt2/dskd_cma_gpt2_base.sh: kd_rate 0.5, T 2.0, forward KL,
projector lr 1e-3; configs/projector_config.json: one Linear each). Where this differs from the
official criterion (criterions/dual_space_kd_with_cross_model_attention.py): the std's are taken over
real rows only (the official code includes padding), and masked scores are -inf (the official code
subtracts 1e5): padding does not move the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = {"kd_rate": 0.5, "temperature": 2.0, "teacher_temperature": 1.0, "projector_lr": 1e-3}


class CMAProjectors(nn.Module):
    """DSKD's trainable maps: query (2 d_s -> 2 d_t), t2s (d_t -> d_s), s2t (d_s -> d_t)."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.query = nn.Linear(2 * student_dim, 2 * teacher_dim)
        self.t2s = nn.Linear(teacher_dim, student_dim)
        self.s2t = nn.Linear(student_dim, teacher_dim)


@dataclass
class Side:
    """One model's view of a batch: rows predict the next token of that model's own sequence.

    logits (B, T, V), hidden (B, T, d) last hidden state, inputs / targets (B, T) ids, mask (B, T) bool,
    embedding (V, d), head (V, d)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    embedding: torch.Tensor
    head: torch.Tensor


def _real_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x[mask].std()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per row (..., V) -> (...)."""
    log_p = torch.log_softmax(p_logits, -1)
    return (log_p.exp() * (log_p - torch.log_softmax(q_logits, -1))).sum(-1)


def dskd_cma_terms(projectors: CMAProjectors, s: Side, t: Side, temperature: float = 2.0,
                   teacher_temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The three KD terms (module docstring), each a sum over tokens / the student's real tokens."""
    n_s = s.mask.sum().clamp_min(1)
    with torch.no_grad():
        s_index = torch.cat([F.embedding(s.inputs, s.embedding), F.embedding(s.targets, s.embedding)], -1)
        t_index = torch.cat([F.embedding(t.inputs, t.embedding), F.embedding(t.targets, t.embedding)], -1)
        t_target = F.embedding(t.targets, t.embedding)
        keys = t_index / _real_std(t_index, t.mask)
        t_values_in = t.hidden / _real_std(t.hidden, t.mask) + t_target / _real_std(t_target, t.mask)
    query = projectors.query(s_index)  # (B, T_s, 2 d_t)
    scores = query @ keys.transpose(-1, -2) / math.sqrt(keys.shape[-1])  # (B, T_s, T_t)
    pair = s.mask[:, :, None] & t.mask[:, None, :]
    scores = scores.masked_fill(~pair, -math.inf)
    # Rows / columns of padding have no real partner: their softmax is set to 0, not NaN.
    t2s_weight = torch.softmax(scores, -1).nan_to_num(0.0)
    s2t_weight = torch.softmax(scores.transpose(-1, -2), -1).nan_to_num(0.0)
    t2s_logits = (t2s_weight @ projectors.t2s(t_values_in)) @ s.head.detach().T  # (B, T_s, V_s)
    s2t_logits = (s2t_weight @ projectors.s2t(s.hidden)) @ t.head.detach().T  # (B, T_t, V_t)
    ce = F.cross_entropy(t2s_logits[s.mask], s.targets[s.mask], reduction="sum")
    correct = s.mask & (t2s_logits.argmax(-1) == s.targets)
    t2s_kd = _kl(t2s_logits.detach()[correct] / (temperature * teacher_temperature), s.logits[correct] / temperature).sum()
    s2t_kd = _kl(t.logits[t.mask].detach() / temperature, s2t_logits[t.mask] / temperature).sum()
    return {"t2s_ce": ce / n_s, "t2s_kd": t2s_kd / n_s, "s2t_kd": s2t_kd / n_s}
