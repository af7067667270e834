"""Triton kernels: pairwise L1 cost and its two gradients, tiled over rows and vocabulary.

Forward: each program owns a (BLOCK_N x BLOCK_M) tile of C and walks the vocabulary BLOCK_D columns
at a time, accumulating |x - y| in a (BLOCK_N, BLOCK_M, BLOCK_D) fp32 register tile that is reduced
once at the end (no cross-lane reduction inside the loop).
Backward: out[a, v] = sum_b W[a, b] * sign(A[a, v] - B[b, v]); each program owns a (BLOCK_A x BLOCK_D)
tile of the output and walks the other side BLOCK_B rows at a time. With A = x, B = y, W = G it is
dC/dx; with A = y, B = x, W = G^T (strides swapped) it is dC/dy, since sign(y - x) = -sign(x - y).
Nothing of size N x M x V exists at any time; memory is the inputs, C and the gradients.
Inputs may be fp32, bf16 or fp16; accumulation is fp32; C is fp32, gradients take the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

# Interpreter (CPU) defaults: small tiles keep numpy's broadcasts cheap; tests override them.
INTERPRET_COST_BLOCKS = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16}
INTERPRET_GRAD_BLOCKS = {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": 16}


@triton.jit
def _l1_cost_kernel(
    x_ptr, y_ptr, c_ptr, n, m, d, size_class,
    sxb, sxn, sxd, syb, sym, syd, scb, scn, scm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    # 64-bit row offsets: N * V passes 2^31 at N=16k of a 152k vocabulary.
    x_rows = x_ptr + b * sxb + rn.to(tl.int64)[:, None] * sxn
    y_rows = y_ptr + b * syb + rm.to(tl.int64)[:, None] * sym
    n_ok = rn[:, None] < n
    m_ok = rm[:, None] < m
    acc = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + rd
        d_ok = cols[None, :] < d
        # Masked entries load as 0 on both sides: |0 - 0| adds nothing.
        xt = tl.load(x_rows + cols[None, :] * sxd, mask=n_ok & d_ok, other=0.0).to(tl.float32)
        yt = tl.load(y_rows + cols[None, :] * syd, mask=m_ok & d_ok, other=0.0).to(tl.float32)
        acc += tl.abs(xt[:, None, :] - yt[None, :, :])
    cost = tl.sum(acc, axis=2)
    c_ptrs = c_ptr + b * scb + rn.to(tl.int64)[:, None] * scn + rm.to(tl.int64)[None, :] * scm
    tl.store(c_ptrs, cost, mask=n_ok & (rm[None, :] < m))


@triton.jit
def _l1_grad_kernel(
    a_ptr, b_ptr, w_ptr, o_ptr, na, nb, d, size_class,
    sab, san, sad, sbb, sbn, sbd, swb, swa, sww, sob, son, sod,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_a = tl.program_id(0)
    pid_d = tl.program_id(1)
    bat = tl.program_id(2).to(tl.int64)
    ra = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    rb = tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    a_ok = ra[:, None] < na
    d_ok = cols[None, :] < d
    at = tl.load(a_ptr + bat * sab + ra.to(tl.int64)[:, None] * san + cols[None, :] * sad,
                 mask=a_ok & d_ok, other=0.0).to(tl.float32)
    w_rows = w_ptr + bat * swb + ra.to(tl.int64)[:, None] * swa
    acc = tl.zeros((BLOCK_A, BLOCK_B, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, nb, BLOCK_B):
        rows = b0 + rb
        b_ok = rows < nb
        # Padded rows of B get weight 0, so whatever sign they give adds nothing.
        wt = tl.load(w_rows + rows.to(tl.int64)[None, :] * sww, mask=a_ok & b_ok[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + bat * sbb + rows.to(tl.int64)[:, None] * sbn + cols[None, :] * sbd,
                     mask=b_ok[:, None] & d_ok, other=0.0).to(tl.float32)
        diff = at[:, None, :] - bt[None, :, :]
        w3 = wt[:, :, None]
        acc += tl.where(diff > 0, w3, 0.0) - tl.where(diff < 0, w3, 0.0)
    grad = tl.sum(acc, axis=1)
    o_ptrs = o_ptr + bat * sob + ra.to(tl.int64)[:, None] * son + cols[None, :] * sod
    tl.store(o_ptrs, grad.to(o_ptr.dtype.element_ty), mask=a_ok & d_ok)


def _configs(names, shapes):
    return [triton.Config(dict(zip(names, s[:3])), num_warps=s[3]) for s in shapes]


# GPU: a few tile shapes, chosen per size class on first use (autotuning overwrites the output
# completely on each trial, so no reset is needed).
_COST_TUNED = triton.autotune(
    configs=_configs(("BLOCK_N", "BLOCK_M", "BLOCK_D"),
                     [(32, 32, 8, 4), (64, 32, 8, 4), (64, 64, 4, 4), (64, 64, 8, 8), (32, 32, 16, 4), (128, 64, 4, 8)]),
    key=["size_class"],
)(_l1_cost_kernel)
_GRAD_TUNED = triton.autotune(
    configs=_configs(("BLOCK_A", "BLOCK_B", "BLOCK_D"),
                     [(32, 8, 32, 4), (64, 8, 32, 4), (32, 8, 64, 4), (64, 4, 64, 8), (32, 16, 32, 4), (64, 8, 64, 8)]),
    key=["size_class"],
)(_l1_grad_kernel)


def _size_class(*sizes: int) -> int:
    """Autotuning key: one tuning per power-of-two bucket of each size, not per exact shape."""
    return sum(max(s, 1).bit_length() << (6 * k) for k, s in enumerate(sizes))


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"l1 kernels: x {tuple(x.shape)} and y {tuple(y.shape)} must be (B, n, d) and (B, m, d)")
    if x.device != y.device:
        raise ValueError(f"l1 kernels: x on {x.device} and y on {y.device}")
    if not (x.is_cuda or interpreting()):
        raise ValueError("l1 kernels: tensors must be on CUDA (or TRITON_INTERPRET=1 set before triton is imported)")


def l1_cost(x: torch.Tensor, y: torch.Tensor, **blocks) -> torch.Tensor:
    """fp32 (B, n, m) cost. blocks: BLOCK_N/BLOCK_M/BLOCK_D (and num_warps) to bypass autotuning."""
    _check(x, y)
    batch, n, d = x.shape
    m = y.shape[1]
    cost = torch.empty(batch, n, m, dtype=torch.float32, device=x.device)
    if n == 0 or m == 0:
        return cost
    args = (x, y, cost, n, m, d, _size_class(n, m, d), *x.stride(), *y.stride(), *cost.stride())
    if blocks or interpreting():
        meta = {**INTERPRET_COST_BLOCKS, **blocks}
        grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), batch)
        _l1_cost_kernel[grid](*args, **meta)
    else:
        _COST_TUNED[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), batch)](*args)
    return cost


def l1_grad(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, side: str, **blocks) -> torch.Tensor:
    """Gradient of sum(W * C) wrt x (side "x", shape of x) or y (side "y"), in the input's dtype."""
    _check(x, y)
    if side not in ("x", "y"):
        raise ValueError(f"l1_grad: side must be 'x' or 'y', got {side!r}")
    batch, n, d = x.shape
    m = y.shape[1]
    if tuple(weights.shape) != (batch, n, m):
        raise ValueError(f"l1_grad: weights {tuple(weights.shape)} must be {(batch, n, m)}")
    swb, swn, swm = weights.stride()
    if side == "x":
        a, b, w_strides = x, y, (swb, swn, swm)
    else:
        a, b, w_strides = y, x, (swb, swm, swn)  # W^T through its strides: no copy
    out = torch.empty_like(a, memory_format=torch.contiguous_format)
    na, nb = a.shape[1], b.shape[1]
    if na == 0 or d == 0:
        return out
    if nb == 0:
        return out.zero_()
    args = (a, b, weights, out, na, nb, d, _size_class(na, nb, d), *a.stride(), *b.stride(), *w_strides, *out.stride())
    if blocks or interpreting():
        meta = {**INTERPRET_GRAD_BLOCKS, **blocks}
        grid = (triton.cdiv(na, meta["BLOCK_A"]), triton.cdiv(d, meta["BLOCK_D"]), batch)
        _l1_grad_kernel[grid](*args, **meta)
    else:
        _GRAD_TUNED[lambda meta: (triton.cdiv(na, meta["BLOCK_A"]), triton.cdiv(d, meta["BLOCK_D"]), batch)](*args)
    return out
