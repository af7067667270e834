"""Costs against hand-written formulas; the chunked L1 path against the dense one, and its memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from sinkd import cost_matrix, l1_cost


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
    chunked = l1_cost(x, y, impl="chunked", block_elements=block)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    g_dense = torch.autograd.grad((dense * weights).sum(), (x, y))
    g_chunk = torch.autograd.grad((chunked * weights).sum(), (x, y))
    for a, b in zip(g_chunk, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_l1_gradcheck_and_teacher_side_skipped_when_frozen():
    x, y = rows(9, 5, 7).requires_grad_(), rows(10, 4, 7)
    assert torch.autograd.gradcheck(lambda a: l1_cost(a, y, block_elements=3), (x,))
    out = l1_cost(x, y)
    out.sum().backward()
    assert y.grad is None and x.grad is not None


def test_chunked_l1_peak_memory_is_bounded_at_512_rows_of_32k_vocabulary():
    """Dense autograd through cdist needs N*N*V*4 bytes = 33.6 GB here; the chunked path must stay
    within a few hundred MiB over its inputs. Measured as the max RSS of a fresh process."""
    script = textwrap.dedent(
        """
        import json, resource, torch, sinkd
        torch.manual_seed(0)
        zs = torch.randn(512, 32000, requires_grad=True); zt = torch.randn(512, 32000)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = sinkd.sinkhorn_loss(zs, zt, sinkd.SinkhornConfig.paper(l1_impl="chunked"))
        loss.backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"extra_mib": (peak - base) / 1024, "finite": bool(torch.isfinite(zs.grad).all()),
                          "grad_norm": float(zs.grad.norm())}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # Inputs are 2 x 65.5 MB; softmax outputs, their grads and the 512x512 plans add a few hundred MB.
    assert result["extra_mib"] < 1024, result
    assert result["finite"] and result["grad_norm"] > 0
