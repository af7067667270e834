"""Cost matrices between two sets of rows, chosen by name.

The L1 cost (the paper's) goes through :class:`TritonL1` on CUDA (fused Triton kernels) or
:class:`ChunkedL1` (tiled PyTorch backward) so that memory stays O(N*V + N^2) instead of
autograd-through-cdist's N*N*V. sqeuclidean and cosine are matrix products; on CUDA they run on
tensor cores (bf16 inputs directly, fp32 inputs split into two bf16 halves, see `split_matmul`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .kernels.matmul import split_matmul
from ._checks import at_least_float32, check_choice, check_int_at_least

COSTS = ("l1", "l2", "sqeuclidean", "cosine")
L1_IMPLS = ("auto", "chunked", "dense", "triton")
MATMUL_PRECISIONS = ("auto", "fp32", "bf16x3")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Backward tile budgets of ChunkedL1, in (rows, m, vocab) sign entries per tile:
DEFAULT_TILE_ELEMENTS = 1 << 18  # CPU: 256K elements per tile (1 MiB fp32) stay in L2; 10x faster than 4 MiB tiles
CUDA_TILE_ELEMENTS = 1 << 26  # GPU: 256 MiB tiles keep the kernel launches few


def _tiles(n: int, m: int, d: int, budget: int):
    """Tile sizes (rows, vocab) so that one (rows, m, vocab) tile holds at most `budget` elements."""
    cols = max(1, min(d, budget // max(m, 1), 4096))
    rows = max(1, min(n, budget // max(m * cols, 1)))
    return rows, cols


class ChunkedL1(torch.autograd.Function):
    """C[b, i, j] = sum_v |x[b, i, v] - y[b, j, v]| with a tiled backward.

    Backward: dx[i, v] = sum_j G[i, j] sign(x[i, v] - y[j, v]), dy[j, v] = -sum_i G[i, j] sign(...);
    each tile of signs is (rows, m, vocab), at most `tile_elements` entries, and is dropped after
    use. dy is only computed when y needs a gradient (the teacher side usually does not).
    Call as ``ChunkedL1.apply(x, y, tile_elements)`` with x (B, n, d), y (B, m, d).
    """

    @staticmethod
    def forward(ctx, x, y, tile_elements):
        ctx.save_for_backward(x, y)
        ctx.tile_elements = tile_elements
        # cdist's forward for p=1 is a direct O(n*m) output loop; only its backward blows up.
        return torch.cdist(x, y, p=1)

    @staticmethod
    def backward(ctx, grad_cost):
        x, y = ctx.saved_tensors
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if need_x else None
        gy = torch.zeros_like(y) if need_y else None
        batch, n, d = x.shape
        m = y.shape[1]
        rows, cols = _tiles(n, m, d, ctx.tile_elements)
        grad_cost = grad_cost.to(x.dtype)
        for bi in range(batch):
            # Vocabulary slices outermost: the (m, cols) slice of y stays in cache while row tiles stream.
            for v0 in range(0, d, cols):
                y_blk = y[bi, :, v0 : v0 + cols].contiguous()
                for i0 in range(0, n, rows):
                    g_blk = grad_cost[bi, i0 : i0 + rows]  # (r, m)
                    sign = torch.sign(x[bi, i0 : i0 + rows, None, v0 : v0 + cols] - y_blk)
                    if need_x:
                        gx[bi, i0 : i0 + rows, v0 : v0 + cols] = torch.bmm(g_blk[:, None, :], sign).squeeze(1)
                    if need_y:
                        gy[bi, :, v0 : v0 + cols] -= torch.einsum("rm,rmc->mc", g_blk, sign)
                    del sign
        return gx, gy, None


class TritonL1(torch.autograd.Function):
    """C[b, i, j] = sum_v |x[b, i, v] - y[b, j, v]| by the Triton kernels of `sinkd.kernels.l1`.

    The cost is fp32 whatever the input dtype (fp32/bf16/fp16); the backward calls one kernel per
    side that needs a gradient, each O(N*M*V) work and O(N*V) memory, nothing N x M x V.
    """

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return kernels.l1_cost(x, y)

    @staticmethod
    def backward(ctx, grad_cost):
        x, y = ctx.saved_tensors
        gx = kernels.l1_grad(x, y, grad_cost, "x") if ctx.needs_input_grad[0] else None
        gy = kernels.l1_grad(x, y, grad_cost, "y") if ctx.needs_input_grad[1] else None
        return gx, gy


def _triton_ok(x: torch.Tensor) -> bool:
    return x.dtype in KERNEL_DTYPES and kernels.usable_on(x)


def _on_cuda(x: torch.Tensor) -> bool:
    """The device flag behind every CPU / CUDA choice of this module (one place, so tests can fake it)."""
    return x.is_cuda


def l1_backend(x: torch.Tensor, impl: str = "auto") -> str:
    """Which L1 implementation `impl` means for inputs like x: "dense", "chunked" or "triton".
    "auto": dense on CPU, whose cdist backward accumulates into (N, V) and is faster; on CUDA
    triton when importable (fp32/bf16/fp16 inputs), else chunked, since CUDA's cdist backward
    allocates N*N*V. "triton" where the kernels cannot run is an error."""
    check_choice("l1_impl", impl, L1_IMPLS)
    if impl == "dense" or (impl == "auto" and not _on_cuda(x)):
        return "dense"
    if impl == "triton" and not _triton_ok(x):
        raise ValueError(
            f"l1_impl: 'triton' needs the triton package and fp32/bf16/fp16 CUDA tensors (or TRITON_INTERPRET=1 "
            f"set before triton is imported), got {x.dtype} on {x.device}"
        )
    if impl == "triton" or (impl == "auto" and _triton_ok(x)):
        return "triton"
    return "chunked"


def l1_cost(x: torch.Tensor, y: torch.Tensor, *, impl: str = "auto", tile_elements: int | None = None) -> torch.Tensor:
    """Pairwise L1 distances C[..., i, j] = sum_v |x[..., i, v] - y[..., j, v]|, shape (..., n, m).

    impl: "triton" (fused kernels: CUDA, or CPU under TRITON_INTERPRET=1; fp32 cost), "chunked"
    (cdist forward, tiled PyTorch backward, O(N*V + N^2) memory), "dense" (autograd through
    cdist), "auto": see `l1_backend`. tile_elements: the chunked backward's budget, in entries of
    one (rows, m, vocab) tile of signs (>= 1; default 2**18 on CPU, 2**26 on CUDA); only the
    "chunked" backend has tiles, the others ignore it. float16 / bfloat16 inputs give an fp32 cost on
    every backend (dense and chunked compute in fp32; gradients return in the inputs' dtype).
    """
    backend = l1_backend(x, impl)
    if tile_elements is not None:
        check_int_at_least("tile_elements", tile_elements, 1)
    if backend != "triton":  # cdist has no half types on CPU: fp32 cost, as the Triton path gives
        x, y = at_least_float32(x), at_least_float32(y)
    if backend == "dense":
        return torch.cdist(x, y, p=1)
    lead = x.shape[:-2]
    x3 = x.reshape(-1, *x.shape[-2:])
    y3 = y.reshape(-1, *y.shape[-2:])
    if backend == "triton":
        return TritonL1.apply(x3, y3).reshape(*lead, x.shape[-2], y.shape[-2])
    tiles = tile_elements or (CUDA_TILE_ELEMENTS if _on_cuda(x) else DEFAULT_TILE_ELEMENTS)
    return ChunkedL1.apply(x3, y3, tiles).reshape(*lead, x.shape[-2], y.shape[-2])


def _cross(x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """x y^T (..., n, m): split bf16 tensor-core products for fp32 CUDA inputs under "auto", bf16/fp16
    inputs on tensor cores with an fp32 result, else a plain matmul in the input dtype."""
    check_choice("precision", precision, MATMUL_PRECISIONS)
    half = x.dtype in (torch.bfloat16, torch.float16)
    if precision == "bf16x3" or (precision == "auto" and (half or (x.is_cuda and x.dtype == torch.float32))):
        return split_matmul(x, y)
    return x @ y.transpose(-1, -2)


def sqeuclidean_cost(x: torch.Tensor, y: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
    """|x|^2 + |y|^2 - 2 x y^T (the cross term on tensor cores, see `_cross`), clamped at 0 against
    rounding. Norms are summed in fp32 at least; bf16/fp16 inputs give an fp32 cost."""
    xf = x if x.dtype == torch.float64 else x.float()
    yf = y if y.dtype == torch.float64 else y.float()
    sq = (xf * xf).sum(-1)[..., :, None] + (yf * yf).sum(-1)[..., None, :] - 2 * _cross(x, y, precision)
    return sq.clamp_min(0)


def l2_cost(x: torch.Tensor, y: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
    """Euclidean distance; the clamp keeps the gradient finite (zero) for identical rows."""
    sq = sqeuclidean_cost(x, y, precision=precision)
    return sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()


def cosine_cost(x: torch.Tensor, y: torch.Tensor, *, precision: str = "auto") -> torch.Tensor:
    """1 - cosine similarity, in [0, 2]; rows normalised in fp32 (or fp64), the product as in `_cross`."""
    xf = x if x.dtype == torch.float64 else x.float()
    yf = y if y.dtype == torch.float64 else y.float()
    xn, yn = F.normalize(xf, dim=-1), F.normalize(yf, dim=-1)
    if x.dtype in (torch.bfloat16, torch.float16):  # keep the caller's tensor-core dtype for the product
        xn, yn = xn.to(x.dtype), yn.to(x.dtype)
    return 1 - _cross(xn, yn, precision)


def cost_matrix(x: torch.Tensor, y: torch.Tensor, name: str = "l1", **options) -> torch.Tensor:
    r"""Ground cost between every row of ``x`` and every row of ``y``, chosen by name.

    For rows :math:`x_i` and :math:`y_j` (vectors of length d; in SinKD, the student's and the
    teacher's probability vectors [1]_):

    .. math::

        \mathrm{l1}:\ \sum_v |x_{iv} - y_{jv}| \qquad
        \mathrm{l2}:\ \lVert x_i - y_j \rVert_2 \qquad
        \mathrm{sqeuclidean}:\ \lVert x_i - y_j \rVert_2^2 \qquad
        \mathrm{cosine}:\ 1 - \frac{\langle x_i, y_j \rangle}{\lVert x_i \rVert \lVert y_j \rVert}

    ``l2`` and ``sqeuclidean`` are computed as :math:`\lVert x \rVert^2 + \lVert y \rVert^2 - 2 x y^\top`
    clamped at 0 (l2's square root is taken of at least the smallest normal float, so identical
    rows get a zero, finite gradient); ``cosine`` normalises the rows first and lies in [0, 2].

    Parameters
    ----------
    x : Tensor, shape (..., n, d), floating point
        First set of rows (the student's in the Sinkhorn loss).
    y : Tensor, shape (..., m, d), floating point
        Second set of rows; same leading dimensions and d as ``x``.
    name : {"l1", "l2", "sqeuclidean", "cosine"}, default "l1"
        Which cost. "l1" is the SinKD paper's.
    **options
        For "l1": ``impl`` ({"auto", "chunked", "dense", "triton"}, default "auto"; see
        :func:`l1_backend`: cdist on CPU, the Triton kernels or the tiled backward on CUDA) and
        ``tile_elements`` (the chunked backward's tile budget; see :func:`l1_cost`).
        For the others: ``precision`` ({"auto", "fp32", "bf16x3"}, default "auto"): how the
        x y^T product is computed; "auto" uses split-bf16 tensor-core products for fp32 CUDA inputs
        and bf16/fp16 inputs, a plain matmul otherwise; "bf16x3" forces the split product.

    Returns
    -------
    Tensor, shape (..., n, m)
        The cost matrix. The dtype of the inputs, except fp32 for bf16/fp16 inputs of the
        matrix-product costs and for the "triton" L1 path.

    Raises
    ------
    ValueError
        ``cost: unknown value ...`` for a bad name; a one-line shape message when x and y differ in
        leading dimensions or d; ``l1_impl: ...`` / ``precision: ...`` for bad options.

    Examples
    --------
    >>> import torch
    >>> from sinkd import cost_matrix
    >>> x = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    >>> y = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    >>> cost_matrix(x, y, "l1")
    tensor([[1., 2.],
            [2., 1.]])
    >>> cost_matrix(x, y, "sqeuclidean", precision="fp32")
    tensor([[1., 2.],
            [2., 1.]])
    >>> cost_matrix(torch.rand(3, 5, 7), torch.rand(3, 4, 7), "cosine").shape  # batched
    torch.Size([3, 5, 4])

    References
    ----------
    .. [1] X. Cui et al. "Sinkhorn Distance Minimization for Knowledge Distillation".
           LREC-COLING 2024. arXiv:2402.17110.
    """
    check_choice("cost", name, COSTS)
    if x.shape[-1] != y.shape[-1] or x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"cost_matrix: x {tuple(x.shape)} and y {tuple(y.shape)} must share batch and feature sizes")
    if name == "l1":
        return l1_cost(x, y, **options)
    return {"l2": l2_cost, "sqeuclidean": sqeuclidean_cost, "cosine": cosine_cost}[name](x, y, **options)
