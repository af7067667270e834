"""Through Ray: the teacher logit cache (write, read, same loss as the live teacher, reuse) and tiny
Llama distillation end to end with Ray Train, 2 workers, DeepSpeed ZeRO-2, live teacher and cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from llm_helpers import byte_level_bytes

from pipelines.config import set_key
from pipelines.tasks import checked_config
from pipelines.tasks.causal_lm.metrics import VALIDATION_METRICS
from sinkd import DistillationObjective, ObjectiveConfig, SinkhornConfig, TopKDistribution

pytestmark = pytest.mark.slow

V = 49152


def job(tmp_path, teacher, wiki_path, cache_dir, **over) -> dict:
    raw = {"task_type": "causal_lm", "run_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"files": {"train": str(wiki_path)}, "max_length": 8, "max_train_examples": 8, "max_eval_examples": 2},
           "lm": {"max_documents": 4, "cache": {"enabled": True, "topk": V, "dir": str(cache_dir), "batch_size": 4}},
           "teacher": {"path": str(teacher)},
           "student": {"init": "teacher_layers", "layers": [0, 3]},
           "objective": {"alpha": 1.0, "beta": 1.0, "temperature": 2.0,
                         "sinkhorn": {"eps": 0.1, "max_iter": 20, "temperature": 2.0, "group_size": 16}},
           "train": {"epochs": 2, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-3, "zero_stage": 2},
           "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logit_cache")


def cached_batches(info, split):
    from pipelines.tasks.causal_lm.data import LMCollate
    from pipelines.tasks.causal_lm.logit_cache import read_cache

    return list(read_cache(info, split, 1).iter_torch_batches(batch_size=4, collate_fn=LMCollate(2)))


def live_and_cached_losses(teacher_dir, batches, objective, k=None):
    """(live teacher objective, objective from the cache's rows, objective from top-k of the live logits)."""
    from pipelines.tasks.causal_lm.models import load_causal_lm

    torch.manual_seed(0)
    teacher = load_causal_lm(str(teacher_dir)).eval()
    student = make_student(teacher)
    out = []
    for b in batches:
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        labels = b["labels"][:, 1:]
        with torch.no_grad():
            zt = teacher(**inputs).logits[:, :-1]
            zs = student(**inputs).logits[:, :-1]
        cached = TopKDistribution(b["t_probs"], b["t_ids"], b["t_rest"])
        rows = [objective(zs, zt, labels=labels), objective(zs, cached, labels=labels)]
        if k is not None:
            rows.append(objective(zs, TopKDistribution.from_logits(zt, k), labels=labels))
        out.append([r.as_dict() for r in rows])
    return out


def make_student(teacher):
    from pipelines.tasks.common import student_from_teacher_layers

    return student_from_teacher_layers(teacher, [0, teacher.config.num_hidden_layers - 1]).eval()


def test_cache_round_trip_with_k_equal_v_gives_the_live_loss_and_is_reused(local_ray, tmp_path, tiny_llama, wiki_path, shared_cache):
    from pipelines.tasks import get_task
    from pipelines.tasks.causal_lm.logit_cache import ensure_cache

    cfg = checked_config(job(tmp_path, tiny_llama, wiki_path, shared_cache))
    prepared = get_task(cfg.task_type).prepare(cfg)
    task, teacher_dir = prepared.data, prepared.teacher_dir
    info = ensure_cache(cfg, task, teacher_dir)
    assert info.built and info.rows == task.sizes()
    batches = cached_batches(info, "train")
    assert sorted(int(i) for b in batches for i in b["ids"]) == list(range(task.sizes()["train"]))
    objective = DistillationObjective(ObjectiveConfig(alpha=1.0, beta=1.0, temperature=2.0,
                                                      sinkhorn=SinkhornConfig(temperature=2.0, group_size=16)))
    for live, cached in live_and_cached_losses(teacher_dir, batches, objective):
        for term in ("loss", "kd", "sinkhorn"):
            assert cached[term] == pytest.approx(live[term], rel=2e-5, abs=1e-6), term  # float32 sums over V
    # The second run finds the same fingerprint: nothing is recomputed or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in Path(info.root).rglob("*.parquet")}
    assert sorted(str(p.relative_to(info.root)) for p in stamps) == sorted(f for s in info.files.values() for f in s)
    assert ensure_cache(cfg, task, teacher_dir) is info  # remembered on the blocks (a Tune trial reads no teacher file)
    task.caches.clear()  # a later run: found through its manifest
    again = ensure_cache(checked_config(job(tmp_path, tiny_llama, wiki_path, shared_cache)), task, teacher_dir)
    assert not again.built and again.root == info.root and again.files == info.files
    assert {p: p.stat().st_mtime_ns for p in Path(info.root).rglob("*.parquet")} == stamps
    # A different k is another cache.
    other = checked_config(job(tmp_path, tiny_llama, wiki_path, shared_cache, **{"lm.cache.topk": 8}))
    from pipelines.tasks.causal_lm.logit_cache import fingerprint

    assert fingerprint(other, task, teacher_dir) != info.fingerprint


def test_cache_on_an_object_store_storage_path_is_written_and_read_through_the_bucket(local_ray, tmp_path, tiny_llama,
                                                                                       wiki_path, shared_cache, s3):
    """With ray.storage_path on S3 the Ray Data tasks that score the teacher write the cache into the
    bucket (any node may run them) and the readers read it from there: the same rows as a local cache,
    nothing under lm.cache.dir; the teacher reaches the scoring actors as a shipped folder."""
    from pipelines.tasks import get_task
    from pipelines.tasks.causal_lm.logit_cache import MANIFEST, ensure_cache, read_cache_table

    local_dir = tmp_path / "unused_cache"
    cfg = checked_config(job(tmp_path, tiny_llama, wiki_path, local_dir, **{"ray.storage_path": s3.uri("lm_run")}))
    prepared = get_task(cfg.task_type).prepare(cfg)
    info = ensure_cache(cfg, prepared.data, prepared.teacher_dir)
    assert info.built and info.root.startswith("s3://sinkd/lm_run/logit_cache/") and not local_dir.exists()
    keys = s3.keys("lm_run/")
    prefix = f"lm_run/logit_cache/{info.fingerprint}/"
    assert {prefix + f for files in info.files.values() for f in files} | {prefix + MANIFEST} <= set(keys)
    assert any(k.startswith("lm_run/shipped/tiny_llama-") for k in keys)

    local = checked_config(job(tmp_path, tiny_llama, wiki_path, shared_cache))
    reference = ensure_cache(local, get_task(local.task_type).prepare(local).data, prepared.teacher_dir)
    assert reference.fingerprint == info.fingerprint  # the same inputs; only the place differs
    for split in ("train", "validation", "test"):
        assert read_cache_table(info, split).equals(read_cache_table(reference, split)), split
    prepared.data.caches.clear()  # a later run finds it in the bucket through its manifest
    again = ensure_cache(cfg, prepared.data, prepared.teacher_dir)
    assert not again.built and again.root == info.root and again.files == info.files


def test_cache_of_the_real_teacher_at_k_below_v_is_close_to_the_live_loss(local_ray, tmp_path, smollm2_dir, wiki_path):
    """SmolLM2 (a trained, peaked teacher) cached at k = 64: the loss from the cache is that of the
    live logits' top-k to float32 precision, and within a few percent of the full-vocabulary loss."""
    from pipelines.tasks import get_task
    from pipelines.tasks.causal_lm.logit_cache import ensure_cache

    cfg = checked_config(job(tmp_path, smollm2_dir, wiki_path, tmp_path / "cache",
                               **{"data.max_length": 24, "data.max_train_examples": 4, "data.max_eval_examples": 1,
                                  "lm.cache.topk": 64, "student.layers": [0, 29]}))
    prepared = get_task(cfg.task_type).prepare(cfg)
    task, teacher_dir = prepared.data, prepared.teacher_dir
    info = ensure_cache(cfg, task, teacher_dir)
    objective = DistillationObjective(ObjectiveConfig(alpha=1.0, beta=1.0, temperature=1.0,
                                                      sinkhorn=SinkhornConfig(group_size=32)))
    for live, cached, topk in live_and_cached_losses(teacher_dir, cached_batches(info, "train"), objective, k=64):
        for term in ("loss", "kd", "sinkhorn"):
            assert cached[term] == pytest.approx(topk[term], rel=1e-4), term
            assert cached[term] == pytest.approx(live[term], rel=0.05), term


def plain_scores(raw: dict, model_dir: str, teacher_dir: str) -> dict:
    """Perplexity and top-1 agreement of an exported student on the test blocks, computed here in plain
    PyTorch (no Ray, no cache): the reference the job's Ray Data evaluation must reproduce."""
    import torch.nn.functional as F

    from pipelines.tasks import get_task
    from pipelines.tasks.causal_lm.data import IGNORE, LMCollate
    from pipelines.tasks.causal_lm.models import load_causal_lm
    from transformers import AutoTokenizer

    cfg = checked_config(raw)
    table = get_task(cfg.task_type).prepare(cfg).data.splits["test"]
    batch = LMCollate(2)(table)
    student, teacher = load_causal_lm(model_dir).eval(), load_causal_lm(teacher_dir).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        zs, zt = student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    real = labels != IGNORE
    nll = F.cross_entropy(zs[real], labels[real], reduction="sum").item()
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    text_bytes = sum(byte_level_bytes(tok, row[1:][real_row].tolist()) for row, real_row in zip(batch["input_ids"], real))
    return {"perplexity": math.exp(nll / real.sum().item()), "bits_per_byte": nll / math.log(2) / text_bytes,
            "top1_agreement": (zs.argmax(-1) == zt.argmax(-1))[real].float().mean().item()}


def check_run(results: dict, raw: dict, steps: int):
    run_dir = Path(raw["run_dir"])
    sinkd, teacher = results["models"]["sinkd"], results["models"]["teacher"]
    assert teacher["test"]["top1_agreement"] == 1.0
    reference = plain_scores(raw, sinkd["path"], teacher["path"])
    assert sinkd["test"]["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-4)
    assert sinkd["test"]["bits_per_byte"] == pytest.approx(reference["bits_per_byte"], rel=1e-4)
    assert sinkd["test"]["top1_agreement"] == pytest.approx(reference["top1_agreement"], abs=1e-6)
    assert math.isfinite(sinkd["val"]["perplexity"]) and sinkd["val"]["tokens"] == 2 * 7
    assert set(sinkd["val"]) - {"tokens"} == set(VALIDATION_METRICS)  # what `sinkd tune` lets a space select
    assert sinkd["layers"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sinkd["path"])  # the export reloads as a causal LM
    assert model.config.num_hidden_layers == 2
    state = json.loads((run_dir / "models" / "sinkd" / "sinkd_task.json").read_text())
    assert state["kind"] == "causal_lm" and state["global_step"] == steps  # 8 blocks / (2 workers x 2) a step


def loss_log(raw: dict) -> list[float]:
    from pipelines.recipes.export import latest_checkpoint
    from pipelines.train.files import STATE_FILE

    state = json.loads((latest_checkpoint(Path(raw["run_dir"]) / "ray" / "sinkd") / STATE_FILE).read_text())
    return [loss for _, loss in state["loss_log"]]


def test_e2e_zero2_two_workers_from_the_logit_cache(local_ray, tmp_path, tiny_llama, wiki_path, shared_cache, capsys):
    """The job reads the cache the round-trip test wrote (the teacher does not run again); `sinkd eval`
    then scores the exported student as the job did."""
    from pipelines.cli import main
    from pipelines.recipes.job import run_job

    raw = job(tmp_path, tiny_llama, wiki_path, shared_cache, **{"train.epochs": 1, "objective.sinkhorn.topk": 16})
    before = sorted(p.name for p in shared_cache.iterdir())
    results = run_job(checked_config(raw), show_progress=False)
    assert sorted(p.name for p in shared_cache.iterdir()) == before
    check_run(results, raw, steps=2)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    model = results["models"]["sinkd"]["path"]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "job.yaml"), "--model", model]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[model]
    job_scores = results["models"]["sinkd"]["test"]
    assert scores["perplexity"] == pytest.approx(job_scores["perplexity"], rel=1e-6)
    assert scores["top1_agreement"] == job_scores["top1_agreement"]


def live_job(tmp_path, tiny_llama, wiki_path, zero_stage: int) -> dict:
    return job(tmp_path, tiny_llama, wiki_path, tmp_path / "cache", **{
        "lm.cache.enabled": False, "train.epochs": 1, "objective.sinkhorn.topk": 16, "train.zero_stage": zero_stage})


@pytest.fixture(scope="module")
def live_zero2(local_ray, tmp_path_factory, tiny_llama, wiki_path):
    from pipelines.recipes.job import run_job

    tmp_path = tmp_path_factory.mktemp("live_zero2")
    raw = live_job(tmp_path, tiny_llama, wiki_path, 2)
    return tmp_path, raw, run_job(checked_config(raw), show_progress=False)


def test_e2e_zero2_two_workers_live_teacher(live_zero2):
    tmp_path, raw, results = live_zero2
    assert not (tmp_path / "cache").exists()  # a live teacher, no cache written
    check_run(results, raw, steps=2)
    sinkd = results["models"]["sinkd"]
    assert sinkd["teacher_params_on_rank"] == sinkd["teacher_params"]  # ZeRO-2: the whole teacher on each rank


def test_e2e_zero3_live_teacher(live_zero2, tmp_path, tiny_llama, wiki_path):
    """ZeRO-3 with the live teacher (built under HfDeepSpeedConfig, so it loads partitioned), the student
    sharded by DeepSpeed: the same losses as the ZeRO-2 run, the teacher split across the two workers,
    and the ZeRO-3 checkpoint, its export and the evaluation go through."""
    from pipelines.recipes.job import run_job

    raw = live_job(tmp_path, tiny_llama, wiki_path, 3)
    results = run_job(checked_config(raw), show_progress=False)
    check_run(results, raw, steps=2)
    zero2 = loss_log(live_zero2[1])
    assert len(zero2) == 2 and loss_log(raw) == pytest.approx(zero2, rel=1e-4)
    sinkd = results["models"]["sinkd"]
    assert 0 < sinkd["teacher_params_on_rank"] <= sinkd["teacher_params"] / 2 + 1024  # about half on each rank


def test_tune_causal_lm_space_and_two_trials(local_ray, tmp_path, tiny_llama, wiki_path, shared_cache):
    """The shipped causal-LM space applies to a causal-LM job (every choice validated), and `run_tune`
    runs causal-LM trials on val_perplexity and writes a best.yaml that is a causal-LM job again."""
    from pipelines.config import load_config
    from pipelines.recipes.tune import check_space_against_config, run_tune
    from pipelines.recipes.tune_space import load_space, parse_space

    # One worker: this module's Ray has 3 CPUs, and 2 workers + a trial driver's 0.01 CPU would leave Ray
    # Data's read tasks 0.99 CPU (a local Ray started by `sinkd tune` gets the driver's share on top).
    raw = job(tmp_path, tiny_llama, wiki_path, shared_cache, **{"train.epochs": 1, "objective.sinkhorn.topk": 16,
                                                               "scaling.num_workers": 1})
    check_space_against_config(checked_config(raw), load_space(Path(__file__).parents[2] / "tune_spaces" / "sinkd_causal_lm.yaml"))
    space = parse_space({"metric": "val_perplexity", "mode": "min", "num_samples": 1, "max_concurrent_trials": 1,
                         "trial_resources": {"cpu": 0.01},
                         "scheduler": {"type": "asha", "time_attr": "training_iteration", "grace_period": 1, "max_t": 1},
                         "space": {"objective.sinkhorn.eps": {"grid": [0.1, 0.5]}}})
    out = run_tune(checked_config(raw), space)
    trials = out["trials"]
    assert len(trials) == 2 and all(t["status"] == "OK" and math.isfinite(t["val_perplexity"]) for t in trials)
    assert sorted(t["params"]["objective.sinkhorn.eps"] for t in trials) == [0.1, 0.5]
    best = min(trials, key=lambda t: t["val_perplexity"])
    assert out["best"]["trial"] == best["trial"]
    best_raw = yaml.safe_load(Path(out["best_config"]).read_text())
    assert best_raw["objective"]["sinkhorn"]["eps"] == best["params"]["objective.sinkhorn.eps"]
    assert load_config(out["best_config"]).task_type == "causal_lm"
