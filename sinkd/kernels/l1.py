"""Triton kernels: pairwise L1 cost and its two gradients, tiled over rows and vocabulary.

Forward: each program owns a (BLOCK_N x BLOCK_M) tile of C and walks the vocabulary BLOCK_D columns
at a time, accumulating |x - y| in a (BLOCK_N, BLOCK_M, BLOCK_D) fp32 register tile that is reduced
once at the end (no cross-lane reduction inside the loop).
Backward: out[a, v] = sum_b W[a, b] * sign(A[a, v] - B[b, v]); each program owns a (BLOCK_A x BLOCK_D)
tile of the output and walks the other side BLOCK_B rows at a time. With A = x, B = y, W = G it is
dC/dx; with A = y, B = x, W = G^T (strides swapped) it is dC/dy, since sign(y - x) = -sign(x - y).
Nothing of size N x M x V exists at any time; memory is the inputs, C and the gradients.
Inputs may be fp32, bf16 or fp16; accumulation is fp32; C is fp32, gradients take the input dtype.
LOGITS mode: the inputs are logits z and the rows' logsumexp(z / T); each tile is turned into
probabilities exp(z / T - lse) as it is loaded, so softmax outputs are never stored (see softmax_l1);
the backward then takes the sign bit of A - B (ties count as +1, not 0), one instruction fewer per
element than compare-and-select, which the softmax backward makes harmless (see the kernel).
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from . import interpreting

# Interpreter (CPU) defaults: small tiles keep numpy's broadcasts cheap; tests override them.
INTERPRET_COST_BLOCKS = {"BLOCK_N": 16, "BLOCK_M": 16, "BLOCK_D": 16}
INTERPRET_GRAD_BLOCKS = {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": 16}


@triton.jit
def _l1_cost_kernel(
    x_ptr, y_ptr, c_ptr, lx_ptr, ly_ptr, inv_t, n, m, d, size_class,
    sxb, sxn, sxd, syb, sym, syd, scb, scn, scm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, LOGITS: tl.constexpr,
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
    if LOGITS:  # row logsumexp of z / T, (B, rows) contiguous
        lse_x = tl.load(lx_ptr + b * n + rn, mask=rn < n, other=0.0)[:, None]
        lse_y = tl.load(ly_ptr + b * m + rm, mask=rm < m, other=0.0)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + rd
        d_ok = cols[None, :] < d
        # Masked entries load as 0 on both sides: |0 - 0| adds nothing.
        xt = tl.load(x_rows + cols[None, :] * sxd, mask=n_ok & d_ok, other=0.0).to(tl.float32)
        yt = tl.load(y_rows + cols[None, :] * syd, mask=m_ok & d_ok, other=0.0).to(tl.float32)
        if LOGITS:
            xt = tl.where(n_ok & d_ok, tl.exp(xt * inv_t - lse_x), 0.0)
            yt = tl.where(m_ok & d_ok, tl.exp(yt * inv_t - lse_y), 0.0)
        acc += tl.abs(xt[:, None, :] - yt[None, :, :])
    cost = tl.sum(acc, axis=2)
    c_ptrs = c_ptr + b * scb + rn.to(tl.int64)[:, None] * scn + rm.to(tl.int64)[None, :] * scm
    tl.store(c_ptrs, cost, mask=n_ok & (rm[None, :] < m))


@triton.jit
def _l1_grad_kernel(
    a_ptr, b_ptr, w_ptr, o_ptr, la_ptr, lb_ptr, inv_t, na, nb, d, size_class,
    sab, san, sad, sbb, sbn, sbd, swb, swa, sww, sob, son, sod,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, LOGITS: tl.constexpr,
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
    if LOGITS:
        lse_a = tl.load(la_ptr + bat * na + ra, mask=ra < na, other=0.0)[:, None]
        at = tl.where(a_ok & d_ok, tl.exp(at * inv_t - lse_a), 0.0)
    w_rows = w_ptr + bat * swb + ra.to(tl.int64)[:, None] * swa
    acc = tl.zeros((BLOCK_A, BLOCK_B, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, nb, BLOCK_B):
        rows = b0 + rb
        b_ok = rows < nb
        # Padded rows of B get weight 0, so whatever sign they give adds nothing.
        wt = tl.load(w_rows + rows.to(tl.int64)[None, :] * sww, mask=a_ok & b_ok[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + bat * sbb + rows.to(tl.int64)[:, None] * sbn + cols[None, :] * sbd,
                     mask=b_ok[:, None] & d_ok, other=0.0).to(tl.float32)
        if LOGITS:
            lse_b = tl.load(lb_ptr + bat * nb + rows, mask=b_ok, other=0.0)[:, None]
            bt = tl.where(b_ok[:, None] & d_ok, tl.exp(bt * inv_t - lse_b), 0.0)
        a3 = at[:, None, :]
        b3 = bt[None, :, :]
        if LOGITS:
            # w with the sign bit of a - b (a subtract, one LOP3, an add): ties give +w instead of 0. Only
            # the softmax backward reads this gradient: at p = 0 (the common tie, underflow) it is
            # multiplied by p, and exact ties at p > 0 (a whole row equal: a constant the softmax
            # backward removes) differ by one subgradient choice of |t| at 0.
            sign = (a3 - b3).to(tl.int32, bitcast=True) & -2147483648
            acc += (wt[:, :, None].to(tl.int32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
        else:
            # +w, -w or 0 (ties, as cdist's backward): two compares and two selects, -w shared across BLOCK_D.
            acc += tl.where(a3 > b3, wt[:, :, None], tl.where(a3 < b3, -wt[:, :, None], 0.0))
    grad = tl.sum(acc, axis=1)
    o_ptrs = o_ptr + bat * sob + ra.to(tl.int64)[:, None] * son + cols[None, :] * sod
    tl.store(o_ptrs, grad.to(o_ptr.dtype.element_ty), mask=a_ok & d_ok)


# GPU tile shapes (BLOCK_N/A, BLOCK_M/B, BLOCK_D, num_warps); the fastest per size class is picked on
# first use by timing each once on a clipped copy of the problem (rows, columns and vocabulary cut to
# TUNE_CLIP), which costs a fraction of a second where Triton's autotuner would re-run the full
# N=8192 x V=152k problem several times per shape.
COST_CONFIGS = [(32, 32, 8, 4), (64, 32, 8, 4), (64, 64, 4, 4), (64, 64, 8, 8), (32, 32, 16, 4), (128, 64, 4, 8)]
# Grad tiles hold at most 64 accumulator entries per thread: bigger ones spill registers (ptxas, sm_90).
GRAD_CONFIGS = [(32, 8, 32, 4), (32, 8, 64, 8), (32, 4, 64, 4), (16, 16, 32, 4), (16, 8, 64, 4), (32, 16, 32, 8)]
TUNE_CLIP = (1024, 1024, 16384)
TUNE_IN_INTERPRETER = False  # tests switch this on to run the picking code on CPU
_BEST: dict = {}


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(launch) -> float:
    _sync()
    start = time.perf_counter()
    launch()
    _sync()
    return time.perf_counter() - start


def _pick(key, configs, launch_clipped):
    """The config of `configs` with the shortest clipped run (one warm-up launch each, compiles)."""
    if key not in _BEST:
        timings = []
        for cfg in configs:
            launch_clipped(cfg)
            timings.append((_timed(lambda: launch_clipped(cfg)), cfg))
        _BEST[key] = min(timings)[1]
    return _BEST[key]


def _size_class(*sizes: int) -> int:
    """Tile-picking key: one pick per power-of-two bucket of each size, not per exact shape."""
    return sum(max(s, 1).bit_length() << (6 * k) for k, s in enumerate(sizes))


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"l1 kernels: x {tuple(x.shape)} and y {tuple(y.shape)} must be (B, n, d) and (B, m, d)")
    if x.device != y.device:
        raise ValueError(f"l1 kernels: x on {x.device} and y on {y.device}")
    if not (x.is_cuda or interpreting()):
        raise ValueError("l1 kernels: tensors must be on CUDA (or TRITON_INTERPRET=1 set before triton is imported)")


def _logit_args(lse_a, lse_b, a, b, temperature):
    """(lse_a, lse_b, 1/T, LOGITS) kernel arguments; dummies (never read) without logsumexps."""
    if lse_a is None:
        return a, b, 1.0, False
    for name, lse, t in (("lse_x", lse_a, a), ("lse_y", lse_b, b)):
        if lse is None or tuple(lse.shape) != tuple(t.shape[:2]) or lse.dtype != torch.float32 or not lse.is_contiguous():
            raise ValueError(f"l1 kernels: {name} must be a contiguous fp32 tensor of shape {tuple(t.shape[:2])}")
    return lse_a, lse_b, 1.0 / temperature, True


def l1_cost(x: torch.Tensor, y: torch.Tensor, lse_x=None, lse_y=None, temperature: float = 1.0, **blocks) -> torch.Tensor:
    """fp32 (B, n, m) cost. blocks: BLOCK_N/BLOCK_M/BLOCK_D (and num_warps) to bypass tile picking.
    lse_x, lse_y: row logsumexp(z / temperature) (B, rows) when x, y are logits (LOGITS mode)."""
    _check(x, y)
    lx, ly, inv_t, logits = _logit_args(lse_x, lse_y, x, y, temperature)
    batch, n, d = x.shape
    m = y.shape[1]
    cost = torch.empty(batch, n, m, dtype=torch.float32, device=x.device)
    if n == 0 or m == 0:
        return cost
    args = (x, y, cost, lx, ly, inv_t, n, m, d, _size_class(n, m, d), *x.stride(), *y.stride(), *cost.stride())

    def launch(a, meta):  # a: the argument tuple, (x, y, cost, lx, ly, inv_t, n, m, d, ...)
        grid = (triton.cdiv(a[6], meta["BLOCK_N"]), triton.cdiv(a[7], meta["BLOCK_M"]), a[2].shape[0])
        _l1_cost_kernel[grid](*a, LOGITS=logits, enable_fp_fusion=True, **meta)  # explicit: Triton 3.9 warns when unset

    if blocks or (interpreting() and not TUNE_IN_INTERPRETER):
        launch(args, {**INTERPRET_COST_BLOCKS, **blocks})
        return cost
    cn, cm, cd = min(n, TUNE_CLIP[0]), min(m, TUNE_CLIP[1]), min(d, TUNE_CLIP[2])
    clipped = (x[:1, :cn, :cd], y[:1, :cm, :cd], cost[:1, :cn, :cm], lx[:1, :cn] if logits else lx, ly[:1, :cm] if logits else ly,
               inv_t, cn, cm, cd, args[9], *x.stride(), *y.stride(), *cost.stride())
    best = _pick(("cost", args[9], x.dtype, logits), COST_CONFIGS,
                 lambda c: launch(clipped, {"BLOCK_N": c[0], "BLOCK_M": c[1], "BLOCK_D": c[2], "num_warps": c[3]}))
    launch(args, {"BLOCK_N": best[0], "BLOCK_M": best[1], "BLOCK_D": best[2], "num_warps": best[3]})
    return cost


def l1_grad(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, side: str, lse_x=None, lse_y=None,
            temperature: float = 1.0, out_dtype=None, **blocks) -> torch.Tensor:
    """Gradient of sum(W * C) wrt x (side "x", shape of x) or y (side "y"), in out_dtype (default: the
    input's). In LOGITS mode (lse_x, lse_y given) it is the gradient wrt the probabilities, not z, with
    ties counted as sign +1: meant to be read through the softmax backward only (SoftmaxL1)."""
    _check(x, y)
    if side not in ("x", "y"):
        raise ValueError(f"l1_grad: side must be 'x' or 'y', got {side!r}")
    batch, n, d = x.shape
    m = y.shape[1]
    if tuple(weights.shape) != (batch, n, m):
        raise ValueError(f"l1_grad: weights {tuple(weights.shape)} must be {(batch, n, m)}")
    swb, swn, swm = weights.stride()
    if side == "x":
        a, b, w_strides, la, lb = x, y, (swb, swn, swm), lse_x, lse_y
    else:
        a, b, w_strides, la, lb = y, x, (swb, swm, swn), lse_y, lse_x  # W^T through its strides: no copy
    la, lb, inv_t, logits = _logit_args(la, lb, a, b, temperature)
    out = torch.empty(a.shape, dtype=out_dtype or a.dtype, device=a.device)
    na, nb = a.shape[1], b.shape[1]
    if na == 0 or d == 0:
        return out
    if nb == 0:
        return out.zero_()
    args = (a, b, weights, out, la, lb, inv_t, na, nb, d, _size_class(na, nb, d),
            *a.stride(), *b.stride(), *w_strides, *out.stride())

    def launch(g, meta):  # g: the argument tuple, (a, b, w, out, la, lb, inv_t, na, nb, d, ...)
        grid = (triton.cdiv(g[7], meta["BLOCK_A"]), triton.cdiv(g[9], meta["BLOCK_D"]), g[3].shape[0])
        _l1_grad_kernel[grid](*g, LOGITS=logits, enable_fp_fusion=True, **meta)

    if blocks or (interpreting() and not TUNE_IN_INTERPRETER):
        launch(args, {**INTERPRET_GRAD_BLOCKS, **blocks})
        return out
    ca, cb, cd = min(na, TUNE_CLIP[0]), min(nb, TUNE_CLIP[1]), min(d, TUNE_CLIP[2])
    clipped = (a[:1, :ca, :cd], b[:1, :cb, :cd], weights[:1], out[:1, :ca, :cd], la[:1, :ca] if logits else la,
               lb[:1, :cb] if logits else lb, inv_t, ca, cb, cd, args[10], *a.stride(), *b.stride(), *w_strides, *out.stride())
    best = _pick(("grad", args[10], a.dtype, logits), GRAD_CONFIGS,
                 lambda c: launch(clipped, {"BLOCK_A": c[0], "BLOCK_B": c[1], "BLOCK_D": c[2], "num_warps": c[3]}))
    launch(args, {"BLOCK_A": best[0], "BLOCK_B": best[1], "BLOCK_D": best[2], "num_warps": best[3]})
    return out
