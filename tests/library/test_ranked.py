"""sinkd.RankedLogits, a teacher kept as its top-w logits and a few log-normalisers: the ranked
vectors and the ULD / MultiLevelOT losses and student gradients it gives equal the full logits',
checked against numpy float64 formulas and against the dense path; what it cannot give is refused."""

import doctest
import importlib

import numpy as np
import pytest
import torch
from test_cross_vocab import random_batch

from sinkd import MultiLevelOTConfig, RankedLogits, multilevel_ot_loss, ranked_probs, uld_loss
from sinkd.ranked import ranked_log


def ref_log_ranked(z: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """float64: log softmax(z / T) of each row, sorted descending, the first k (-inf past V)."""
    x = z.astype(np.float64) / temperature
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True)
    ranked = np.sort(x - lse, axis=-1)[..., ::-1][..., :k]
    return np.concatenate([ranked, np.full((*z.shape[:-1], k - ranked.shape[-1]), -np.inf)], -1)


@pytest.mark.parametrize("width,k,temperature", [(16, 16, 1.0), (16, 5, 2.0), (40, 40, 0.5), (64, 50, 2.0)])
def test_log_ranked_equals_the_float64_formula_and_the_full_logits_path(width, k, temperature):
    z = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(width + k)) * 3
    cached = RankedLogits.from_logits(z, width, (1.0, 2.0, 0.5))
    assert cached.width == min(width, 40) and cached.vocab == 40 and cached.shape == (3, 5)
    got = cached.log_ranked(k, temperature)
    np.testing.assert_allclose(got.double().numpy(), ref_log_ranked(z.numpy(), k, temperature), rtol=0, atol=2e-6)
    assert torch.equal(got, ranked_log(z, k, temperature))  # the same float operations as on the full logits


def test_a_cache_of_the_whole_vocabulary_pads_past_it_and_gives_every_k():
    z = torch.randn(2, 4, 12)
    cached = RankedLogits.from_logits(z, 100, (1.0,))
    assert cached.width == 12
    assert torch.equal(cached.log_ranked(20, 1.0), ranked_log(z, 20, 1.0))  # -inf past V: probability 0
    assert torch.isneginf(cached.log_ranked(20, 1.0)[..., 12:]).all()
    assert torch.equal(cached.log_ranked(None, 1.0), ranked_log(z, None, 1.0))
    assert torch.equal(cached.log_ranked(7, 1.0).exp(), ranked_probs(z, 7))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_and_student_gradients_equal_those_of_the_full_teacher(seed, dtype):
    zs, zt, ms, mt = random_batch(seed, t_s=7, t_t=9, v_s=30, v_t=45)
    zs, zt = zs.to(dtype), zt.to(dtype)
    config = MultiLevelOTConfig(k=12, tau_had=1.0, tau_sl=0.7, tau_sd=2.0, max_iter=15)
    cached = RankedLogits.from_logits(zt, 16, (0.7, 1.0, 2.0))

    def losses(teacher):
        s = zs.clone().requires_grad_(True)
        out = multilevel_ot_loss(s, teacher, ms, mt, config=config)
        uld = uld_loss(s, teacher, ms, mt, k=10, temperature=2.0, reduction="token")
        (out.total_kd + uld).backward()
        return [out.had, out.sl, out.sd, uld], s.grad

    full, grad_full = losses(zt)
    part, grad_part = losses(cached)
    for a, b in zip(full, part):
        assert torch.equal(a, b)
    assert torch.equal(grad_full, grad_part)
    assert float(full[2].detach()) > 0 and float(grad_full.abs().sum()) > 0


def test_masking_and_gathering_rows_work_on_values_and_normalisers_alike():
    z = torch.randn(4, 6, 30)
    keep = torch.tensor([True, False, True, True])
    cached = RankedLogits.from_logits(z, 8, (1.0, 2.0))
    sub = cached[keep]
    ref = RankedLogits.from_logits(z[keep], 8, (1.0, 2.0))
    assert torch.equal(sub.values, ref.values) and torch.equal(sub.log_normalizers, ref.log_normalizers)
    assert sub.temperatures == (1.0, 2.0) and sub.vocab == 30
    assert cached.to(torch.float64).values.dtype == torch.float64


def one_line(fn, match, kind=ValueError):
    with pytest.raises(kind, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_what_the_cache_does_not_keep_is_refused_in_one_line():
    zs, zt, ms, mt = random_batch(0, v_s=30, v_t=45)
    cached = RankedLogits.from_logits(zt, 16, (1.0, 2.0))
    one_line(lambda: cached.log_ranked(17, 1.0), "k: 17 ranked entries asked, but only the top 16 of 45")
    one_line(lambda: cached.log_ranked(8, 3.0), r"temperature: 3 has no stored normaliser \(stored: 1, 2\)")
    one_line(lambda: uld_loss(zs, cached, ms, mt), "k: 45 ranked entries asked")  # ULD's k=None: every entry
    one_line(lambda: multilevel_ot_loss(zs, cached, ms, mt, k=32), "k: 32 ranked entries")
    one_line(lambda: multilevel_ot_loss(zs, cached, ms, mt, k=16, tau_sd=4.0), "temperature: 4 has no stored")
    assert float(multilevel_ot_loss(zs, cached, ms, mt, k=16, gamma=0.0, tau_sd=4.0).total_kd) > 0  # an unused tau is not read
    one_line(lambda: uld_loss(zs, cached[:2], ms, mt[:2], k=4), "batch mismatch")
    one_line(lambda: uld_loss(zs, cached, ms, mt[:, :3], k=4), "teacher_mask shape")
    one_line(lambda: RankedLogits.from_logits(zt, 0, (1.0,)), "width")
    one_line(lambda: RankedLogits.from_logits(zt, 4, ()), "temperatures must be a non-empty sequence")
    one_line(lambda: RankedLogits.from_logits(zt, 4, (1.0, 1.0)), "temperatures has a repeated value")
    one_line(lambda: RankedLogits.from_logits(zt, 4, (1.0, -2.0)), "temperatures")
    one_line(lambda: RankedLogits.from_logits(zt.masked_fill(zt > 2, float("nan")), 4, (1.0,)), "logits has non-finite")
    one_line(lambda: RankedLogits(cached.values, cached.log_normalizers[..., :1], (1.0, 2.0), 45), "log_normalizers shape")
    one_line(lambda: RankedLogits(cached.values, cached.log_normalizers, (1.0, 2.0), 10), "vocab")
    bad = RankedLogits(cached.values, cached.log_normalizers.masked_fill(cached.log_normalizers > 0, float("inf")), (1.0, 2.0), 45)
    one_line(lambda: uld_loss(zs, bad, ms, mt, k=4), "teacher_logits.log_normalizers has non-finite")


def test_docstring_examples_run():
    result = doctest.testmod(importlib.import_module("sinkd.ranked"), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted >= 3, result
