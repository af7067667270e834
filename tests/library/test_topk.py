"""Sparse-vocabulary L1 cost: brute force on the union of top-k supports, exact at k = V."""

import pytest
import torch

from sinkd import SinkhornConfig, TopKDistribution, sinkhorn_loss, topk_l1_cost



def probs(seed, n, v, scale=2.0):
    return torch.softmax(scale * torch.randn(n, v, generator=torch.Generator().manual_seed(seed)), -1)


def brute_force(ps, pt, k):
    """The definition, pair by pair: union of both top-k id sets; teacher 0 off its own top-k."""
    cost = torch.zeros(ps.shape[0], pt.shape[0])
    for i in range(ps.shape[0]):
        s_ids = set(ps[i].topk(k).indices.tolist())
        for j in range(pt.shape[0]):
            t_ids = sorted(set(pt[j].topk(k).indices.tolist()))
            union = sorted(s_ids | set(t_ids))
            teacher = torch.zeros(ps.shape[1])
            teacher[t_ids] = pt[j, t_ids]
            rest_s, rest_t = 1 - ps[i, union].sum(), 1 - pt[j, t_ids].sum()
            cost[i, j] = (ps[i, union] - teacher[union]).abs().sum() + (rest_s - rest_t).abs()
    return cost


@pytest.mark.parametrize("k,chunk", [(1, None), (3, 7), (5, 1), (11, None)])
def test_topk_cost_matches_brute_force(k, chunk):
    ps, pt = probs(0, 6, 11), probs(1, 5, 11)
    got = topk_l1_cost(ps, TopKDistribution.from_probs(pt, k), k, chunk_elements=chunk)
    torch.testing.assert_close(got, brute_force(ps, pt, k), rtol=1e-12, atol=1e-12)


def test_topk_equals_full_l1_when_k_covers_the_vocabulary():
    ps, pt = probs(2, 7, 13), probs(3, 7, 13)
    torch.testing.assert_close(topk_l1_cost(ps, TopKDistribution.from_probs(pt, 13), 13), torch.cdist(ps, pt, p=1))
    zs, zt = torch.randn(7, 13), torch.randn(7, 13)
    torch.testing.assert_close(sinkhorn_loss(zs, zt, topk=13), sinkhorn_loss(zs, zt))


def test_topk_gradients_match_brute_force_and_gradcheck():
    zs = torch.randn(4, 9, generator=torch.Generator().manual_seed(4)).requires_grad_()
    pt = probs(5, 3, 9)
    weights = torch.rand(4, 3, generator=torch.Generator().manual_seed(6))
    got = torch.autograd.grad((topk_l1_cost(torch.softmax(zs, -1), TopKDistribution.from_probs(pt, 3), 3, chunk_elements=4) * weights).sum(), zs)[0]
    ref = torch.autograd.grad((brute_force(torch.softmax(zs, -1), pt, 3) * weights).sum(), zs)[0]
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    teacher = TopKDistribution.from_probs(pt, 3)
    assert torch.autograd.gradcheck(lambda z: topk_l1_cost(torch.softmax(z, -1), teacher, 3, chunk_elements=5), (zs,))


def test_topk_loss_error_shrinks_as_k_grows():
    zs, zt = 4 * torch.randn(32, 500), 4 * torch.randn(32, 500)
    full = sinkhorn_loss(zs, zt, SinkhornConfig.paper()).item()
    errors = [abs(sinkhorn_loss(zs, zt, SinkhornConfig.paper(topk=k)).item() - full) / full for k in (4, 32, 256, 500)]
    assert errors[-1] < 1e-12 and errors[2] < errors[0]


def test_topk_options_are_checked():
    with pytest.raises(ValueError, match="sinkhorn.topk must be an integer >= 1"):
        SinkhornConfig(topk=0)
    with pytest.raises(ValueError, match="sinkhorn.topk: the sparse vocabulary works with cost 'l1' in mode 'batch' only"):
        SinkhornConfig(topk=8, cost="cosine")
