"""Student-generated outputs (lm.sgo: GKD mixing, DistiLLM replay) without Ray: the draws, batched
sampling against one prompt at a time, the rebuilt batch, the replay buffer, the task's rows on a
generated batch (teacher scored on the samples, no CE on them), and the config's one-line errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm_helpers import EngineLike

from pipelines.config import Config, ConfigError, set_key
from pipelines.tasks import checked_config, get_task
from pipelines.tasks.causal_lm.data import IGNORE
from pipelines.tasks.causal_lm.models import CausalLM, load_causal_lm
from pipelines.tasks.causal_lm.sgo import (BUFFER, FRESH, REPLAY, batch_source, generated_batch, prompt_lengths,
                                           push_rows, replayable, replayed_batch, sample_continuations)
from pipelines.tasks.common import student_from_teacher_layers


def student_generates(seed: int, fraction: float, epoch: int, micro: int) -> bool:
    return batch_source(SimpleNamespace(mode="mixed", fraction=fraction), seed, epoch, micro, 0.0) == FRESH


def test_the_coin_has_the_asked_frequency_and_is_a_function_of_seed_epoch_and_micro_batch():
    draws = [student_generates(0, 0.3, epoch, micro) for epoch in range(4) for micro in range(500)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [student_generates(0, 0.3, epoch, micro) for epoch in range(4) for micro in range(500)]
    assert draws != [student_generates(1, 0.3, epoch, micro) for epoch in range(4) for micro in range(500)]
    assert not any(student_generates(0, 0.0, 0, m) for m in range(200))
    assert all(student_generates(0, 1.0, 0, m) for m in range(200))


def sgo(**over):
    return SimpleNamespace(**{"max_new_tokens": 5, "temperature": 0.0, "top_p": 1.0, "top_k": 0, **over})


@pytest.fixture(scope="module")
def student(tiny_llama):
    torch.manual_seed(0)
    return student_from_teacher_layers(load_causal_lm(str(tiny_llama)), [0, 3]).eval()


PROMPTS = [[5, 17, 300, 41], [9, 8], [1200, 7, 77, 3000, 12, 6]]


def test_batched_left_padded_sampling_equals_each_prompt_alone(student):
    """Greedy: positions follow the attention mask, so a short prompt padded on the left continues as it
    would alone; sampled: a function of the torch seed."""
    batched = sample_continuations(student, PROMPTS, 2, sgo())
    assert batched.shape == (3, 5)
    for prompt, row in zip(PROMPTS, batched):
        assert torch.equal(sample_continuations(student, [prompt], 2, sgo())[0], row)
    torch.manual_seed(3)
    a = sample_continuations(student, PROMPTS, 2, sgo(temperature=1.0))
    torch.manual_seed(3)
    b = sample_continuations(student, PROMPTS, 2, sgo(temperature=1.0))
    torch.manual_seed(4)
    c = sample_continuations(student, PROMPTS, 2, sgo(temperature=1.0))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_end_token_is_suppressed_so_every_prompt_gets_exactly_max_new_tokens(student):
    first = int(sample_continuations(student, PROMPTS[:1], 2, sgo(max_new_tokens=1))[0, 0])
    eos = student.generation_config.eos_token_id
    student.generation_config.eos_token_id = first  # the token greedy decoding would stop on
    try:
        out = sample_continuations(student, PROMPTS[:1], 2, sgo(max_new_tokens=4))
    finally:
        student.generation_config.eos_token_id = eos
    assert out.shape == (1, 4) and first not in out[0].tolist()


def prompt_batch():
    """Rows as LMCollate pads them: two prompt/response rows and one padding row."""
    rows = [([5, 17, 300, 41], [60, 61, 2]), ([9, 8], [70, 2])]
    width = 7
    ids = torch.full((3, width), 2)
    labels = torch.full((3, width), IGNORE)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        mask[i, :len(p) + len(r)] = 1
    ids[2], mask[2] = 0, 1  # the padding row: id -1, zeros, no labels
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "ids": torch.tensor([4, 9, -1])}


def test_generated_batch_keeps_the_prompts_labels_only_the_new_tokens_and_leaves_padding_rows(student):
    b = prompt_batch()
    assert prompt_lengths(b["labels"]).tolist() == [4, 2, 0]
    out = generated_batch(student, b, 2, sgo(max_new_tokens=3))
    new = sample_continuations(student, [PROMPTS[0], [9, 8]], 2, sgo(max_new_tokens=3))
    assert out["input_ids"].shape == (3, 7)  # the longer of 4 + 3 and the padding row's 7
    assert out["input_ids"][0].tolist() == [5, 17, 300, 41, *new[0].tolist()]
    assert out["labels"][0].tolist() == [IGNORE] * 4 + new[0].tolist()
    assert out["input_ids"][1, :5].tolist() == [9, 8, *new[1].tolist()]
    assert out["labels"][1].tolist() == [IGNORE] * 2 + new[1].tolist() + [IGNORE] * 2
    assert out["attention_mask"][1].tolist() == [1] * 5 + [0] * 2
    assert torch.equal(out["input_ids"][2], b["input_ids"][2]) and (out["labels"][2] == IGNORE).all()
    assert torch.equal(out["ids"], b["ids"])
    # Without a padding row the rebuilt batch is as wide as its longest prompt + new tokens, here
    # narrower than the data's rows (the longer response is not kept).
    two = {k: v[:2] for k, v in b.items()}
    narrow = generated_batch(student, two, 2, sgo(max_new_tokens=1))
    assert narrow["input_ids"].shape == (2, 5) and narrow["labels"][0].tolist() == [IGNORE] * 4 + new[0, :1].tolist()


def test_under_zero3_a_batch_without_prompts_still_generates_and_replay_waits_for_every_rank(student, monkeypatch):
    """ZeRO-3 over several ranks gathers the student's weights at every generated token: a rank whose
    micro-batch holds padding rows only must run `generate` too (synced: on one placeholder token,
    the batch returned as it was), and a buffer replays only when every rank's has rows."""
    calls = []
    real_generate = type(student).generate

    def counted(self, *args, **kwargs):
        calls.append((kwargs["input_ids"].tolist(), kwargs["synced_gpus"]))
        return real_generate(self, *args, **{**kwargs, "synced_gpus": False})  # no process group here

    monkeypatch.setattr(type(student), "generate", counted)
    padding = {k: v[2:] for k, v in prompt_batch().items()}  # the padding row alone
    assert generated_batch(student, padding, 2, sgo(max_new_tokens=2)) is padding and calls == []  # alone: no need
    assert generated_batch(student, padding, 2, sgo(max_new_tokens=2), synced=True) is padding
    assert calls == [([[2]], True)]
    generated_batch(student, prompt_batch(), 2, sgo(max_new_tokens=2), synced=True)
    assert calls[1][1] is True and len(calls[1][0]) == 2  # the two prompts, synced

    def ranks(empty_elsewhere: int):  # all_sum adds this rank's "empty" flag to the other ranks' count
        return SimpleNamespace(all_sum=lambda v: [v[0] + empty_elsewhere])

    assert replayable(ranks(1), [[1], [2]], synced=False)  # alone, its own buffer decides
    assert not replayable(ranks(1), [[1], [2]], synced=True)  # another rank's buffer is still empty
    assert replayable(ranks(0), [[1], [2]], synced=True)
    assert not replayable(ranks(0), [], synced=True) and not replayable(ranks(0), [], synced=False)


def worker(tiny_llama, student, **sgo_over):
    cfg = Config.from_dict({"task_type": "causal_lm", "run_dir": "/tmp/unused", "data": {"files": {"train": "x.jsonl"}},
                            "teacher": {"path": str(tiny_llama)}, "lm": {"format": "prompt_response",
                            "sgo": {"mode": "mixed", "fraction": 1.0, "max_new_tokens": 3, "temperature": 0.0, **sgo_over}}})
    teacher = CausalLM(load_causal_lm(str(tiny_llama)).eval())
    return SimpleNamespace(cfg=cfg, teacher=teacher, device=torch.device("cpu"), engine=EngineLike(CausalLM(student)),
                           stage=SimpleNamespace(objective={"alpha": 1.0}, train=SimpleNamespace(epochs=1, zero_stage=2)), world=1,
                           meta=SimpleNamespace(pad_token_id=2, batches_per_epoch=100), position=(0, 0), rank=0, task_state={})


def test_a_generated_batch_is_scored_by_the_teacher_on_the_samples_without_ce(tiny_llama, student):
    task = get_task("causal_lm")
    w = worker(tiny_llama, student)
    b = prompt_batch()
    gen = generated_batch(student, b, 2, sgo(max_new_tokens=3))
    rows = task.forward(w, b)
    inputs = {"input_ids": gen["input_ids"], "attention_mask": gen["attention_mask"]}
    with torch.no_grad():
        assert torch.equal(rows.teacher, w.teacher(**inputs)[:, :-1].float())
    assert torch.equal(rows.extra["mask"], gen["labels"][:, 1:] != IGNORE) and int(rows.extra["mask"].sum()) == 6
    assert (rows.labels == IGNORE).all()
    objective = task.objective({"alpha": 1.0, "beta": 0.0, "ce_weight": 1.0})
    out = objective(rows)
    reference = objective.loss(rows.student, rows.teacher, labels=gen["labels"][:, 1:])  # the same rows with CE
    assert out.ce.item() == 0.0 and out.kd.item() == pytest.approx(reference.kd.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(reference.kd.item(), rel=1e-6)

    w_ce = worker(tiny_llama, student, ce_on_generated=True)
    rows_ce = task.forward(w_ce, b)
    assert torch.equal(rows_ce.labels, gen["labels"][:, 1:]) and "mask" not in rows_ce.extra
    assert objective(rows_ce).ce.item() == pytest.approx(reference.ce.item(), rel=1e-6)


def test_fraction_0_and_fine_tuning_stages_train_on_the_data(tiny_llama, student):
    task = get_task("causal_lm")
    b = prompt_batch()
    for w in (worker(tiny_llama, student, fraction=0.0), worker(tiny_llama, student)):
        if w.cfg.lm.sgo.fraction == 1.0:
            w.stage.objective = None  # a fine-tuning stage never samples
        rows = task.forward(w, b)
        assert torch.equal(rows.labels, b["labels"][:, 1:]) and "mask" not in rows.extra


def lm_raw(tiny_llama, wiki_path, **over) -> dict:
    raw = {"task_type": "causal_lm", "run_dir": "/tmp/sgo_unused",
           "data": {"files": {"train": str(wiki_path)}, "max_length": 64},
           "lm": {"format": "prompt_continuation", "sgo": {"mode": "mixed"}},
           "teacher": {"path": str(tiny_llama)},
           "student": {"init": "teacher_layers", "layers": [0, 3]}, "train": {"zero_stage": 2}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


def test_a_sound_sgo_job_checks(tiny_llama, wiki_path):
    cfg = checked_config(lm_raw(tiny_llama, wiki_path))
    assert cfg.lm.sgo.mode == "mixed" and cfg.lm.sgo.fraction == 0.5


@pytest.mark.parametrize("over, message", [
    ({"lm.sgo.fraction": 1.5}, r"^lm\.sgo\.fraction: must be in \[0, 1\], got 1\.5$"),
    ({"lm.sgo.fraction": -0.1}, r"^lm\.sgo\.fraction: must be in \[0, 1\], got -0\.1$"),
    ({"lm.sgo.max_new_tokens": 200}, r"^lm\.sgo\.max_new_tokens: prompts of up to data\.max_length=64 tokens \+ 200 new "
                                     r"tokens exceed the model context of 256 tokens$"),
    ({"lm.sgo.max_new_tokens": 0}, r"^lm\.sgo\.max_new_tokens: must be > 0, got 0$"),
    ({"lm.format": "packed"}, r"^lm\.sgo\.mode: the student continues prompts; use lm\.format"),
    ({"lm.cache.enabled": True}, r"^lm\.sgo\.mode: student-generated batches are scored by a live teacher"),
    ({"lm.sgo.top_p": 0.0}, r"^lm\.sgo\.temperature / top_p / top_k: need"),
    ({"lm.sgo.temperature": -1.0}, r"^lm\.sgo\.temperature / top_p / top_k: need"),
    ({"lm.sgo.mode": None, "lm.sgo.fraction": 0.2}, r"^lm\.sgo: its settings are used only with lm\.sgo\.mode: mixed or replay$"),
    ({"lm.sgo.mode": "on_policy"}, r"lm\.sgo\.mode"),
    ({"lm.sgo.mode": "replay", "lm.sgo.replay_capacity": 0}, r"^lm\.sgo\.replay_capacity: must be > 0, got 0$"),
])
def test_bad_sgo_settings_fail_up_front_with_one_line(tiny_llama, wiki_path, over, message):
    with pytest.raises(ConfigError, match=message) as err:
        checked_config(lm_raw(tiny_llama, wiki_path, **over))
    assert "\n" not in str(err.value)


def test_the_cross_tokenizer_task_refuses_sgo(tmp_path, tiny_llama, wiki_path):
    from llm_helpers import cross_job

    raw = cross_job(tmp_path, tiny_llama, wiki_path, **{"lm.sgo.mode": "mixed"})
    with pytest.raises(ConfigError, match=r"^lm\.sgo\.mode: student-generated batches are causal_lm's"):
        checked_config(raw)


def test_shipped_sgo_config_and_tune_space_check_and_toggle_to_the_comparisons():
    from pathlib import Path

    from pipelines.recipes.tune import check_space_against_config
    from pipelines.recipes.tune_space import load_space
    from pipelines.tasks import load_checked_config

    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "smollm2_sgo.yaml"
    cfg = load_checked_config(config)
    assert cfg.lm.sgo.mode == "mixed" and cfg.lm.format == "prompt_continuation" and not cfg.lm.cache.enabled
    check_space_against_config(cfg, load_space(config.parents[2] / "tune_spaces" / "sgo_causal_lm.yaml"))
    kd = load_checked_config(config, ["lm.sgo={}"])
    okd_sinkd = load_checked_config(config, ["lm.sgo={}", "teacher.online.kind=residual_adapter", "objective.beta=1.0"])
    assert kd.lm.sgo.mode is None and okd_sinkd.teacher.online.kind == "residual_adapter"
    fingerprints = {str(get_task("causal_lm").fingerprint(c)) for c in (cfg, kd, okd_sinkd)}
    assert len(fingerprints) == 3  # a run directory trained one way refuses to resume another


def test_replay_draws_fresh_samples_early_and_buffer_rows_late_at_the_asked_rates():
    g = SimpleNamespace(mode="replay", fraction=0.8)
    for progress, fresh, replay in ((0.0, 0.8, 0.0), (0.5, 0.4, 0.4), (0.9, 0.08, 0.72)):
        draws = [batch_source(g, 0, 0, m, progress) for m in range(3000)]
        assert abs(draws.count(FRESH) / 3000 - fresh) < 0.03 and abs(draws.count(REPLAY) / 3000 - replay) < 0.03
    mixed = SimpleNamespace(mode="mixed", fraction=0.8)  # mixing ignores progress
    assert [batch_source(mixed, 0, 0, m, 0.9) == FRESH for m in range(50)] == [student_generates(0, 0.8, 0, m) for m in range(50)]


def test_the_buffer_keeps_labelled_rows_without_padding_first_in_first_out():
    b = prompt_batch()
    buffer = []
    push_rows(buffer, b, capacity=3)
    assert buffer == [[[5, 17, 300, 41, 60, 61, 2], [IGNORE] * 4 + [60, 61, 2]], [[9, 8, 70, 2], [IGNORE] * 2 + [70, 2]]]
    push_rows(buffer, b, capacity=3)
    assert len(buffer) == 3 and buffer[0][0] == [9, 8, 70, 2]  # the oldest row left

    out = replayed_batch(buffer, b, 2, np.random.default_rng(0))
    rows = [[out["input_ids"][i, :int(out["attention_mask"][i].sum())].tolist(),
             out["labels"][i, :int(out["attention_mask"][i].sum())].tolist()] for i in range(2)]
    assert all(r in buffer for r in rows) and rows[0] != rows[1]  # two distinct buffer rows
    assert torch.equal(out["input_ids"][2], b["input_ids"][2]) and (out["labels"][2] == IGNORE).all()
    assert torch.equal(out["ids"], b["ids"])
    narrow = replayed_batch([[[9, 8, 70], [IGNORE, IGNORE, 70]]], {k: v[:2] for k, v in b.items()}, 2, np.random.default_rng(0))
    assert narrow["input_ids"].tolist() == [[9, 8, 70]] * 2  # drawn with replacement: the buffer has one row


def test_replay_fills_the_buffer_when_it_samples_then_trains_on_it_and_survives_a_json_round_trip(tiny_llama, student):
    import json

    task = get_task("causal_lm")
    w = worker(tiny_llama, student, mode="replay", fraction=1.0)
    b = prompt_batch()
    w.position = (0, 0)  # progress 0: fresh
    first = task.forward(w, b)
    assert len(w.task_state[BUFFER]) == 2 and first.extra["mask"].sum() == 6
    w.position = (0, 99)  # progress 0.99 with tau 1: fresh with probability 0.01, and this draw replays
    assert batch_source(w.cfg.lm.sgo, 0, 0, 99, 0.99) == REPLAY
    saved = json.loads(json.dumps(w.task_state))
    rows = task.forward(w, b)
    assert len(w.task_state[BUFFER]) == 2  # reused, not refilled
    w.task_state = saved
    again = task.forward(w, b)
    assert torch.equal(rows.student, again.student) and torch.equal(rows.extra["mask"], again.extra["mask"])
    replayed = {tuple(r[0]) for r in saved[BUFFER]}
    gen = generated_batch(student, b, 2, sgo(max_new_tokens=3))
    assert {tuple(gen["input_ids"][i, :int(gen["attention_mask"][i].sum())].tolist()) for i in range(2)} == replayed


def test_the_gguf_teachers_context_bounds_the_generation_length():
    from pathlib import Path

    from pipelines.tasks import load_checked_config

    config = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "smollm2_sgo.yaml"
    with pytest.raises(ConfigError, match=r"^lm\.sgo\.max_new_tokens: prompts of up to data\.max_length=128 tokens \+ 8100 new "
                                          r"tokens exceed the model context of 8192 tokens$"):
        load_checked_config(config, ["lm.sgo.max_new_tokens=8100"])
    assert load_checked_config(config, ["lm.sgo.max_new_tokens=8064"]).lm.sgo.max_new_tokens == 8064  # 128 + 8064 = 8192
