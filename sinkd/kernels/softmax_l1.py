"""L1 cost between softmax(z_s / T) and softmax(z_t / T) straight from the logits.

The library's usual path stores p_s and p_t (two N x V tensors) for the backward and then
allocates dC/dp_s and dC/dz_s (two more). Here only the row logsumexps (O(N)) are kept; the Triton
kernels rebuild probabilities tile by tile from the logits, the backward writes dC/dp_s into one
N x V fp32 buffer and turns it into dC/dz_s in place, row block by row block:
    dz[i] = p[i] * (dp[i] - <p[i], dp[i]>) / T.
Extra memory over the logits: that one buffer (4*N*V bytes, the gradient itself) + O(N^2) + one
block of rows. Needs triton (CUDA, or CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from .._checks import check_positive
from . import l1

ROW_BLOCK_ELEMENTS = 1 << 24  # entries of one (rows, V) temporary in the row-block loops (64 MiB fp32)


def row_logsumexp(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """logsumexp(z / T) over the last dim of (B, n, V) logits, fp32, in blocks of rows."""
    batch, n, vocab = z.shape
    out = torch.empty(batch, n, dtype=torch.float32, device=z.device)
    step = max(1, ROW_BLOCK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for i0 in range(0, n, step):
            out[b, i0 : i0 + step] = torch.logsumexp(z[b, i0 : i0 + step].float() / temperature, dim=-1)
    return out


def _softmax_backward_(grad_p: torch.Tensor, z: torch.Tensor, lse: torch.Tensor, temperature: float) -> torch.Tensor:
    """In place: grad_p (B, n, V) fp32 wrt p = softmax(z / T) becomes the gradient wrt z."""
    batch, n, vocab = z.shape
    step = max(1, ROW_BLOCK_ELEMENTS // max(vocab, 1))
    for b in range(batch):
        for i0 in range(0, n, step):
            g = grad_p[b, i0 : i0 + step]
            p = torch.exp(z[b, i0 : i0 + step].float() / temperature - lse[b, i0 : i0 + step, None])
            dot = torch.linalg.vecdot(p, g)
            g.sub_(dot[:, None]).mul_(p).div_(temperature)
    return grad_p


class SoftmaxL1(torch.autograd.Function):
    """C[b, i, j] = |softmax(zs[b, i] / T) - softmax(zt[b, j] / T)|_1, fp32, for (B, n, V), (B, m, V) logits."""

    @staticmethod
    def forward(ctx, zs, zt, temperature):
        lse_s, lse_t = row_logsumexp(zs, temperature), row_logsumexp(zt, temperature)
        ctx.save_for_backward(zs, zt, lse_s, lse_t)
        ctx.temperature = temperature
        return l1.l1_cost(zs, zt, lse_x=lse_s, lse_y=lse_t, temperature=temperature)

    @staticmethod
    def backward(ctx, grad_cost):
        zs, zt, lse_s, lse_t = ctx.saved_tensors
        temp = ctx.temperature
        out = []
        for side, z, lse in (("x", zs, lse_s), ("y", zt, lse_t)):
            if not ctx.needs_input_grad[len(out)]:
                out.append(None)
                continue
            g = l1.l1_grad(zs, zt, grad_cost, side, lse_x=lse_s, lse_y=lse_t, temperature=temp, out_dtype=torch.float32)
            g = _softmax_backward_(g, z, lse, temp)
            out.append(g if z.dtype == torch.float32 else g.to(z.dtype))
        return out[0], out[1], None


def softmax_l1_cost(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Pairwise L1 cost (..., n, m) between the tempered softmaxes of logits zs (..., n, V) and zt (..., m, V)."""
    temperature = check_positive("temperature", temperature)
    if zs.shape[-1] != zt.shape[-1] or zs.shape[:-2] != zt.shape[:-2]:
        raise ValueError(f"softmax_l1_cost: zs {tuple(zs.shape)} and zt {tuple(zt.shape)} must share batch and vocabulary sizes")
    lead = zs.shape[:-2]
    cost = SoftmaxL1.apply(zs.reshape(-1, *zs.shape[-2:]), zt.reshape(-1, *zt.shape[-2:]), float(temperature))
    return cost.reshape(*lead, zs.shape[-2], zt.shape[-2])
