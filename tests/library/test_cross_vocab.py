"""sinkd.cross_vocab (ranked distributions, ULD, MultiLevelOT) against independent references: hand-written
numpy formulas, POT in float64 and the official plain Sinkhorn loop; gradients by gradcheck; padding
invariance; one-line errors for bad input."""

import doctest
import importlib

import numpy as np
import ot
import pytest
import torch

from sinkd import MultiLevelOTConfig, multilevel_ot_loss, ranked_probs, uld_loss

TINY = np.finfo(np.float64).tiny


def random_batch(seed, b=3, t_s=6, t_t=8, v_s=11, v_t=17, keep=0.7):
    """Logits of two vocabularies and non-contiguous masks with at least one real token a row."""
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t_s, v_s, generator=gen) * 2
    zt = torch.randn(b, t_t, v_t, generator=gen) * 2
    ms = torch.rand(b, t_s, generator=gen) < keep
    mt = torch.rand(b, t_t, generator=gen) < keep
    ms[:, 0] = True
    mt[:, -1] = True
    return zs, zt, ms, mt


# ---- hand-written references (numpy, one sequence at a time) -------------------------------------

def ref_ranked(z, k, temperature=1.0):
    """softmax(z / T) sorted descending, truncated or zero-padded to k (None: all)."""
    x = np.asarray(z, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p = np.sort(p / p.sum())[::-1]
    k = len(p) if k is None else k
    out = np.zeros(k)
    out[: min(k, len(p))] = p[:k]
    return out


def real_rows(z, m, k, temperature):
    """Ranked vectors of the real rows of one sequence, in order: (n, k)."""
    return np.stack([ref_ranked(row, k, temperature) for row, keep in zip(z.numpy(), m.numpy()) if keep])


def ref_uld(zs, zt, ms, mt, k=None, temperature=1.0, reduction="sequence"):
    width = k or max(zs.shape[-1], zt.shape[-1])
    sums, counts = [], []
    for b in range(zs.shape[0]):
        s = real_rows(zs[b], ms[b], width, temperature)
        t = real_rows(zt[b], mt[b], width, temperature)
        n = min(len(s), len(t))
        sums.append(np.abs(s[:n] - t[:n]).sum())
        counts.append(n)
    sums, counts = np.array(sums), np.array(counts)
    return (sums / counts).mean() if reduction == "sequence" else sums.sum() / counts.sum()


def ref_had_sl(zs, zt, ms, mt, k, tau_had=1.0, tau_sl=1.0):
    had, sl = [], []
    for b in range(zs.shape[0]):
        s, t = real_rows(zs[b], ms[b], k, tau_had), real_rows(zt[b], mt[b], k, tau_had)
        n = min(len(s), len(t))
        had.append(np.abs(t[:n] - s[:n]).sum(-1).mean())
        s, t = real_rows(zs[b], ms[b], k, tau_sl), real_rows(zt[b], mt[b], k, tau_sl)
        sl.append(-(t[:n] * np.log(np.maximum(s[:n], TINY))).sum(-1).mean())
    return np.mean(had), np.mean(sl)


def sequence_costs(zs, zt, ms, mt, k, tau_sd=2.0):
    """Per sequence the (n_t, n_s) L1 cost between the real teacher and student ranked vectors."""
    costs = []
    for b in range(zs.shape[0]):
        t, s = real_rows(zt[b], mt[b], k, tau_sd), real_rows(zs[b], ms[b], k, tau_sd)
        costs.append(np.abs(t[:, None, :] - s[None, :, :]).sum(-1))
    return costs


def official_plain_loop(cost, eps=0.1, n_iter=20):
    """The official formulation: K = exp(-C / eps), n_iter row-then-column normalisations, sum(P * C)."""
    plan = np.exp(-cost / eps)
    for _ in range(n_iter):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return (plan * cost).sum()


def one_line_error(fn, match, kind=ValueError):
    with pytest.raises(kind, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


# ---- ranked distributions ---------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 17, 30, None])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_ranked_probs_match_sorted_softmax(k, temperature):
    z = torch.randn(4, 3, 17, generator=torch.Generator().manual_seed(0)) * 3
    got = ranked_probs(z, k, temperature)
    ref = np.stack([ref_ranked(row, k, temperature) for row in z.reshape(-1, 17).numpy()])
    assert got.shape == (4, 3, 17 if k is None else k)
    np.testing.assert_allclose(got.reshape(12, -1).numpy(), ref, rtol=1e-12, atol=1e-15)


def test_ranked_probs_masked_tokens_rows_and_half_inputs():
    z = torch.tensor([[0.0, -float("inf"), 1.0, -float("inf")], [2.0, 0.0, 0.0, 0.0]])
    got = ranked_probs(z, 6, mask=torch.tensor([True, False]))
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    np.testing.assert_allclose(got.numpy(), [[p[0], p[1], 0, 0, 0, 0], [0] * 6], atol=1e-15)
    half = ranked_probs(torch.randn(2, 9).half(), 3)
    assert half.dtype == torch.float32 and half.shape == (2, 3)


# ---- ULD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,k,reduction,temperature", [(0, None, "sequence", 1.0), (1, 8, "sequence", 2.0),
                                                          (2, 40, "token", 1.0), (3, None, "token", 0.7)])
def test_uld_matches_hand_written_formula(seed, k, reduction, temperature):
    zs, zt, ms, mt = random_batch(seed)
    got = uld_loss(zs, zt, ms, mt, k=k, temperature=temperature, reduction=reduction)
    ref = ref_uld(zs, zt, ms, mt, k, temperature, reduction)
    np.testing.assert_allclose(got.item(), ref, rtol=1e-12)
    assert got.item() > 0.05  # not trivially zero


def test_uld_pairs_the_first_tokens_of_the_shorter_side():
    zs, zt, _, _ = random_batch(4, b=1, t_s=3, t_t=5)
    # teacher tokens 3 and 4 have no student partner: changing them leaves ULD unchanged
    zt2 = zt.clone()
    zt2[0, 3:] = torch.randn(2, zt.shape[-1])
    assert uld_loss(zs, zt2).item() == pytest.approx(uld_loss(zs, zt).item(), abs=1e-14)
    zt2[0, 1] *= 2.0  # a paired token (sharper) does change it
    assert abs(uld_loss(zs, zt2).item() - uld_loss(zs, zt).item()) > 1e-4


# ---- MultiLevelOT: HAD, SL, SD ------------------------------------------------------------------

@pytest.mark.parametrize("seed,k,tau_had,tau_sl", [(0, 50, 1.0, 1.0), (1, 5, 1.0, 1.5), (2, 13, 0.8, 1.0)])
def test_had_and_sl_match_hand_written_formulas(seed, k, tau_had, tau_sl):
    zs, zt, ms, mt = random_batch(seed)  # V_s = 11, V_t = 17: k = 13 and 50 pad the student with zeros
    out = multilevel_ot_loss(zs, zt, ms, mt, k=k, tau_had=tau_had, tau_sl=tau_sl)
    had, sl = ref_had_sl(zs, zt, ms, mt, k, tau_had, tau_sl)
    np.testing.assert_allclose(out.had.item(), had, rtol=1e-12)
    np.testing.assert_allclose(out.sl.item(), sl, rtol=1e-12)
    cfg = MultiLevelOTConfig(k=k)
    np.testing.assert_allclose(out.total_kd.item(), cfg.alpha * (out.had + cfg.beta * out.sl + cfg.gamma * out.sd).item(), rtol=1e-14)


@pytest.mark.parametrize("seed,k,eps", [(0, 50, 0.1), (1, 6, 0.05), (2, 20, 0.3)])
def test_sd_converged_matches_pot_per_sequence(seed, k, eps):
    zs, zt, ms, mt = random_batch(seed)
    out = multilevel_ot_loss(zs, zt, ms, mt, k=k, eps=eps, max_iter=100_000, tol=1e-13)
    values = []
    for cost in sequence_costs(zs, zt, ms, mt, k):
        n_t, n_s = cost.shape
        plan = ot.sinkhorn(np.full(n_t, 1 / n_t), np.full(n_s, 1 / n_s), cost, eps, method="sinkhorn_log",
                           numItermax=100_000, stopThr=1e-14)
        np.testing.assert_allclose(plan.sum(0), 1 / n_s, rtol=1e-10)  # POT converged too
        values.append((plan * cost).sum())
    np.testing.assert_allclose(out.sd.item(), np.mean(values), rtol=1e-9)
    assert out.sd.item() > 1e-3


@pytest.mark.parametrize("seed,n_iter", [(0, 20), (5, 1), (6, 3)])
def test_sd_fixed_iterations_match_the_official_plain_loop(seed, n_iter):
    """Uniform marginals 1/n_t, 1/n_s vs the official all-ones loop on the same n_t x n_s cost:
    after any number of full iterations the official value is n_s times ours."""
    zs, zt, ms, mt = random_batch(seed, t_s=7, t_t=5)
    out = multilevel_ot_loss(zs, zt, ms, mt, max_iter=n_iter)
    ref = [official_plain_loop(c, 0.1, n_iter) / c.shape[1] for c in sequence_costs(zs, zt, ms, mt, 50)]
    np.testing.assert_allclose(out.sd.item(), np.mean(ref), rtol=1e-11)


def test_sd_grad_modes_agree_at_convergence():
    zs, zt, ms, mt = random_batch(7)
    grads = []
    for grad in ("unrolled", "implicit"):
        x = zs.clone().requires_grad_()
        out = multilevel_ot_loss(x, zt, ms, mt, grad=grad, max_iter=3000, tol=1e-13)
        out.sd.backward()
        grads.append(x.grad)
    assert grads[0].abs().max() > 1e-4
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


# ---- gradients ------------------------------------------------------------------------------------

def small_inputs(seed=11):
    zs, zt, ms, mt = random_batch(seed, b=2, t_s=3, t_t=4, v_s=5, v_t=6, keep=1.0)
    ms[0, 1] = False  # one padded row on each side, in the middle and at the end
    mt[1, 3] = False
    return zs.requires_grad_(), zt.requires_grad_(), ms, mt


def test_gradcheck_multilevel_ot_unrolled():
    zs, zt, ms, mt = small_inputs()
    fn = lambda a, b: multilevel_ot_loss(a, b, ms, mt, alpha=1.0, beta=0.5, gamma=0.5, k=4).total_kd  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs, zt))


def test_gradcheck_multilevel_ot_implicit_at_convergence():
    zs, zt, ms, mt = small_inputs(12)
    fn = lambda a, b: multilevel_ot_loss(a, b, ms, mt, k=4, grad="implicit", max_iter=2000, tol=1e-13).sd  # noqa: E731
    assert torch.autograd.gradcheck(fn, (zs, zt), atol=1e-6)


def test_gradcheck_uld():
    zs, zt, ms, mt = small_inputs(13)
    assert torch.autograd.gradcheck(lambda a, b: uld_loss(a, b, ms, mt), (zs, zt))
    assert torch.autograd.gradcheck(lambda a, b: uld_loss(a, b, ms, mt, k=3, reduction="token"), (zs, zt))


def test_masked_tokens_and_k_beyond_the_vocabulary_keep_everything_finite():
    zs, zt, ms, mt = random_batch(14, v_s=5)
    zs[..., 1] = -float("inf")  # a masked token on the student side
    zt[:, :, :3] = -float("inf")
    zs.requires_grad_()
    out = multilevel_ot_loss(zs, zt, ms, mt, k=12)  # beyond V_s = 5
    out.total_kd.backward()
    assert all(np.isfinite(v) for v in out.as_dict().values())
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().max() > 0
    assert zs.grad[..., 1].abs().max() == 0


# ---- padding invariance ---------------------------------------------------------------------------

def pad_with_noise(z, m, extra, seed):
    """Insert `extra` padded rows (random logits, mask False) at random positions."""
    gen = torch.Generator().manual_seed(seed)
    b, t, v = z.shape
    where = torch.randperm(t + extra, generator=gen)[:t].sort().values
    z2 = torch.randn(b, t + extra, v, generator=gen) * 5
    m2 = torch.zeros(b, t + extra, dtype=torch.bool)
    z2[:, where] = z
    m2[:, where] = m
    return z2, m2, where


def test_padding_does_not_change_the_losses_or_the_gradients_of_real_rows():
    zs, zt, ms, mt = random_batch(15)
    zs2, ms2, where_s = pad_with_noise(zs, ms, 4, 1)
    zt2, mt2, _ = pad_with_noise(zt, mt, 3, 2)
    for loss in (lambda a, b, c, d: multilevel_ot_loss(a, b, c, d).total_kd, uld_loss):
        x, x2 = zs.clone().requires_grad_(), zs2.clone().requires_grad_()
        base, padded = loss(x, zt, ms, mt), loss(x2, zt2, ms2, mt2)
        assert base.item() > 0
        np.testing.assert_allclose(padded.item(), base.item(), rtol=1e-12)
        base.backward()
        padded.backward()
        torch.testing.assert_close(x2.grad[:, where_s], x.grad, rtol=1e-10, atol=1e-14)
    out, out2 = multilevel_ot_loss(zs, zt, ms, mt), multilevel_ot_loss(zs2, zt2, ms2, mt2)
    for name in ("had", "sl", "sd"):
        np.testing.assert_allclose(getattr(out2, name).item(), getattr(out, name).item(), rtol=1e-12)


def test_zero_weights_skip_their_terms_and_config_round_trips():
    zs, zt, ms, mt = random_batch(16)
    out = multilevel_ot_loss(zs, zt, ms, mt, MultiLevelOTConfig(beta=0.0, gamma=0.0, alpha=2.0))
    assert out.sl.item() == 0 and out.sd.item() == 0
    np.testing.assert_allclose(out.total_kd.item(), 2.0 * out.had.item(), rtol=1e-14)
    cfg = MultiLevelOTConfig(k=7, grad="implicit")
    assert MultiLevelOTConfig.from_dict(cfg.to_dict()) == cfg
    assert MultiLevelOTConfig.from_dict(None) == MultiLevelOTConfig()
    assert MultiLevelOTConfig(k=np.int64(5)).k == 5 and type(MultiLevelOTConfig(k=np.int64(5)).k) is int


def test_half_inputs_compute_in_float32_and_a_mapping_config_works():
    zs, zt, ms, mt = random_batch(18)
    ref = multilevel_ot_loss(zs.float(), zt.float(), ms, mt, {"k": 8})
    out = multilevel_ot_loss(zs.half(), zt.bfloat16(), ms, mt, {"k": 8})
    assert out.total_kd.dtype == torch.float32
    for name in ("had", "sl", "sd"):
        np.testing.assert_allclose(getattr(out, name).item(), getattr(ref, name).item(), rtol=2e-2)
    loss = uld_loss(zs.half(), zt.half(), ms, mt)
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), uld_loss(zs, zt, ms, mt).item(), rtol=2e-2)


# ---- bad input --------------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors_naming_the_argument():
    zs, zt, ms, mt = random_batch(17, b=3, t_s=5, t_t=4)
    one_line_error(lambda: uld_loss(zs[0], zt), r"student_logits must have shape \(B, T, V\), got \(5, 11\)")
    one_line_error(lambda: multilevel_ot_loss(zs, zt[:2]), "batch mismatch: student_logits has B=3 sequences, teacher_logits has B=2")
    one_line_error(lambda: multilevel_ot_loss(zs, zt, ms[:, :4], mt), r"student_mask shape \(3, 4\) must equal student_logits' \(B, T\) = \(3, 5\)")
    one_line_error(lambda: uld_loss(zs, zt, ms, mt.T), r"teacher_mask shape \(4, 3\) must equal")
    empty = mt.clone()
    empty[1] = False
    one_line_error(lambda: multilevel_ot_loss(zs, zt, ms, empty), "teacher_mask row 1 has no real token")
    one_line_error(lambda: uld_loss(zs, zt, torch.zeros_like(ms), mt), "student_mask row 0 has no real token")
    one_line_error(lambda: uld_loss(zs, zt, ms.long() * 2, mt), "student_mask must be boolean")
    nan = zs.clone()
    nan[2, 1, 3] = float("nan")
    one_line_error(lambda: multilevel_ot_loss(nan, zt), r"student_logits has non-finite values \(first at index \(2, 1, 3\)\)")
    inf = zt.clone()
    inf[0, 0, 0] = float("inf")
    one_line_error(lambda: uld_loss(zs, inf), "teacher_logits has non-finite values")
    one_line_error(lambda: ranked_probs(torch.tensor([1.0, float("nan")]), 2), "logits has non-finite values")
    one_line_error(lambda: ranked_probs(zs, 0), "k must be an integer >= 1, got 0")
    one_line_error(lambda: uld_loss(zs, zt, k=0), "k must be an integer >= 1, got 0")
    one_line_error(lambda: multilevel_ot_loss(zs, zt, k=0), "k must be an integer >= 1, got 0")
    one_line_error(lambda: ranked_probs(zs, 3, mask=ms[:, :2]), r"mask shape \(3, 2\) must equal the logits' row shape \(3, 5\)")
    one_line_error(lambda: uld_loss(zs, zt, reduction="mean"), "reduction: unknown value 'mean'")
    one_line_error(lambda: MultiLevelOTConfig(grad="envelope"), "grad: unknown value 'envelope'; valid: unrolled, implicit")
    one_line_error(lambda: MultiLevelOTConfig(tau_sd=0), "tau_sd must be a finite number > 0, got 0")
    one_line_error(lambda: MultiLevelOTConfig.from_dict({"lambda": 0.1, "k": 5}), "lambda: unknown key; valid: alpha, beta, eps")
    one_line_error(lambda: uld_loss(zs.long(), zt), "student_logits must be floating point", TypeError)
    one_line_error(lambda: multilevel_ot_loss(zs, zt, ms, mt, {"iterations": 5}), "iterations: unknown key")


def test_docstring_examples_run():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user's session
    try:
        result = doctest.testmod(importlib.import_module("sinkd.cross_vocab"), optionflags=doctest.NORMALIZE_WHITESPACE)
    finally:
        torch.set_default_dtype(previous)
    assert result.failed == 0 and result.attempted >= 8, result
