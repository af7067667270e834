"""OKD and SGO through Ray Train + DeepSpeed ZeRO-2 on 2 workers: a tiny Llama teacher with an online
block, on prompt/continuation records whose micro-batches are the student's own samples (lm.sgo
replay: fresh in the first epoch, from each rank's buffer in the second); a run whose last worker is
killed mid-training resumes to the uninterrupted run's losses and block (the buffers restored from
the checkpoint), the exported student is a plain causal LM with the block saved beside it. Under
ZeRO-3 (teacher and student partitioned, the ranks generating together) the same job gives the same
losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines.config import set_key
from pipelines.tasks import checked_config

pytestmark = pytest.mark.slow


def okd_job(tmp_path, teacher, wiki_path, **over) -> dict:
    raw = {"task_type": "causal_lm", "run_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"files": {"train": str(wiki_path)}, "max_length": 24, "max_train_examples": 8, "max_eval_examples": 2},
           "lm": {"max_documents": 4, "format": "prompt_continuation", "prompt_words": 4, "response_words": 3,
                  "max_new_tokens": 4, "sgo": {"mode": "replay", "fraction": 0.95, "max_new_tokens": 3, "temperature": 1.0}},
           "teacher": {"path": str(teacher), "online": {"kind": "residual_adapter", "rank": 4, "lr": 1e-2, "layer": 2}},
           "student": {"init": "teacher_layers", "layers": [0, 3]},
           "objective": {"alpha": 1.0, "beta": 1.0, "sinkhorn": {"eps": 0.1, "max_iter": 20, "group_size": 16, "topk": 16}},
           "train": {"epochs": 2, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-3, "zero_stage": 2},
           "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


def final_state(raw: dict) -> dict:
    from pipelines.recipes.export import latest_checkpoint
    from pipelines.train.files import STATE_FILE

    return json.loads((latest_checkpoint(Path(raw["run_dir"]) / "ray" / "sinkd") / STATE_FILE).read_text())


@pytest.fixture(scope="module")
def plain(local_ray, tmp_path_factory, tiny_llama, wiki_path):
    """The uninterrupted ZeRO-2 run: (its raw config, its results)."""
    from pipelines.recipes.job import run_job

    raw = okd_job(tmp_path_factory.mktemp("plain"), tiny_llama, wiki_path)
    return raw, run_job(checked_config(raw), show_progress=False)


def test_okd_and_sgo_zero2_two_workers_resume_exactly_after_a_killed_worker(plain, tmp_path, tiny_llama, wiki_path):
    from transformers import AutoModelForCausalLM

    from pipelines.recipes.export import latest_checkpoint
    from pipelines.recipes.job import run_job
    from pipelines.tasks.causal_lm.models import load_causal_lm
    from pipelines.tasks.causal_lm.sgo import batch_source
    from pipelines.train.files import TASK_STATE_FILE

    sgo = checked_config(okd_job(tmp_path, tiny_llama, wiki_path)).lm.sgo
    draws = [batch_source(sgo, 0, epoch, micro, (2 * epoch + micro) / 4) for epoch in range(2) for micro in range(2)]
    assert draws == ["fresh", "fresh", "replay", "replay"]  # the resumed epoch trains on the restored buffers only

    plain, results = plain
    killed = okd_job(tmp_path / "killed", tiny_llama, wiki_path, **{"debug.fail_at_step": 3})
    run_job(checked_config(killed), show_progress=False)

    a, b = final_state(plain), final_state(killed)
    ckpt = latest_checkpoint(Path(killed["run_dir"]) / "ray" / "sinkd")
    buffers = [json.loads((ckpt / TASK_STATE_FILE.format(rank=r)).read_text())["sgo_buffer"] for r in range(2)]
    assert [len(x) for x in buffers] == [4, 4] and buffers[0] != buffers[1]  # each rank's 2 x 2 sampled rows
    assert b["resumed_from"] == [2] and a["resumed_from"] == []
    assert [s for s, _ in a["loss_log"]] == [1, 2, 3, 4]
    assert [x for _, x in b["loss_log"]] == pytest.approx([x for _, x in a["loss_log"]], rel=1e-6)

    out = Path(results["models"]["sinkd"]["path"])
    block = torch.load(out / "online.pt")
    assert set(block) == {"norm.weight", "down.weight", "up.weight"} and block["up.weight"].abs().sum() > 0  # it trained
    resumed = torch.load(Path(killed["run_dir"]) / "models" / "sinkd" / "online.pt")
    assert all(torch.allclose(block[k], resumed[k], rtol=1e-5, atol=1e-7) for k in block)
    student = AutoModelForCausalLM.from_pretrained(out)  # a plain causal LM: no block inside
    assert not any("online" in k for k in student.state_dict())
    assert student.config.num_hidden_layers == 2
    teacher = load_causal_lm(str(tiny_llama))  # the teacher on disk is untouched, and scored as it was
    assert results["models"]["teacher"]["test"]["top1_agreement"] == 1.0
    assert sum(p.numel() for p in teacher.parameters()) == results["models"]["sinkd"]["teacher_params"]


def test_okd_and_sgo_under_zero3_give_the_zero2_losses_with_the_teacher_partitioned(plain, tmp_path, tiny_llama, wiki_path):
    """Partitioning changes where the weights live, not the math: the student's samples (each forward of
    `generate` gathers its weights from both ranks), the adapted teacher's rows through the partitioned
    teacher, the block's gradient through its layers above, and so the losses, match the ZeRO-2 run."""
    from pipelines.recipes.job import run_job

    raw, zero2 = plain
    zero3 = okd_job(tmp_path, tiny_llama, wiki_path, **{"train.zero_stage": 3})
    results = run_job(checked_config(zero3), show_progress=False)
    a, b = final_state(raw), final_state(zero3)
    assert [s for s, _ in b["loss_log"]] == [1, 2, 3, 4]
    assert [x for _, x in b["loss_log"]] == pytest.approx([x for _, x in a["loss_log"]], rel=1e-4)
    sinkd = {stage: run["models"]["sinkd"] for stage, run in ((2, zero2), (3, results))}
    assert sinkd[2]["teacher_params_on_rank"] == sinkd[2]["teacher_params"]  # ZeRO-2: the whole teacher on each rank
    assert 0 < sinkd[3]["teacher_params_on_rank"] <= sinkd[3]["teacher_params"] / 2 + 1024  # ZeRO-3: about half
    block = {stage: torch.load(Path(run["path"]) / "online.pt") for stage, run in sinkd.items()}
    assert all(torch.allclose(block[2][k], block[3][k], rtol=1e-4, atol=1e-6) for k in block[2])
