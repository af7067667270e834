"""Independent references written out for the tests: the SinKD formulation as DESIGN.md states it."""

import torch


def official_sinkd_loss(zs, zt, temperature=2.0, eps=0.1, n_iter=20):
    """cdist L1, K = exp(-C/eps), n_iter row-then-column normalisations, loss sum(P * C)."""
    ps = torch.softmax(zs / temperature, dim=-1)
    pt = torch.softmax(zt / temperature, dim=-1)
    cost = torch.cdist(ps, pt, p=1)
    plan = torch.exp(-cost / eps)
    for _ in range(n_iter):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True)
    return (plan * cost).sum()
