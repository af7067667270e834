"""Issue 13, finding 3 on the fused Triton path (compiled on CUDA, Triton's interpreter on CPU): -inf
logits are tokens of probability 0, the same cost, loss and gradients as without those tokens."""

import math

import pytest
import torch

import sinkd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASKED = [0, 5, 6, 30]


def kept(v):
    return [c for c in range(v) if c not in MASKED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_l1_cost_with_minus_inf_logits_is_the_cost_without_those_tokens(dtype):
    from sinkd.kernels import softmax_l1

    gen = torch.Generator().manual_seed(3)
    zs = (2 * torch.randn(2, 9, 37, generator=gen, dtype=torch.float32)).to(DEVICE, dtype)
    zt = (2 * torch.randn(2, 6, 37, generator=gen, dtype=torch.float32)).to(DEVICE, dtype)
    w = torch.rand(2, 9, 6, generator=gen, dtype=torch.float32).to(DEVICE)
    zs[..., MASKED], zt[..., MASKED] = -math.inf, -math.inf
    s, t = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    cost = softmax_l1.softmax_l1_cost(s, t, temperature=2.0)
    cost.backward(w)
    keep = kept(37)
    s_ref, t_ref = zs[..., keep].clone().requires_grad_(), zt[..., keep].clone().requires_grad_()
    ref = softmax_l1.softmax_l1_cost(s_ref, t_ref, temperature=2.0)
    ref.backward(w)
    torch.testing.assert_close(cost, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.grad[..., keep], s_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.grad[..., keep], t_ref.grad, rtol=1e-5, atol=1e-7)
    assert bool((s.grad[..., MASKED] == 0).all()) and bool((t.grad[..., MASKED] == 0).all())


def test_triton_sinkhorn_loss_with_a_padded_head_matches_the_float64_chunked_loss_without_padding():
    gen = torch.Generator().manual_seed(4)
    zs = (2 * torch.randn(12, 40, generator=gen, dtype=torch.float32)).to(DEVICE)
    zt = (2 * torch.randn(12, 40, generator=gen, dtype=torch.float32)).to(DEVICE)
    zs[:, MASKED], zt[:, MASKED] = -math.inf, -math.inf
    config = sinkd.SinkhornConfig.paper(grad="implicit")
    s = zs.clone().requires_grad_()
    loss = sinkd.sinkhorn_loss(s, zt, config, l1_impl="triton")
    loss.backward()
    keep = kept(40)
    s64 = zs[:, keep].double().cpu().requires_grad_()
    ref = sinkd.sinkhorn_loss(s64, zt[:, keep].double().cpu(), config, l1_impl="chunked")
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(s.grad[:, keep].double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)
    assert bool((s.grad[:, MASKED] == 0).all())
