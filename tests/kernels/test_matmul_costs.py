"""Tensor-core (split bf16) products and the sqeuclidean / cosine costs against float64."""

import pytest
import torch

from sinkd import cost_matrix
from sinkd.kernels.matmul import split_matmul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rows(seed, *shape, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE)


def rel(got, ref):
    return float((got.double() - ref).abs().max() / ref.abs().max())


def test_split_product_has_fp32_accuracy_where_one_bf16_product_has_not():
    x, y = rows(0, 2, 33, 300), rows(1, 2, 17, 300)
    ref = x @ y.transpose(-1, -2)
    split = split_matmul(x.float(), y.float())
    one_bf16 = (x.bfloat16().float() @ y.bfloat16().float().transpose(-1, -2))
    assert split.dtype == torch.float32
    assert rel(split, ref) <= 1e-4 and rel(one_bf16, ref) > 1e-3  # the low halves matter


def test_split_product_gradients_match_float64():
    x, y, w = rows(2, 1, 9, 64), rows(3, 1, 7, 64), rows(4, 1, 9, 7)
    xf, yf = x.float().requires_grad_(), y.float().requires_grad_()
    (split_matmul(xf, yf) * w.float()).sum().backward()
    assert rel(xf.grad, w @ y) <= 1e-4 and rel(yf.grad, w.transpose(-1, -2) @ x) <= 1e-4


@pytest.mark.parametrize("name", ["sqeuclidean", "cosine", "l2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_tensor_core_costs_match_float64(name, dtype, tol):
    x, y = rows(5, 3, 40, 257, scale=0.1), rows(6, 3, 31, 257, scale=0.1) + 0.05
    ref = cost_matrix(x, y, name, precision="fp32")  # float64 throughout
    got = cost_matrix(x.to(dtype), y.to(dtype), name, precision="bf16x3" if dtype == torch.float32 else "auto")
    assert got.dtype == torch.float32 and rel(got, ref) <= tol


@pytest.mark.parametrize("name", ["sqeuclidean", "cosine"])
def test_tensor_core_cost_gradients_match_float64(name):
    x, y, w = rows(7, 12, 50), rows(8, 10, 50), rows(9, 12, 10)
    x64 = x.clone().requires_grad_()
    (cost_matrix(x64, y, name) * w).sum().backward()
    xf = x.float().requires_grad_()
    (cost_matrix(xf, y.float(), name, precision="bf16x3") * w.float()).sum().backward()
    assert rel(xf.grad, x64.grad) <= 1e-4


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="^precision: unknown value 'tf16'; valid: auto, fp32, bf16x3$"):
        cost_matrix(torch.rand(2, 3), torch.rand(2, 3), "cosine", precision="tf16")
