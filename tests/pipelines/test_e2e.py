"""End to end through local Ray: Ray Data -> TorchTrainer (2 workers) -> DeepSpeed ZeRO-2/3 -> export -> eval.

One Ray session serves the module; the ZeRO-2 run is shared by the tests that inspect it (its
uninterrupted loss log is the reference the killed-and-resumed run must reproduce)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import snapshot, tiny_job

from pipelines.cli import main
from pipelines.recipes.export import latest_checkpoint
from pipelines.recipes.job import run_job
from pipelines.tasks import checked_config
from pipelines.train.files import STATE_FILE

pytestmark = pytest.mark.slow


def _run(raw: dict) -> dict:
    return run_job(checked_config(copy.deepcopy(raw)), show_progress=False)


def _state(run_dir, stage: str) -> dict:
    return json.loads((latest_checkpoint(Path(run_dir) / "ray" / stage) / STATE_FILE).read_text())


def _write(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def zero2(ray_session, tmp_path_factory, tiny_bert, sst2_small):
    """103 real rows (padded to 104 for 2 workers), batch 8, grad_accum 2: 7 micro-batches per worker
    and epoch, so every epoch ends on a partial accumulation window; 4 steps/epoch, 8 in all."""
    raw = tiny_job(tmp_path_factory.mktemp("zero2") / "run", tiny_bert, sst2_small, **{"data.max_train_examples": 103})
    return raw, _run(raw)


def test_exactly_once_per_epoch_across_workers(ray_session, sst2_small, tiny_bert, tmp_path):
    """The ingestion the train loop uses (padding, equal split, seeded local shuffle): every id once per epoch."""
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.tasks.classification.data import PadCollate, load_task, tokenize_table, to_ray
    from pipelines.tasks.common import PAD_ID, epoch_batches
    from pipelines.train.fit import ingest_config

    cfg = checked_config(tiny_job(tmp_path / "run", tiny_bert, sst2_small, **{"data.max_train_examples": 101}))
    table = load_task(cfg).splits["train"]

    def loop():
        rank, seen = ray.train.get_context().get_world_rank(), []
        for epoch in range(2):
            ids = []
            for batch in epoch_batches(ray.train.get_dataset_shard("train"), 8, PadCollate(0), seed=0, epoch=epoch,
                                       shuffle_buffer=16):
                ids += batch["ids"].tolist()
            seen.append(ids)
        (tmp_path / f"ids_{rank}.json").write_text(json.dumps(seen))

    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=2), datasets={"train": to_ray(tokenize_table(table, str(tiny_bert), 32), 2)},
                 dataset_config=ingest_config(2)).fit()
    per_rank = [json.loads((tmp_path / f"ids_{r}.json").read_text()) for r in range(2)]
    expected = sorted(table["id"].to_pylist())
    for epoch in range(2):
        ids = per_rank[0][epoch] + per_rank[1][epoch]
        assert len(per_rank[0][epoch]) == len(per_rank[1][epoch]) == 51  # equal shards: matched collectives
        assert sorted(i for i in ids if i != PAD_ID) == expected  # each of the 101 rows exactly once
        assert ids.count(PAD_ID) == 1
    assert per_rank[0][0] != per_rank[0][1]  # reshuffled between epochs


def test_zero2_run_trains_checkpoints_and_exports(zero2):
    raw, results = zero2
    run_dir = Path(raw["run_dir"])
    student = results["models"]["sinkd"]
    assert set(results["models"]) == {"teacher", "sinkd"} and results["models"]["teacher"]["given"]
    state = _state(run_dir, "sinkd")
    assert [s for s, _ in state["loss_log"]] == list(range(1, 9)) and state["resumed_from"] == []
    assert student["val"]["examples"] == 40
    n_test = results["data"]["test"]  # scored over exactly the test rows (no padding row counted, none lost)
    assert student["test"]["accuracy"] * n_test == pytest.approx(round(student["test"]["accuracy"] * n_test), abs=1e-9)
    assert list((run_dir / "tb" / "sinkd").glob("events.out.tfevents.*"))
    assert "sinkd" in (run_dir / "summary.txt").read_text()

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(student["path"])
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 2


def test_exported_student_reproduces_its_validation_score(zero2, capsys):
    """The exported HF model, reloaded and run by `sinkd eval`, scores what the DeepSpeed engine scored."""
    raw, results = zero2
    cfg_path = _write(Path(raw["run_dir"]).parent / "job.yaml", raw)
    assert main(["eval", cfg_path, "--split", "validation", "--model", results["models"]["sinkd"]["path"]]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (score,) = scores.values()
    assert score["accuracy"] == pytest.approx(results["models"]["sinkd"]["val"]["accuracy"], abs=1e-9)


def test_evaluation_actors_split_the_rows_and_agree_with_one_actor(zero2):
    """Evaluation runs on up to num_workers actors of cpus_per_worker CPUs each (one actor asking for all
    the workers' CPUs could fit on no node): the predictions are those of a single actor, every row once."""
    from pipelines.tasks.classification.data import load_task
    from pipelines.tasks.classification.metrics import predict
    from pipelines.tasks.common import eval_pool

    raw, results = zero2
    cfg = checked_config(copy.deepcopy(raw))
    assert eval_pool(cfg) == {"cpus": 1.0, "actors": 2, "gpus": 0.0}
    on_gpus = copy.deepcopy(raw)
    on_gpus["scaling"].update(use_gpu=True, gpus_per_worker=0.5, cpus_per_worker=4)
    assert eval_pool(checked_config(on_gpus)) == {"cpus": 4.0, "actors": 2, "gpus": 0.5}  # one actor per worker's GPU share
    model = results["models"]["sinkd"]["path"]
    table = load_task(cfg).tokenized("test", model, cfg.data.max_length)
    one = predict(model, table, 8, cpus=1.0, actors=1)
    two = predict(model, table, 8, **eval_pool(cfg))
    assert two["id"].tolist() == sorted(table.column("id").to_pylist())
    assert two["pred"].tolist() == one["pred"].tolist()


def test_killed_worker_resumes_without_lost_or_repeated_steps(zero2, tmp_path):
    """Rank 1 is hard-killed after optimizer step 7; FailureConfig restarts the group from the step-6
    checkpoint (mid-epoch); the lineage has steps 1..8 once each and the uninterrupted run's losses."""
    raw, reference = zero2
    killed = copy.deepcopy(raw)
    killed["run_dir"] = str(tmp_path / "run")
    killed["debug"] = {"fail_at_step": 7}
    results = _run(killed)
    assert (tmp_path / "run" / ".fault_injected_sinkd").read_text().startswith("killed rank 1 at step 7")
    state, ref_state = _state(killed["run_dir"], "sinkd"), _state(raw["run_dir"], "sinkd")
    assert state["resumed_from"] == [6]
    assert [s for s, _ in state["loss_log"]] == list(range(1, 9))
    assert [loss for _, loss in state["loss_log"]] == pytest.approx([loss for _, loss in ref_state["loss_log"]], rel=1e-5)
    assert results["models"]["sinkd"]["val"] == pytest.approx(reference["models"]["sinkd"]["val"], rel=1e-5)


def test_bad_inputs_fail_in_one_line_and_leave_the_run_dir_intact(zero2, tmp_path, capsys, sst2_small):
    raw, _ = zero2
    run_dir = Path(raw["run_dir"])
    before = snapshot(run_dir)
    cfg_path = _write(tmp_path / "job.yaml", raw)
    bad_rows = tmp_path / "bad.tsv"
    lines = Path(sst2_small["train"]).read_text().splitlines()
    bad_rows.write_text("\n".join(lines[:10] + ["a sentence whose label went missing\t"] + lines[10:]) + "\n")
    cases = [
        (["--set", "train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["--set", "objective.sinkhorn.eps=0"], "objective.sinkhorn.eps must be a finite number > 0"),
        (["--set", f"data.files.train={bad_rows}"], f"{bad_rows} row 10 (line 11): missing label in column 'label'"),
        (["--set", "data.text_columns=[sentense]"], "data.text_columns: column 'sentense' not found"),
        (["--set", "train.lr=0.5"], "run_dir: stage 'sinkd' in"),  # same run_dir, other settings: refused
    ]
    for extra, expected in cases:
        assert main(["train", cfg_path, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert snapshot(run_dir) == before


def _loss_log(run_dir, stage: str) -> list[float]:
    return [loss for _, loss in _state(run_dir, stage)["loss_log"]]


def test_cached_teacher_logits_give_the_losses_of_the_teacher_in_the_workers(zero2, tmp_path):
    """teacher.cache_logits (auto: on for a CPU job below ZeRO-3): one teacher pass before the students,
    whose step losses are those of the same run with the teacher in every worker; no worker holds it.
    The cached side is the module's shared ZeRO-2 run (auto); only the live side runs here."""
    raw, cached_run = zero2
    assert "cache_logits" not in raw["teacher"] and checked_config(copy.deepcopy(raw)).teacher.cache_logits == "auto"
    live = copy.deepcopy(raw)
    live["run_dir"] = str(tmp_path / "live")
    live["teacher"]["cache_logits"] = False
    live["train"]["checkpoint_every_steps"] = None  # only the final checkpoint: its loss log holds every step
    raws, runs = {"auto": raw, False: live}, {"auto": cached_run, False: _run(live)}
    cached, live_losses = (_loss_log(raws[mode]["run_dir"], "sinkd") for mode in ("auto", False))
    assert len(cached) == len(live_losses) > 0 and cached == pytest.approx(live_losses, rel=1e-5)
    assert "teacher_params" not in runs["auto"]["models"]["sinkd"] and runs[False]["models"]["sinkd"]["teacher_params"] > 0
    scores = [run["models"]["sinkd"]["test"]["accuracy"] for run in runs.values()]
    assert scores[0] == pytest.approx(scores[1], abs=1.5 / runs["auto"]["data"]["test"])  # one row of slack for a near-tie


def test_zero3_t5_family_end_to_end(ray_session, tmp_path, tiny_t5, sst2_small):
    """Encoder-decoder teacher fine-tuned then distilled on its label-token logits, ZeRO-3 partitioned.
    The same distillation under ZeRO-2, from the teacher the ZeRO-3 run fine-tuned, gives the same
    losses (sharding changes where weights live, not the math); under ZeRO-3 the distillation stage's
    teacher is split across the two workers."""
    common = {"train.epochs": 1, "train.checkpoint_every_steps": None, "student.layers": [1],
              "data.label_words": ["negative", "positive"]}
    raws = {3: tiny_job(tmp_path / "zero3", tiny_t5, sst2_small, **common, **{
        "train.zero_stage": 3, "teacher.finetune": "always", "teacher.train": {"epochs": 1}})}
    runs = {3: _run(raws[3])}
    results = runs[3]
    assert list(results["models"]) == ["teacher", "sinkd"]
    raws[2] = tiny_job(tmp_path / "zero2", results["models"]["teacher"]["path"], sst2_small, **common, **{
        "train.zero_stage": 2, "teacher.finetune": "never", "teacher.cache_logits": False})  # its teacher in the workers
    runs[2] = _run(raws[2])
    zero2, zero3 = _loss_log(raws[2]["run_dir"], "sinkd"), _loss_log(raws[3]["run_dir"], "sinkd")
    assert len(zero3) == len(zero2) > 0 and zero3 == pytest.approx(zero2, rel=1e-4)
    sinkd = {stage: run["models"]["sinkd"] for stage, run in runs.items()}
    assert sinkd[2]["teacher_params_on_rank"] == sinkd[2]["teacher_params"]  # ZeRO-2: whole on each rank
    assert 0 < sinkd[3]["teacher_params_on_rank"] <= sinkd[3]["teacher_params"] / 2 + 1024  # ZeRO-3: about half
    from transformers import AutoModelForSeq2SeqLM

    student = AutoModelForSeq2SeqLM.from_pretrained(results["models"]["sinkd"]["path"])
    assert student.config.num_layers == 1
    task = json.loads((Path(results["models"]["sinkd"]["path"]) / "sinkd_task.json").read_text())
    assert task["kind"] == "seq2seq" and len(task["label_token_ids"]) == 2
    for name in ("teacher", "sinkd"):  # the same predictions as under ZeRO-2, one row of slack for a near-tie
        assert results["models"][name]["test"]["accuracy"] == pytest.approx(
            runs[2]["models"][name]["test"]["accuracy"], abs=1.5 / results["data"]["test"])
    assert runs[2]["models"]["teacher"]["given"]


def test_real_minilm_teacher_on_sst2(ray_session, tmp_path, minilm, sst2_small):
    """The real pretrained teacher: fine-tuned first (it has no task head; ZeRO-1), then a 3-layer
    student (ZeRO-0: DeepSpeed without partitioning, whose checkpoint export differs)."""
    raw = tiny_job(tmp_path / "run", minilm, sst2_small, **{
        "data.max_train_examples": 320, "data.max_eval_examples": 64,
        "teacher.finetune": "auto", "teacher.train": {"epochs": 2, "lr": 3e-4, "zero_stage": 1},
        "student.layers": [0, 2, 4], "train.epochs": 1, "train.batch_size": 16, "train.grad_accum": 1,
        "train.lr": 1e-4, "train.checkpoint_every_steps": None, "train.zero_stage": 0})
    results = _run(raw)
    teacher, student = results["models"]["teacher"], results["models"]["sinkd"]
    assert teacher["layers"] == 6 and student["layers"] == 3 and teacher["params"] > 2e7
    assert teacher["test"]["accuracy"] > 0.6, teacher  # fine-tuning worked: well above chance on real SST-2
    assert student["test"]["accuracy"] >= 0.5, student


def test_export_command_and_check_flag(zero2, tmp_path, capsys):
    """`sinkd export` rebuilds the same weights from the latest checkpoint; `--check` validates only."""
    import torch
    from transformers import AutoModelForSequenceClassification

    raw, results = zero2
    cfg_path = _write(tmp_path / "job.yaml", raw)
    assert main(["export", cfg_path, "--out", str(tmp_path / "exported")]) == 0
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(results["models"]["sinkd"]["path"]).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["train", cfg_path, "--check"]) == 0
    assert "ok: config and data valid" in capsys.readouterr().out
