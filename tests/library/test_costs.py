"""Costs against hand-written formulas; the chunked L1 path against the dense one, which L1 path
`auto` picks on each device, and the chunked path's memory."""

import importlib

import pytest
import torch

from sinkd import SinkhornConfig, cost_matrix, l1_cost, sinkhorn_loss
from autograd_helpers import graph_names


def rows(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "name,formula",
    [
        ("l1", lambda x, y: (x[:, None] - y[None]).abs().sum(-1)),
        ("l2", lambda x, y: ((x[:, None] - y[None]) ** 2).sum(-1).sqrt()),
        ("sqeuclidean", lambda x, y: ((x[:, None] - y[None]) ** 2).sum(-1)),
        ("cosine", lambda x, y: 1 - (x[:, None] * y[None]).sum(-1) / (x.norm(dim=-1)[:, None] * y.norm(dim=-1)[None])),
    ],
)
def test_cost_matches_its_formula(name, formula):
    x, y = rows(0, 7, 11), rows(1, 5, 11)
    torch.testing.assert_close(cost_matrix(x, y, name), formula(x, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["l1", "l2", "sqeuclidean", "cosine"])
def test_cost_gradcheck(name):
    x, y = rows(2, 4, 6).requires_grad_(), rows(3, 3, 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cost_matrix(a, b, name), (x, y))


def test_costs_are_batched_over_leading_dimensions():
    x, y = rows(4, 2, 3, 5, 8), rows(5, 2, 3, 4, 8)
    for name in ("l1", "l2", "sqeuclidean", "cosine"):
        batched = cost_matrix(x, y, name)
        assert batched.shape == (2, 3, 5, 4)
        torch.testing.assert_close(batched[1, 2], cost_matrix(x[1, 2], y[1, 2], name))


def test_unknown_cost_lists_the_valid_names():
    with pytest.raises(ValueError, match="cost: unknown value 'emd'; valid: l1, l2, sqeuclidean, cosine"):
        cost_matrix(rows(0, 2, 3), rows(1, 2, 3), "emd")


@pytest.mark.parametrize("block", [1, 7, 64, 1 << 18])
def test_chunked_l1_equals_dense_values_and_gradients_both_sides(block):
    x, y = rows(6, 2, 9, 13).requires_grad_(), rows(7, 2, 6, 13).requires_grad_()
    weights = rows(8, 2, 9, 6)
    dense = l1_cost(x, y, impl="dense")
    chunked = l1_cost(x, y, impl="chunked", tile_elements=block)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    g_dense = torch.autograd.grad((dense * weights).sum(), (x, y))
    g_chunk = torch.autograd.grad((chunked * weights).sum(), (x, y))
    for a, b in zip(g_chunk, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_l1_gradcheck_and_teacher_side_skipped_when_frozen():
    x, y = rows(9, 5, 7).requires_grad_(), rows(10, 4, 7)
    assert torch.autograd.gradcheck(lambda a: l1_cost(a, y, impl="chunked", tile_elements=3), (x,))
    out = l1_cost(x, y)
    out.sum().backward()
    assert y.grad is None and x.grad is not None


costs = importlib.import_module("sinkd.costs")  # the module (sinkd.l1_cost etc. are its functions)


def test_auto_picks_cdist_on_cpu_and_a_tiled_backward_on_cuda(monkeypatch):
    """The memory problem (autograd through cdist allocates N*N*V) exists only in CUDA's cdist
    backward, so what must hold on CPU is the *choice*: the device flag is faked here (the one
    function, costs._on_cuda, that every CPU/CUDA decision of the module reads)."""
    x, y = rows(11, 6, 5).requires_grad_(), rows(12, 4, 5)
    assert costs.l1_backend(x) == "dense"
    assert "ChunkedL1Backward" not in graph_names(l1_cost(x, y)) and "CdistBackward0" in graph_names(l1_cost(x, y))

    tiles = []
    real_tiles = costs._tiles
    monkeypatch.setattr(costs, "_tiles", lambda n, m, d, budget: tiles.append(budget) or real_tiles(n, m, d, budget))
    monkeypatch.setattr(costs, "_on_cuda", lambda t: True)
    monkeypatch.setattr(costs, "_triton_ok", lambda t: False)  # CUDA without usable Triton kernels
    assert costs.l1_backend(x) == "chunked"
    out = l1_cost(x, y)
    assert "ChunkedL1Backward" in graph_names(out) and "CdistBackward0" not in graph_names(out)
    out.sum().backward()
    assert tiles == [costs.CUDA_TILE_ELEMENTS]  # CUDA's tile default
    loss = sinkhorn_loss(rows(13, 6, 5).requires_grad_(), rows(14, 6, 5))  # the loss takes the same path
    assert "ChunkedL1Backward" in graph_names(loss) and "CdistBackward0" not in graph_names(loss)

    monkeypatch.setattr(costs, "_triton_ok", lambda t: True)  # CUDA with the kernels
    assert costs.l1_backend(x) == "triton"
    for impl in ("dense", "chunked"):  # an explicit choice is never overridden by the device
        assert costs.l1_backend(x, impl) == impl


def test_triton_where_it_cannot_run_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(costs, "_triton_ok", lambda t: False)
    with pytest.raises(ValueError, match="^l1_impl: 'triton' needs the triton package"):
        l1_cost(rows(0, 2, 3), rows(1, 2, 3), impl="triton")


def largest_new_tensor(fn):
    """Entries of the largest fresh tensor (not a view of, nor in place on, an argument) any op makes while fn runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        entries = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen = {t.untyped_storage().data_ptr() for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                    Largest.entries = max(Largest.entries, t.numel())
            return out

    with Largest():
        fn()
    return Largest.entries


def test_chunked_l1_memory_follows_its_tile_budget():
    """What this can and cannot catch on CPU. It cannot show CUDA's N*N*V cdist backward: on CPU,
    cdist's backward is O(N*V) (that is why `auto` keeps it there; which path CUDA gets is checked
    by the selection test above, its CUDA memory only by the GPU tests in tests/kernels). It forces
    the chunked backend and checks its own bound, as the largest temporary the loss's forward and
    backward create: with the default tiles nothing exceeds one tile or one N x V gradient, while
    tiles as large as the whole (N, N, V) sign tensor create exactly that. So a chunked backward
    that ignored its tile budget or built N*N*V at once fails here, and so does an
    l1_tile_elements value that never reached it."""
    n, v = 64, 2048
    zs, zt = rows(20, n, v).requires_grad_(), rows(21, n, v)

    def largest(tiles):
        cfg = SinkhornConfig.paper(l1_impl="chunked", l1_tile_elements=tiles)
        return largest_new_tensor(lambda: sinkhorn_loss(zs, zt, cfg).backward())

    whole = n * n * v  # 8.4M entries: 64 MiB in float64
    assert largest(None) <= max(costs.DEFAULT_TILE_ELEMENTS, n * v) < whole // 16
    assert largest(1000) <= n * v  # a smaller budget: tiles below the (N, V) tensors
    assert largest(whole) == whole  # the budget is what bounds the tiles
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0
