"""The combined objective: each term by hand, masks from labels, config from YAML-like dicts."""

import pytest
import torch
import torch.nn.functional as F

from sinkd import DistillationObjective, ObjectiveConfig, SinkhornConfig, divergence, sinkhorn_loss



def logits(seed, *shape):
    return 2 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_total_is_ce_plus_alpha_kd_plus_beta_sinkhorn():
    zs, zt = logits(0, 8, 5).requires_grad_(), logits(1, 8, 5)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    cfg = ObjectiveConfig(ce_weight=0.7, alpha=0.5, beta=2.0, temperature=3.0, divergence="js",
                          sinkhorn=SinkhornConfig(eps=0.2, temperature=1.5))
    out = DistillationObjective(cfg)(zs, zt, labels=labels)
    ce = F.cross_entropy(zs, labels)
    kd = divergence(zs, zt, "js", temperature=3.0)
    sink = sinkhorn_loss(zs, zt, eps=0.2, temperature=1.5)
    torch.testing.assert_close(out.loss, 0.7 * ce + 0.5 * kd + 2.0 * sink)
    for name, value in (("ce", ce), ("kd", kd), ("sinkhorn", sink)):
        assert out.as_dict()[name] == pytest.approx(value.item())
    out.loss.backward()
    assert torch.isfinite(zs.grad).all()


def test_paper_objective_gradcheck():
    zs, zt = logits(2, 6, 4).requires_grad_(), logits(3, 6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    objective = DistillationObjective(ObjectiveConfig.paper(alpha=0.3, beta=0.8))
    assert torch.autograd.gradcheck(lambda z: objective(z, zt, labels=labels).loss, (zs,))


def test_teacher_gets_no_gradient_and_zero_weights_skip_their_terms():
    zs, zt = logits(4, 5, 3).requires_grad_(), logits(5, 5, 3).requires_grad_()
    out = DistillationObjective(ObjectiveConfig(ce_weight=0, alpha=1.0, beta=0))(zs, zt)
    out.loss.backward()
    assert zt.grad is None
    assert out.as_dict()["sinkhorn"] == 0.0 and out.as_dict()["ce"] == 0.0 and out.as_dict()["kd"] > 0


def test_ignored_labels_mask_kd_and_sinkhorn_rows_for_tokens():
    zs, zt = logits(6, 2, 4, 7), logits(7, 2, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [3, -100, 4, 5]])
    keep = labels != -100
    cfg = ObjectiveConfig(alpha=1.0, beta=1.0)
    out = DistillationObjective(cfg)(zs, zt, labels=labels)
    torch.testing.assert_close(out.kd, divergence(zs[keep], zt[keep], "kl"))
    torch.testing.assert_close(out.sinkhorn, sinkhorn_loss(zs[keep], zt[keep]))
    torch.testing.assert_close(out.ce, F.cross_entropy(zs[keep], labels[keep]))


def test_from_dict_round_trip():
    cfg = ObjectiveConfig.from_dict({"alpha": 0.5, "divergence": "skew_kl", "sinkhorn": {"eps": 0.05, "group_size": 128}})
    assert cfg.sinkhorn.eps == 0.05 and cfg.sinkhorn.group_size == 128 and cfg.divergence == "skew_kl"
    assert ObjectiveConfig.from_dict(cfg.to_dict()) == cfg
    assert ObjectiveConfig.from_dict({"sinkhorn": SinkhornConfig(eps=0.3)}).sinkhorn.eps == 0.3
    assert ObjectiveConfig.from_dict(None) == ObjectiveConfig.from_dict({}) == ObjectiveConfig()


@pytest.mark.parametrize(
    "values,message",
    [  # dotted keys relative to the mapping passed; the pipeline adds "objective." itself
        ({"betta": 1.0}, "betta: unknown key; valid: "),
        ({"sinkhorn": {"iters": 5}}, "sinkhorn.iters: unknown key; valid: "),
        ({"sinkhorn": {"eps": 0}}, "sinkhorn.eps must be a finite number > 0, got 0"),
        ({"sinkhorn": {"slice_elements": 0}}, "sinkhorn.slice_elements must be an integer >= 1, got 0"),
        ({"sinkhorn": {"mode": "sample", "grad": "envelope"}}, "sinkhorn.grad: 'envelope' needs"),
        ({"sinkhorn": [1, 2]}, "sinkhorn must be a mapping, got list"),
        ({"sinkhorn": None}, "sinkhorn must be a mapping, got NoneType"),
        ({"alpha": -1}, "alpha must be a finite number >= 0, got -1"),
        ({"divergence": "kld"}, "divergence: unknown value 'kld'; valid: kl, rkl, js, tvd, skew_kl, skew_rkl"),
    ],
)
def test_from_dict_errors_start_with_the_dotted_key(values, message):
    with pytest.raises(ValueError) as err:
        ObjectiveConfig.from_dict(values)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text and not text.startswith("objective"), text


def test_from_dict_refuses_a_non_mapping_and_direct_construction_names_fields():
    with pytest.raises(TypeError, match="^ObjectiveConfig.from_dict expects a mapping, got list$"):
        ObjectiveConfig.from_dict([("alpha", 1.0)])
    with pytest.raises(ValueError, match="^alpha must be a finite number >= 0"):
        ObjectiveConfig(alpha=-1)
    with pytest.raises(ValueError, match="^sinkhorn must be a SinkhornConfig, got dict$"):
        ObjectiveConfig(sinkhorn={"eps": 0.1})


def test_missing_labels_or_bad_label_shape_are_rejected():
    zs, zt = logits(8, 4, 3), logits(9, 4, 3)
    with pytest.raises(ValueError, match="labels are required when ce_weight > 0"):
        DistillationObjective()(zs, zt)
    with pytest.raises(ValueError, match="labels shape \\(3,\\) must equal the logits' row shape \\(4,\\)"):
        DistillationObjective()(zs, zt, labels=torch.zeros(3, dtype=torch.long))


def test_topk_teacher_objective_equals_dense_at_k_equal_v_and_is_close_below():
    """A logit cache's teacher (top-k + rest) gives the live-teacher objective exactly when k = V,
    and within a few percent for a peaked teacher at k = V / 4 (the top-k approximation)."""
    from sinkd import TopKDistribution

    V = 64
    zs, zt = logits(40, 3, 10, V).requires_grad_(), 4 * logits(41, 3, 10, V)
    labels = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = -100  # prompt / padding tokens: out of every term
    objective = DistillationObjective(ObjectiveConfig(alpha=1.0, beta=1.0, temperature=2.0,
                                                      sinkhorn=SinkhornConfig.paper(group_size=8)))
    dense = objective(zs, zt, labels=labels)
    exact = objective(zs, TopKDistribution.from_logits(zt, V), labels=labels)
    for name in ("loss", "kd", "sinkhorn"):
        assert exact.as_dict()[name] == pytest.approx(dense.as_dict()[name], rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(exact.loss, zs)[0], torch.autograd.grad(dense.loss, zs)[0])
    approx = objective(zs, TopKDistribution.from_logits(zt, V // 4), labels=labels)
    assert approx.as_dict()["loss"] == pytest.approx(dense.as_dict()["loss"], rel=0.05)
    assert approx.as_dict()["ce"] == dense.as_dict()["ce"]
