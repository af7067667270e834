r"""Online teacher modules (OKD, Rao et al., arXiv 2409.12512): a small trainable block inside a frozen
teacher, trained with the student so that the distribution the student distils from adapts to it.

The block is a zero-initialised bottleneck on the residual stream of one teacher layer,

.. math::

    h' = h + U\, \mathrm{gelu}(D\, \mathrm{rmsnorm}(h)),\qquad D \in \mathbb{R}^{r \times d},\ U = 0 \in \mathbb{R}^{d \times r},

so at step 0 the adapted teacher is the teacher, bit for bit. Only the block trains, on

.. math::

    \mathcal{L}_{\mathrm{module}} = w_{ce}\, \mathrm{CE}(z_t', y)
        + w_{s}\, T^2\, \mathrm{KL}\big(\mathrm{sg}(p_s^{T}) \,\|\, p_t'^{T}\big),

the adapted teacher's cross-entropy on the data (it keeps the teacher a good model of the text) and
a pull toward the detached student (the "adapt to the student's distribution" of the paper's
abstract; the paper's own loss was not available, docs/online_teacher.md). The student distils from
the *detached* adapted logits, so neither loss trains the other model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAdapter(nn.Module):
    """h -> h + up(gelu(down(rmsnorm(h)))), up zero-initialised (the identity at step 0).

    Parameters
    ----------
    dim : int
        Width d of the hidden states it adapts.
    rank : int
        Bottleneck width r: 2 d r + d parameters.

    Examples
    --------
    >>> import torch
    >>> from sinkd.online import ResidualAdapter
    >>> block = ResidualAdapter(8, rank=2)
    >>> h = torch.randn(3, 5, 8)
    >>> bool(torch.equal(block(h), h))  # zero-initialised: exact identity
    True
    """

    def __init__(self, dim: int, rank: int):
        super().__init__()
        if rank < 1 or dim < 1:
            raise ValueError(f"ResidualAdapter: dim and rank must be >= 1, got dim={dim}, rank={rank}")
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.norm(hidden.to(self.down.weight.dtype))
        return hidden + self.up(F.gelu(self.down(x))).to(hidden.dtype)


def module_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                ce_weight: float = 1.0, student_weight: float = 1.0, temperature: float = 1.0,
                ignore_index: int = -100) -> torch.Tensor:
    r"""The online modules' loss (module docstring): CE of the adapted teacher on the labels plus
    ``student_weight`` :math:`T^2\,\mathrm{KL}(\mathrm{sg}(p_s) \| p_t')`, both means over the rows
    whose label is not ``ignore_index``.

    Parameters
    ----------
    teacher_logits : Tensor, shape (..., V)
        The adapted teacher's logits, with grad (into the modules).
    student_logits : Tensor, shape (..., V)
        The student's logits (detached here: this loss never trains the student).
    labels : Tensor, shape (...)
        Next-token ids.

    Returns
    -------
    Tensor, shape ()
        0 (with grad) when every label is ignored.

    Examples
    --------
    >>> import torch
    >>> from sinkd.online import module_loss
    >>> t = torch.zeros(2, 4, requires_grad=True)
    >>> loss = module_loss(t, torch.zeros(2, 4), torch.tensor([0, 1]), student_weight=1.0)
    >>> round(loss.item(), 4)  # log 4: uniform teacher, and no KL to a uniform student
    1.3863
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.shape[:-1] != labels.shape:
        raise ValueError(f"module_loss: teacher {tuple(teacher_logits.shape)}, student {tuple(student_logits.shape)} "
                         f"and labels {tuple(labels.shape)} must agree")
    if temperature <= 0:
        raise ValueError(f"module_loss: temperature must be > 0, got {temperature}")
    keep = labels != ignore_index
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)  # half inputs computed in fp32
    t, s, y = teacher_logits[keep].to(dtype), student_logits[keep].detach().to(dtype), labels[keep]
    if y.numel() == 0:
        return teacher_logits.sum() * 0.0
    loss = t.new_zeros(())
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(t, y)
    if student_weight:
        log_s = torch.log_softmax(s / temperature, -1)
        log_t = torch.log_softmax(t / temperature, -1)
        loss = loss + student_weight * temperature ** 2 * (log_s.exp() * (log_s - log_t)).sum(-1).mean()
    return loss
