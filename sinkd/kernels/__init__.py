"""Triton kernels for the L1 cost and its gradient (GPU, or CPU through TRITON_INTERPRET=1).

Triton is imported only when a kernel is first used, so ``import sinkd`` works without it.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """True when the triton package can be imported (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable_on(tensor) -> bool:
    """Whether the Triton kernels can run on this tensor's device: CUDA with triton, or the interpreter on CPU."""
    if not triton_available():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


def l1_cost(x, y, **blocks):
    """C[b, i, j] = sum_v |x[b, i, v] - y[b, j, v]| in fp32 for (B, n, d) and (B, m, d) inputs."""
    from . import l1

    return l1.l1_cost(x, y, **blocks)


def l1_grad(x, y, weights, side: str, **blocks):
    """side "x": sum_j W[b, i, j] sign(x_i - y_j); side "y": -sum_i W[b, i, j] sign(x_i - y_j)."""
    from . import l1

    return l1.l1_grad(x, y, weights, side, **blocks)


def softmax_l1_cost(zs, zt, temperature: float = 1.0):
    """L1 cost between softmax(zs / T) and softmax(zt / T) from the logits, storing no probabilities."""
    from . import softmax_l1

    return softmax_l1.softmax_l1_cost(zs, zt, temperature)


__all__ = ["interpreting", "l1_cost", "l1_grad", "softmax_l1_cost", "triton_available", "usable_on"]
