"""Triton L1 kernels (interpreter on CPU, compiled on CUDA) against float64 dense references."""

import pytest
import torch

import sinkd
from sinkd.costs import l1_backend, l1_cost
from sinkd.kernels import l1 as k
from autograd_helpers import graph_names

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tiles smaller than the sizes below and not dividing them: every edge mask is exercised.
SMALL = {"cost": {"BLOCK_N": 8, "BLOCK_M": 16, "BLOCK_D": 8}, "grad": {"BLOCK_A": 8, "BLOCK_B": 4, "BLOCK_D": 16}}
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def inputs(seed, batch, n, m, d, dtype):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.rand(batch, n, d, generator=gen), torch.rand(batch, m, d, generator=gen)
    w = torch.rand(batch, n, m, generator=gen)
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype), w.to(DEVICE)


def reference(x, y, w):
    """float64 of exactly the values the kernel received: cost, dC/dx . W and dC/dy . W."""
    x64, y64, w64 = x.double().cpu(), y.double().cpu(), w.double().cpu()
    sign = torch.sign(x64[:, :, None, :] - y64[:, None, :, :])  # (B, n, m, d), small sizes only
    return (torch.cdist(x64, y64, p=1), torch.einsum("bij,bijv->biv", w64, sign), -torch.einsum("bij,bijv->bjv", w64, sign))


def rel(got, ref):
    return float((got.detach().double().cpu() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", ["small", "default"])
def test_cost_and_both_gradients_match_float64(dtype, blocks):
    x, y, w = inputs(0, 2, 19, 23, 37, dtype)
    cost_blocks, grad_blocks = (SMALL["cost"], SMALL["grad"]) if blocks == "small" else ({}, {})
    ref_c, ref_gx, ref_gy = reference(x, y, w)
    cost = k.l1_cost(x, y, **cost_blocks)
    gx = k.l1_grad(x, y, w, "x", **grad_blocks)
    gy = k.l1_grad(x, y, w, "y", **grad_blocks)
    assert cost.dtype == torch.float32 and gx.dtype == dtype and gy.dtype == dtype
    assert cost.shape == (2, 19, 23) and gx.shape == x.shape and gy.shape == y.shape
    assert rel(cost, ref_c) <= TOL[torch.float32]  # fp32 accumulation even for bf16 inputs
    assert rel(gx, ref_gx) <= TOL[dtype] and rel(gy, ref_gy) <= TOL[dtype]


def test_strided_inputs_and_transposed_weights():
    x, y, w = inputs(1, 1, 11, 6, 40, torch.float32)
    x_view = x[:, :, ::2]  # stride 2 along the vocabulary
    y_view = y[:, :, ::2]
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major
    ref_c, ref_gx, ref_gy = reference(x_view, y_view, w)
    assert rel(k.l1_cost(x_view, y_view), ref_c) <= 1e-5
    assert rel(k.l1_grad(x_view, y_view, w_t, "x"), ref_gx) <= 1e-5
    assert rel(k.l1_grad(x_view, y_view, w_t, "y"), ref_gy) <= 1e-5


def test_ties_give_zero_sign_like_cdist():
    x = torch.tensor([[[0.5, 0.25, 1.0]]], device=DEVICE)
    y = torch.tensor([[[0.5, 0.75, 1.0], [0.0, 0.25, 2.0]]], device=DEVICE)
    w = torch.tensor([[[2.0, 3.0]]], device=DEVICE)
    assert k.l1_grad(x, y, w, "x").cpu().tolist() == [[[3.0, -2.0, -3.0]]]


@pytest.mark.parametrize(
    "dtype, options, masked",
    [
        (torch.float32, {}, False),
        (torch.float32, {"group_size": 8}, True),  # 2 blocks of 8 + a remainder block of the 19 kept rows
        (torch.bfloat16, {"normalization": "uniform", "temperature": 1.0}, False),
    ],
)
def test_triton_l1_loss_is_built_from_logits_and_matches_the_float64_chunked_path(dtype, options, masked):
    """sinkhorn_loss with the Triton L1 backend takes the fused logits path (SoftmaxL1: no softmax output
    kept for the backward) and gives the loss and both gradients of the float64 chunked path."""
    gen = torch.Generator().manual_seed(2)
    zs = (2 * torch.randn(3, 7, 45, generator=gen)).to(DEVICE, dtype)
    zt = (2 * torch.randn(3, 7, 45, generator=gen)).to(DEVICE, dtype)
    mask = (torch.rand(3, 7, generator=gen) > 0.1).to(DEVICE) if masked else None
    config = sinkd.SinkhornConfig.paper(**options)
    s, t = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    loss = sinkd.sinkhorn_loss(s, t, config, mask=mask, l1_impl="triton")
    names = graph_names(loss)
    assert "SoftmaxL1Backward" in names and "SoftmaxBackward0" not in names
    # Blocks are views or one split: a slice's backward would allocate another zero N x V gradient.
    assert "SliceBackward0" not in names
    loss.backward()
    s64, t64 = zs.double().cpu().requires_grad_(), zt.double().cpu().requires_grad_()
    mask64 = None if mask is None else mask.cpu()
    ref = sinkd.sinkhorn_loss(s64, t64, config, mask=mask64, l1_impl="chunked")
    ref.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(float(loss.detach()) - float(ref.detach())) <= tol * abs(float(ref.detach()))
    assert rel(s.grad, s64.grad) <= 10 * tol and rel(t.grad, t64.grad) <= 10 * tol
    assert s.grad.dtype == dtype


def test_function_skips_the_frozen_side_and_handles_leading_dimensions():
    x, y, _ = inputs(3, 2, 5, 4, 9, torch.float32)
    x4 = x.reshape(1, 2, 5, 9).requires_grad_()
    cost = l1_cost(x4, y.reshape(1, 2, 4, 9), impl="triton")
    assert cost.shape == (1, 2, 5, 4)
    cost.sum().backward()
    assert x4.grad is not None
    ref = torch.cdist(x.double(), y.double(), p=1).reshape(1, 2, 5, 4)
    assert rel(cost, ref.cpu()) <= 1e-6


def test_float64_is_refused_by_name_and_chunked_stays_exact():
    """The fp32 kernels never see float64: "triton" is refused by name, "auto" falls back to an exact
    path (chunked on CUDA, cdist on CPU), and the chunked path keeps float64 values and gradients."""
    gen = torch.Generator().manual_seed(5)
    x, y, w = (torch.rand(*shape, generator=gen, dtype=torch.float64).to(DEVICE) for shape in ((1, 7, 33), (1, 5, 33), (1, 7, 5)))
    with pytest.raises(ValueError, match="^l1_impl: 'triton' needs .*float64"):
        l1_cost(x, x, impl="triton")
    assert l1_backend(x) == ("chunked" if x.is_cuda else "dense")
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    cost = l1_cost(xr, yr, impl="chunked")
    assert cost.dtype == torch.float64 and "ChunkedL1Backward" in graph_names(cost)
    (cost * w).sum().backward()
    ref_c, ref_gx, ref_gy = reference(x, y, w)  # float64 signs summed by einsum
    torch.testing.assert_close(cost.detach().cpu(), ref_c, rtol=1e-13, atol=0)
    torch.testing.assert_close(xr.grad.cpu(), ref_gx, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(yr.grad.cpu(), ref_gy, rtol=1e-13, atol=1e-13)
    assert xr.grad.dtype == yr.grad.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda_and_matches_float64_at_a_real_size():
    x, y, w = inputs(4, 1, 300, 257, 5003, torch.float32)
    xr = x.clone().requires_grad_()
    cost = l1_cost(xr, y)  # auto
    assert cost.grad_fn is not None and "TritonL1" in type(cost.grad_fn).__name__
    (cost * w).sum().backward()
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close(cost.double(), torch.cdist(x64, y64, p=1), rtol=1e-5, atol=0)
    ref_gx = k.l1_grad(x64.float(), y64.float(), w, "x")
    assert rel(xr.grad, ref_gx.double().cpu()) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_l1_from_logits_matches_float64_autograd(dtype):
    """The logits-mode kernels + in-place softmax backward vs cdist of float64 softmaxes, both sides."""
    from sinkd.kernels import softmax_l1

    gen = torch.Generator().manual_seed(5)
    zs = (3 * torch.randn(2, 13, 45, generator=gen, dtype=torch.float32)).to(DEVICE, dtype)
    zt = (3 * torch.randn(2, 10, 45, generator=gen, dtype=torch.float32)).to(DEVICE, dtype)
    w = torch.rand(2, 13, 10, generator=gen, dtype=torch.float32).to(DEVICE)
    zs64, zt64 = zs.double().cpu().requires_grad_(), zt.double().cpu().requires_grad_()
    ref = torch.cdist(torch.softmax(zs64 / 2, -1), torch.softmax(zt64 / 2, -1), p=1)
    ref_gs, ref_gt = torch.autograd.grad((ref * w.double().cpu()).sum(), (zs64, zt64))
    s, t = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    old = softmax_l1.ROW_BLOCK_ELEMENTS
    softmax_l1.ROW_BLOCK_ELEMENTS = 45 * 4  # several row blocks in the logsumexp and backward loops
    try:
        cost = softmax_l1.softmax_l1_cost(s, t, temperature=2.0)
        cost.backward(w)
    finally:
        softmax_l1.ROW_BLOCK_ELEMENTS = old
    assert cost.dtype == torch.float32 and s.grad.dtype == dtype
    assert rel(cost, ref.detach()) <= 1e-5
    assert rel(s.grad, ref_gs) <= TOL[dtype] and rel(t.grad, ref_gt) <= TOL[dtype]


def test_logits_mode_ties_leave_the_logit_gradient_unchanged():
    """In LOGITS mode the dC/dp kernel gives ties +w (the sign bit of a - b) where cdist gives 0. The
    gradient wrt the logits is still the float64 one: underflowed probabilities (p = 0 on both sides:
    the common tie) are multiplied by p in the softmax backward, and a row equal to a teacher row
    ties on every token, a constant over the vocabulary that the softmax backward removes."""
    from sinkd.kernels import softmax_l1

    gen = torch.Generator().manual_seed(8)
    zs = 3 * torch.randn(1, 9, 40, generator=gen)
    zt = 3 * torch.randn(1, 7, 40, generator=gen)
    zs[..., :6] = -1e4  # exp underflows to exactly 0 in fp32 and float64: ties at p = 0
    zt[..., 3:9] = -1e4
    zt[0, 2] = zs[0, 4]  # a whole row tied
    w = torch.rand(1, 9, 7, generator=gen)
    zs64, zt64 = zs.double().requires_grad_(), zt.double().requires_grad_()
    ref = torch.cdist(torch.softmax(zs64 / 2, -1), torch.softmax(zt64 / 2, -1), p=1)
    ref_gs, ref_gt = torch.autograd.grad((ref * w.double()).sum(), (zs64, zt64))
    s, t = zs.clone().to(DEVICE).requires_grad_(), zt.clone().to(DEVICE).requires_grad_()
    cost = softmax_l1.softmax_l1_cost(s, t, temperature=2.0)
    cost.backward(w.to(DEVICE))
    assert rel(s.grad, ref_gs) <= 1e-5 and rel(t.grad, ref_gt) <= 1e-5
    # the tie rule itself: on probability rows the kernel's dC/dp differs from cdist's exactly at ties
    lse_s, lse_t = softmax_l1.row_logsumexp(s.detach(), 2.0), softmax_l1.row_logsumexp(t.detach(), 2.0)
    dp = k.l1_grad(s.detach(), t.detach(), w.to(DEVICE), "x", lse_x=lse_s, lse_y=lse_t, temperature=2.0)
    p_s, p_t = torch.softmax(zs.double() / 2, -1), torch.softmax(zt.double() / 2, -1)
    ties = (p_s[:, :, None, :] == p_t[:, None, :, :]).double()
    expected = torch.einsum("bij,bijv->biv", w.double(), torch.sign(p_s[:, :, None, :] - p_t[:, None, :, :]) + ties)
    assert rel(dp, expected) <= 1e-5


@pytest.mark.parametrize("logits", [False, True])
def test_tile_picking_path_times_clipped_problems_and_keeps_results(monkeypatch, logits):
    """The GPU launch path (time each tile shape on a clipped copy, keep the fastest) run through the
    interpreter with a tiny clip, so that clipping and the full launch are both exercised."""
    from sinkd.kernels import softmax_l1

    monkeypatch.setattr(k, "TUNE_IN_INTERPRETER", True)
    monkeypatch.setattr(k, "TUNE_CLIP", (9, 7, 20))
    monkeypatch.setattr(k, "COST_CONFIGS", [(16, 16, 8, 4), (8, 32, 4, 4)])
    monkeypatch.setattr(k, "GRAD_CONFIGS", [(16, 8, 16, 4), (8, 4, 32, 4)])
    monkeypatch.setattr(k, "_BEST", {})
    x, y, w = inputs(6, 2, 21, 18, 45, torch.float32)
    if logits:
        lx, ly = softmax_l1.row_logsumexp(x, 2.0), softmax_l1.row_logsumexp(y, 2.0)
        ref = reference(torch.softmax(x.double() / 2, -1), torch.softmax(y.double() / 2, -1), w)
        opts = {"lse_x": lx, "lse_y": ly, "temperature": 2.0}
    else:
        ref, opts = reference(x, y, w), {}
    got = (k.l1_cost(x, y, **opts), k.l1_grad(x, y, w, "x", **opts), k.l1_grad(x, y, w, "y", **opts))
    assert {key[0] for key in k._BEST} == {"cost", "grad"}
    for g, r in zip(got, ref):
        assert rel(g, r) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_loss_extra_memory_is_one_gradient_plus_a_few_plans_on_cuda():
    """sinkhorn_loss (auto = the fused logits path on CUDA) with the envelope gradient at 2048 x 32000:
    extra memory over the logits must be the gradient buffer (4 N V bytes) plus O(N^2) (a handful of
    N x N fp32 matrices, the plan and its products), plus the row-block temporaries of the softmax
    backward, nothing N x V more."""
    from sinkd.kernels import softmax_l1

    n, v = 2048, 32000
    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = torch.randn(n, v, device="cuda", generator=gen).requires_grad_()
    zt = torch.randn(n, v, device="cuda", generator=gen)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = sinkd.sinkhorn_loss(zs, zt, sinkd.SinkhornConfig.paper(grad="envelope"))
    assert "SoftmaxL1Backward" in graph_names(loss)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    row_block = 3 * 4 * softmax_l1.ROW_BLOCK_ELEMENTS
    assert extra <= 4 * n * v + 8 * 4 * n * n + row_block, extra / 2**20
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
