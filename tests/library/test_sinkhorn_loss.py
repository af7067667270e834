"""The SinKD loss: paper preset vs the official formulation, modes, groups, masks, errors."""

import importlib

import numpy as np
import ot
import pytest
import torch

from sinkd import SinkhornConfig, cost_matrix, sinkhorn_loss
from sinkd_reference import official_sinkd_loss


def logits(seed, *shape, dtype=torch.float64, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("seed,n,v", [(0, 8, 5), (1, 32, 100), (2, 3, 2), (3, 64, 1000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paper_preset_reproduces_official_formulation(seed, n, v, dtype):
    zs = logits(seed, n, v, dtype=dtype).requires_grad_()
    zt = logits(seed + 100, n, v, dtype=dtype).requires_grad_()
    ours = sinkhorn_loss(zs, zt, SinkhornConfig.paper())
    ref = official_sinkd_loss(zs, zt)
    rtol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours, ref, rtol=1e-6 if dtype == torch.float64 else 2e-5, atol=0)
    g_ours = torch.autograd.grad(ours, (zs, zt))
    g_ref = torch.autograd.grad(ref, (zs, zt))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def test_paper_preset_options():
    cfg = SinkhornConfig.paper()
    assert (cfg.temperature, cfg.eps, cfg.max_iter, cfg.cost, cfg.normalization) == (2.0, 0.1, 20, "l1", "plain")


def test_uniform_normalisation_is_plain_divided_by_n_at_convergence():
    zs, zt = logits(4, 10, 6), logits(5, 10, 6)
    plain = sinkhorn_loss(zs, zt, max_iter=5000, tol=1e-13, normalization="plain")
    uniform = sinkhorn_loss(zs, zt, max_iter=5000, tol=1e-13)
    torch.testing.assert_close(uniform * 10, plain, rtol=1e-9, atol=0)


def test_batch_loss_matches_pot_sinkhorn2_on_the_same_cost():
    zs, zt = logits(6, 12, 7), logits(7, 12, 7)
    cfg = SinkhornConfig(eps=0.05, max_iter=100_000, tol=1e-13, temperature=1.5)
    ours = sinkhorn_loss(zs, zt, cfg)
    cost = cost_matrix(torch.softmax(zs / 1.5, -1), torch.softmax(zt / 1.5, -1), "l1").numpy()
    uniform = np.full(12, 1 / 12)
    ref = ot.sinkhorn2(uniform, uniform, cost, 0.05, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    assert ours.item() == pytest.approx(float(ref), rel=1e-6)


@pytest.mark.parametrize("cost", ["l1", "l2", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("grad", ["unrolled", "envelope"])
def test_gradcheck_every_cost_and_grad_mode(cost, grad):
    zs, zt = logits(8, 5, 4).requires_grad_(), logits(9, 5, 4)
    cfg = SinkhornConfig(cost=cost, grad=grad, eps=0.2, max_iter=10)
    if grad == "unrolled":
        assert torch.autograd.gradcheck(lambda z: sinkhorn_loss(z, zt, cfg), (zs,))
    else:  # envelope: the plan is constant, so the gradient is exactly that of sum(P_fixed * C(z)).
        from sinkd import sinkhorn
        loss = sinkhorn_loss(zs, zt, cfg)
        (g,) = torch.autograd.grad(loss, zs)
        with torch.no_grad():
            ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
            plan = sinkhorn(cost_matrix(ps, pt, cost), 0.2, max_iter=10).plan
        assert torch.autograd.gradcheck(lambda z: (plan * cost_matrix(torch.softmax(z, -1), pt, cost)).sum(), (zs,))
        ref = torch.autograd.grad((plan * cost_matrix(torch.softmax(zs, -1), pt, cost)).sum(), zs)[0]
        torch.testing.assert_close(g, ref)


def test_group_size_at_least_n_is_batch_mode_and_groups_are_block_diagonal():
    zs, zt = logits(10, 10, 6), logits(11, 10, 6)
    for norm in ("uniform", "plain"):
        batch = sinkhorn_loss(zs, zt, normalization=norm)
        assert sinkhorn_loss(zs, zt, normalization=norm, group_size=10).item() == pytest.approx(batch.item())
        assert sinkhorn_loss(zs, zt, normalization=norm, group_size=64).item() == pytest.approx(batch.item())
        # Groups of 4: blocks [0:4], [4:8] and the remainder [8:10], each solved alone.
        parts = [sinkhorn_loss(zs[s:e], zt[s:e], normalization=norm) for s, e in ((0, 4), (4, 8), (8, 10))]
        weights = (0.4, 0.4, 0.2) if norm == "uniform" else (1, 1, 1)
        expected = sum(w * p for w, p in zip(weights, parts))
        assert sinkhorn_loss(zs, zt, normalization=norm, group_size=4).item() == pytest.approx(expected.item(), rel=1e-12)


def test_group_size_one_is_the_mean_pairwise_cost():
    zs, zt = logits(12, 7, 5), logits(13, 7, 5)
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    expected = (ps - pt).abs().sum(-1).mean()
    torch.testing.assert_close(sinkhorn_loss(zs, zt, group_size=1), expected)


def test_mask_drops_rows_and_token_shaped_inputs_flatten():
    zs, zt = logits(14, 2, 5, 6), logits(15, 2, 5, 6)
    mask = torch.rand(2, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    expected = sinkhorn_loss(zs[mask], zt[mask])
    torch.testing.assert_close(sinkhorn_loss(zs, zt, mask=mask), expected)
    empty = sinkhorn_loss(zs.requires_grad_(), zt, mask=torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert (zs.grad == 0).all()


def test_sample_mode_is_per_row_ot_over_the_vocabulary_with_01_cost():
    zs, zt = logits(16, 4, 3), logits(17, 4, 3)
    cfg = SinkhornConfig(mode="sample", eps=0.05, max_iter=100_000, tol=1e-13)
    ours = sinkhorn_loss(zs, zt, cfg)
    ground = 1 - np.eye(3)
    refs = [ot.sinkhorn2(torch.softmax(zs[i], -1).numpy(), torch.softmax(zt[i], -1).numpy(), ground, 0.05,
                         method="sinkhorn_log", stopThr=1e-13, numItermax=200_000) for i in range(4)]
    assert ours.item() == pytest.approx(float(np.mean(refs)), rel=1e-6)
    # Its small-eps limit is the total variation distance.
    tv = 0.5 * (torch.softmax(zs, -1) - torch.softmax(zt, -1)).abs().sum(-1).mean()
    sharp = sinkhorn_loss(zs, zt, SinkhornConfig(mode="sample", eps=1e-3, max_iter=20000, tol=1e-12))
    assert sharp.item() == pytest.approx(tv.item(), abs=5e-3)


def test_sample_mode_gradcheck_and_size_limit():
    zs, zt = logits(18, 3, 4).requires_grad_(), logits(19, 3, 4)
    assert torch.autograd.gradcheck(lambda z: sinkhorn_loss(z, zt, mode="sample", eps=0.3, max_iter=10), (zs,))
    with pytest.raises(ValueError, match="^mode: 'sample' needs N\\*V\\*V"):
        sinkhorn_loss(torch.zeros(2, 10000), torch.zeros(2, 10000), mode="sample")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"eps": 0}, "eps must be a finite number > 0, got 0"),
        ({"max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"cost": "hamming"}, "cost: unknown value 'hamming'; valid: l1, l2, sqeuclidean, cosine"),
        ({"mode": "token"}, "mode: unknown value 'token'; valid: batch, sample"),
        ({"normalization": "softmax"}, "normalization: unknown value"),
        ({"group_size": 0}, "group_size must be an integer >= 1"),
        ({"mode": "sample", "grad": "envelope"}, "grad: 'envelope'"),
        ({"l1_impl": "triton-only"}, "l1_impl: unknown value 'triton-only'; valid: auto, chunked, dense"),
        ({"l1_tile_elements": 0}, "l1_tile_elements must be an integer >= 1, got 0"),
        ({"slice_elements": 0}, "slice_elements must be an integer >= 1, got 0"),
    ],
)
def test_bad_options(overrides, message):
    """Errors start with the field's own name (the caller adds any outer key, e.g. 'sinkhorn.')."""
    with pytest.raises(ValueError) as err:
        sinkhorn_loss(torch.zeros(2, 3), torch.zeros(2, 3), **overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bad_logits_fail_before_any_work():
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        sinkhorn_loss(torch.zeros(4, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="teacher_logits has non-finite values"):
        sinkhorn_loss(torch.zeros(4, 3), torch.full((4, 3), float("nan")))


def test_from_dict_names_fields_relative_to_the_mapping():
    with pytest.raises(ValueError, match="^epsilon: unknown key; valid: "):
        SinkhornConfig.from_dict({"epsilon": 0.1})
    with pytest.raises(ValueError, match="^eps must be a finite number > 0, got 0$"):
        SinkhornConfig.from_dict({"eps": 0})
    with pytest.raises(TypeError, match="^SinkhornConfig.from_dict expects a mapping, got list$"):
        SinkhornConfig.from_dict([("eps", 0.1)])
    assert SinkhornConfig.from_dict(None) == SinkhornConfig.from_dict({}) == SinkhornConfig()
    assert SinkhornConfig.from_dict({"l1_tile_elements": 64, "slice_elements": 128}) == SinkhornConfig(
        l1_tile_elements=64, slice_elements=128)


# ----------------------------------------------------------------------------- every field reaches its consumer


def _spy_solver(monkeypatch):
    """Record the keyword arguments of every sinkhorn() call the loss makes (and still solve)."""
    module = importlib.import_module("sinkd.sinkhorn_loss")  # the module: sinkd.sinkhorn_loss is the function

    calls = []
    real = module.sinkhorn

    def spy(cost, eps, **kwargs):
        calls.append({"eps": eps, **kwargs})
        return real(cost, eps, **kwargs)

    monkeypatch.setattr(module, "sinkhorn", spy)
    return calls


SOLVER_FIELDS = {"eps": 0.37, "max_iter": 7, "tol": 1e-3, "eps_start": 2.5, "eps_decay": 0.75, "slice_elements": 5}


@pytest.mark.parametrize("mode", ["batch", "sample"])
def test_every_solver_field_reaches_sinkhorn(monkeypatch, mode):
    calls = _spy_solver(monkeypatch)
    zs, zt = logits(40, 6, 4), logits(41, 6, 4)
    sinkhorn_loss(zs, zt, SinkhornConfig(mode=mode, grad="unrolled", group_size=3, **SOLVER_FIELDS))
    assert calls, "the loss never called the solver"
    for call in calls:
        for field, value in SOLVER_FIELDS.items():
            assert call[field] == value, (field, call)
        assert call["grad"] == "unrolled"
    calls.clear()
    sinkhorn_loss(zs, zt, SinkhornConfig(grad="envelope"))
    assert [c["grad"] for c in calls] == ["envelope"] and calls[0]["slice_elements"] is None  # default: the solver's own


def test_slice_elements_changes_how_the_solver_runs_and_not_the_value(monkeypatch):
    """Behaviour, not only plumbing: a budget below N*N makes the solver slice its log-sum-exps."""
    solver = importlib.import_module("sinkd.sinkhorn")  # the module, not the function of that name

    slices = []
    real = solver._SlicedLSE.__call__

    def counting(self, t_fn, cost, dim):
        slices.append(self.budget)
        return real(self, t_fn, cost, dim)

    monkeypatch.setattr(solver._SlicedLSE, "__call__", counting)
    zs, zt = logits(42, 12, 5), logits(43, 12, 5)
    whole = sinkhorn_loss(zs, zt, max_iter=10)
    assert slices == []
    sliced = sinkhorn_loss(zs, zt, max_iter=10, slice_elements=20)
    assert slices and set(slices) == {20}
    torch.testing.assert_close(sliced, whole, rtol=1e-12, atol=0)


def test_l1_tile_elements_reaches_the_chunked_backward(monkeypatch):
    from sinkd import costs

    tiles = []
    real = costs._tiles

    def spy(n, m, d, budget):
        tiles.append(budget)
        return real(n, m, d, budget)

    monkeypatch.setattr(costs, "_tiles", spy)
    zs, zt = logits(44, 5, 9).requires_grad_(), logits(45, 5, 9)
    sinkhorn_loss(zs, zt, l1_impl="chunked", l1_tile_elements=7).backward()
    assert tiles == [7]
    tiles.clear()
    sinkhorn_loss(zs, zt, l1_impl="chunked").backward()
    assert tiles == [costs.DEFAULT_TILE_ELEMENTS]  # unset: the CPU default, as before


def test_every_config_field_is_accounted_for():
    """A new SinkhornConfig field must be routed (and added to a test above) or this fails."""
    import dataclasses

    routed = set(SOLVER_FIELDS) | {"grad", "l1_tile_elements"}  # spied above
    behavioural = {"cost", "temperature", "normalization", "mode", "group_size", "l1_impl", "topk", "topk_tail",
                   "topk_diagonal"}  # tested by value
    assert {f.name for f in dataclasses.fields(SinkhornConfig)} == routed | behavioural


# ----------------------------------------------------------------------------- top-k teacher (logit cache)


def test_topk_teacher_with_k_equal_v_is_the_dense_loss_with_groups_masks_and_gradients():
    from sinkd import TopKDistribution

    zs, zt = logits(30, 3, 7, 11).requires_grad_(), logits(31, 3, 7, 11)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    for cfg in (SinkhornConfig(), SinkhornConfig.paper(group_size=4), SinkhornConfig(temperature=2.0, grad="envelope")):
        dense = sinkhorn_loss(zs, zt, cfg, mask=mask)
        sparse = sinkhorn_loss(zs, TopKDistribution.from_logits(zt, 11), cfg, mask=mask)
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=0)
        torch.testing.assert_close(torch.autograd.grad(sparse, zs)[0], torch.autograd.grad(dense, zs)[0], rtol=1e-8, atol=1e-12)


def test_topk_teacher_matches_pot_on_the_union_support_cost_by_hand():
    """k < V at T=2: the teacher tempered by hand (rest spread evenly), the cost pair by pair on the union
    of both top-k id sets plus a rest bucket, the plan by POT's log-domain Sinkhorn in float64."""
    from sinkd import TopKDistribution

    k, T, V, n = 3, 2.0, 8, 6
    zs, zt = logits(32, n, V), logits(33, n, V)
    p = torch.softmax(zt, -1)
    top, ids = p.topk(k, -1)
    teacher = TopKDistribution(top, ids, 1 - top.sum(-1))
    ps = torch.softmax(zs / T, -1)
    cost = np.zeros((n, n))
    for j in range(n):
        t_ids = ids[j].tolist()
        others = [v for v in range(V) if v not in t_ids]
        dense_t = torch.zeros(V)
        dense_t[t_ids] = p[j, t_ids] ** (1 / T)
        rest_t = len(others) * (p[j, others].sum() / len(others)) ** (1 / T)
        norm = dense_t.sum() + rest_t
        dense_t, rest_t = dense_t / norm, rest_t / norm
        for i in range(n):
            union = sorted(set(t_ids) | set(ps[i].topk(k).indices.tolist()))
            cost[i, j] = float((ps[i, union] - dense_t[union]).abs().sum() + (1 - ps[i, union].sum() - rest_t).abs())
    uniform = np.full(n, 1 / n)
    plan = ot.sinkhorn(uniform, uniform, cost, 0.1, method="sinkhorn_log", stopThr=1e-13, numItermax=200_000)
    ours = sinkhorn_loss(zs, teacher, SinkhornConfig(temperature=T, eps=0.1, max_iter=100_000, tol=1e-13))
    assert ours.item() == pytest.approx(float((plan * cost).sum()), rel=1e-6)


def test_topk_teacher_option_errors():
    from sinkd import TopKDistribution

    t = TopKDistribution.from_logits(torch.randn(4, 6), 2)
    for overrides in ({"mode": "sample"}, {"cost": "l2"}):
        with pytest.raises(ValueError, match="^teacher_logits: a top-k teacher \\(logit cache\\) works with cost 'l1' in mode 'batch' only"):
            sinkhorn_loss(torch.zeros(4, 6), t, **overrides)
    with pytest.raises(ValueError, match="exceeds the student's vocabulary"):
        sinkhorn_loss(torch.zeros(4, 1), t)
