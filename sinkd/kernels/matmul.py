"""x y^T on tensor cores with fp32 accuracy: each fp32 operand split into two bf16 halves.

x = x_hi + x_lo with x_hi = bf16(x), x_lo = bf16(x - x_hi) keeps ~16 of fp32's 24 mantissa bits;
x y^T ~ x_hi y_hi^T + x_hi y_lo^T + x_lo y_hi^T (the dropped lo*lo term is ~2^-16 relative).
Products of bf16 numbers are exact in fp32 and the sums accumulate in fp32, so the result is
within ~1e-5 of |x||y| at three bf16 tensor-core matmuls instead of one fp32 CUDA-core matmul
(H100: ~990 vs ~60 TFLOP/s). bf16/fp16 inputs take one product with an fp32 result. The backward
uses the same split products, so gradients keep that accuracy too. Pure PyTorch, no Triton.
"""

from __future__ import annotations

import torch

HALF = (torch.bfloat16, torch.float16)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, n, k) @ (B, k, m) of bf16/fp16 operands with an fp32 result. CUDA: tensor cores with fp32
    output where torch has `out_dtype`; elsewhere an fp32 product of the (exactly) widened operands."""
    if a.is_cuda:
        try:
            return torch.bmm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.bmm(a.float(), b.float())


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 3-D operands: one half-precision product, or three split products for fp32."""
    if a.dtype in HALF and b.dtype == a.dtype:
        return _mm_f32(a, b)
    a_hi, a_lo = _split(a.float())
    b_hi, b_lo = _split(b.float())
    return _mm_f32(a_hi, b_hi) + (_mm_f32(a_hi, b_lo) + _mm_f32(a_lo, b_hi))


class SplitMatmul(torch.autograd.Function):
    """x (B, n, k), y (B, m, k) -> x y^T (B, n, m) in fp32; gradients in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return _product(x, y.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        grad = grad.float()
        gx = _product(grad, y.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
        gy = _product(grad.transpose(1, 2), x.float()).to(y.dtype) if ctx.needs_input_grad[1] else None
        return gx, gy


def split_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (..., n, k) times y (..., m, k) transposed, as fp32, on tensor cores where available."""
    lead = x.shape[:-2]
    out = SplitMatmul.apply(x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]))
    return out.reshape(*lead, x.shape[-2], y.shape[-2])
