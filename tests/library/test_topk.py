"""Sparse-vocabulary L1 cost: brute force on the union of top-k supports, exact at k = V; the
TopKDistribution constructors against hand computations."""

import math

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
    with pytest.raises(ValueError, match="^topk must be an integer >= 1"):
        SinkhornConfig(topk=0)
    with pytest.raises(ValueError, match="^topk: the sparse vocabulary works with cost 'l1' in mode 'batch' only"):
        SinkhornConfig(topk=8, cost="cosine")


# ----------------------------------------------------------------------------- constructors


def by_hand(logits, k):
    """Row by row in float64: the k most probable tokens, and the summed probability of all others."""
    p = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    probs, ids, rest = [], [], []
    for row in p:
        order = sorted(range(len(row)), key=lambda v: -float(row[v]))[:k]
        probs.append(row[order])
        ids.append(torch.tensor(order))
        rest.append(sum(float(row[v]) for v in range(len(row)) if v not in order))
    lead = logits.shape[:-1]
    return torch.stack(probs).reshape(*lead, -1), torch.stack(ids).reshape(*lead, -1), torch.tensor(rest, dtype=torch.float64).reshape(lead)


@pytest.mark.parametrize("k", [1, 4, 9, 50])
def test_from_logits_is_the_top_k_at_temperature_1_with_the_exact_rest(k):
    logits = 3 * torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(7))
    top = TopKDistribution.from_logits(logits, k)
    probs, ids, rest = by_hand(logits, min(k, 9))
    assert isinstance(top, TopKDistribution) and top.ids.dtype == torch.int64
    assert top.probs.shape == top.ids.shape == (2, 3, min(k, 9)) and top.rest.shape == (2, 3)
    assert torch.equal(top.ids, ids)
    torch.testing.assert_close(top.probs, probs, rtol=1e-12, atol=0)
    torch.testing.assert_close(top.rest, rest, rtol=1e-10, atol=1e-15)
    if k >= 9:
        assert (top.rest == 0).all()


def test_from_logits_keeps_a_tiny_rest_that_one_minus_the_sum_would_lose():
    logits = torch.tensor([[40.0, 0.0, 0.0, 0.0]], dtype=torch.float32)
    top = TopKDistribution.from_logits(logits, 1)
    exact = 3 * math.exp(-40.0) / (1 + 3 * math.exp(-40.0))
    assert float(1 - top.probs.sum()) == 0.0  # the float32 complement underflows ...
    assert top.rest.item() == pytest.approx(exact, rel=1e-5)  # ... the log-domain sum does not


def test_from_logits_detaches_and_computes_half_precision_in_float32():
    logits = torch.randn(3, 6, dtype=torch.float32, requires_grad=True)
    top = TopKDistribution.from_logits(logits, 2)
    assert not top.probs.requires_grad and not top.rest.requires_grad
    half = TopKDistribution.from_logits(logits.detach().to(torch.bfloat16), 2)
    assert half.probs.dtype == torch.float32 and half.rest.dtype == torch.float32


def test_from_probs_keeps_the_largest_and_the_complement_with_gradients():
    p = probs(8, 4, 7).requires_grad_()
    top = TopKDistribution.from_probs(p, 3)
    values, ids = p.detach().topk(3, -1)
    assert torch.equal(top.ids, ids)
    torch.testing.assert_close(top.probs.detach(), values)
    torch.testing.assert_close(top.rest.detach(), 1 - values.sum(-1))
    top.rest.sum().backward()
    assert p.grad is not None and bool((p.grad != 0).any())
    assert TopKDistribution.from_probs(p.detach(), 100).probs.shape == (4, 7)


@pytest.mark.parametrize("constructor", ["from_logits", "from_probs"])
@pytest.mark.parametrize("k", [0, -1, True, 1.5, "4"])
def test_bad_k_is_one_line_naming_topk(constructor, k):
    with pytest.raises(ValueError) as err:
        getattr(TopKDistribution, constructor)(torch.zeros(2, 5), k)
    assert str(err.value) == f"topk must be an integer >= 1, got {k!r}"


def test_one_top_k_module():
    """teacher_topk and sinkd.topk_teacher are gone: TopKDistribution.from_logits replaces them."""
    import importlib.util

    import sinkd

    assert importlib.util.find_spec("sinkd.topk_teacher") is None
    assert not hasattr(sinkd, "teacher_topk") and "TopKDistribution" in sinkd.__all__
