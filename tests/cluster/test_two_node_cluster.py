"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`) and tiny
distillation jobs submitted to it: the two training workers land one per node (each needs the
`sinkd_trainer` resource each node offers once), checkpoints go to the shared ray.storage_path, the
worker node is stopped mid-run and the job recovers once it is back; submit errors reach the user."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import BIN, LocalCluster
from pipeline_helpers import tiny_job

from pipelines.recipes.export import stage_checkpoint
from pipelines.train.files import STATE_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SLOT = "sinkd_trainer"


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="sinkd-rc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    c = LocalCluster(root, head_cpus=2, worker_cpus=1, head_resources={SLOT: 1, "sinkd_head": 1},
                     worker_resources={SLOT: 1, "sinkd_worker": 1})
    try:
        c.start()
        yield c
    finally:
        c.stop()
        left = c.leftovers()
        if not left:
            shutil.rmtree(root, ignore_errors=True)  # Ray's session logs, the jobs' run dirs and storage
        assert left == [], f"processes of the test cluster survived: {left}"


def _job(cluster, tiny_bert, sst2_small, name: str, **over) -> tuple[Path, dict]:
    raw = tiny_job(cluster.root / name / "run", tiny_bert, sst2_small, **{
        "data.max_train_examples": 48, "data.max_eval_examples": 24, "train.epochs": 1, "train.grad_accum": 1,
        "train.zero_stage": 2, "scaling.worker_resources": {SLOT: 1}, "ray.storage_path": str(cluster.root / name / "shared"),
        **over})
    path = cluster.root / name / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _node_ids(cluster) -> dict:
    """sinkd_head / sinkd_worker -> node id of the live node that offers it."""
    return {marker: n["node_id"] for n in cluster.alive_nodes() for marker in ("sinkd_head", "sinkd_worker")
            if marker in n["resources_total"]}


def _worker_nodes(cluster, submission_id: str) -> list[str]:
    """Node ids of every Ray Train worker actor the job created (alive or dead), in creation order."""
    job_id = cluster.client().get_job_info(submission_id).job_id
    actors = cluster.state("actors", "class_name=RayTrainWorker", f"job_id={job_id}")
    return [a["node_id"] for a in sorted(actors, key=lambda a: a.get("actor_id", ""))]


def _state(storage: Path, stage: str = "sinkd") -> dict:
    checkpoint = stage_checkpoint(str(storage / stage))
    assert Path(checkpoint.path).is_relative_to(storage), checkpoint.path
    return json.loads((Path(checkpoint.path) / STATE_FILE).read_text())


def test_a_failing_job_reports_its_error_and_exit_code_through_both_submit_commands(cluster, tiny_bert, sst2_small):
    """A config error only the cluster can see (ranges are checked there; `sinkd submit` checks keys and
    types locally): `ray job submit` fails, `sinkd submit --follow` streams the one-line error and exits 2."""
    job, _ = _job(cluster, tiny_bert, sst2_small, "bad", **{"train.epochs": 0})
    ray_cmd = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--",
                              "sinkd", "train", str(job), "--no-progress"],
                             cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert ray_cmd.returncode != 0 and "train.epochs: must be > 0, got 0" in ray_cmd.stdout + ray_cmd.stderr
    ours = subprocess.run([str(BIN / "sinkd"), "submit", "--address", cluster.dashboard, "--working-dir", str(job.parent),
                           "--follow", "train", job.name], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 2, ours.stdout[-2000:] + ours.stderr[-2000:]
    assert ours.stdout.splitlines()[0].startswith("raysubmit_")
    assert "sinkd: error: train.epochs: must be > 0, got 0" in ours.stdout


def test_job_runs_on_both_nodes_survives_losing_one_and_checkpoints_to_shared_storage(cluster, tiny_bert, sst2_small,
                                                                                      tmp_path):
    """`sinkd submit --follow` with cluster/runtime_env.yaml; one training worker per node; the worker
    node's processes are killed after the first checkpoint; the TorchTrainer (FailureConfig) waits for a
    second sinkd_trainer slot, which the restarted node brings, and resumes from the shared storage."""
    from ray.job_submission import JobStatus

    job, raw = _job(cluster, tiny_bert, sst2_small, "node_lost", **{
        "data.max_train_examples": 96, "train.checkpoint_every_steps": 1, "scaling.max_failures": 2})
    storage, run_dir = Path(raw["ray"]["storage_path"]), Path(raw["run_dir"])
    before = _node_ids(cluster)
    assert len(set(before.values())) == 2
    logs = {"out": tmp_path / "submit.out", "err": tmp_path / "submit.err"}
    with open(logs["out"], "w") as out, open(logs["err"], "w") as err:  # files: a full pipe would stall the follower
        follow = subprocess.Popen([str(BIN / "sinkd"), "submit", "--address", cluster.dashboard, "--runtime-env",
                                   "cluster/runtime_env.yaml", "--follow", "train", str(job)],
                                  cwd=REPO, env=cluster.env, stdout=out, stderr=err)
    try:
        client, deadline = cluster.client(), time.time() + 480
        while not logs["out"].read_text().endswith("\n") and follow.poll() is None:  # the job id comes first
            time.sleep(0.2)
        submission_id = logs["out"].read_text().split("\n")[0].strip()
        assert submission_id.startswith("raysubmit_"), logs["err"].read_text()[-3000:]
        while not list((storage / "sinkd").glob("checkpoint_*")):  # training is under way on both nodes
            assert time.time() < deadline and follow.poll() is None, client.get_job_logs(submission_id)[-3000:]
            time.sleep(0.2)
        cluster.worker.stop()
        assert client.get_job_status(submission_id) == JobStatus.RUNNING  # stopped mid-run, not after it
        cluster.wait_nodes(1)
        cluster.worker.start()
        cluster.wait_nodes(2)
        after = _node_ids(cluster)
        follow.wait(timeout=max(10.0, deadline - time.time()))
    finally:
        if follow.poll() is None:
            follow.kill()
    out, err = logs["out"].read_text(), logs["err"].read_text()
    assert follow.returncode == 0, out[-3000:] + err[-3000:]
    assert "sinkd run:" in out  # the job's summary table, streamed to the submitter

    # One training worker on each node before the loss, on the head and the new node after it.
    assert after["sinkd_head"] == before["sinkd_head"] and after["sinkd_worker"] != before["sinkd_worker"]
    placed = _worker_nodes(cluster, submission_id)
    assert set(placed) == {before["sinkd_head"], before["sinkd_worker"], after["sinkd_worker"]}, placed
    # Every step once across the restart (96 rows / 2 workers / batch 8 = 6), resumed from a checkpoint
    # in the shared storage_path; nothing in RUN_DIR/ray.
    state = _state(storage)
    assert len(state["resumed_from"]) == 1 and 1 <= state["resumed_from"][0] < 6, state["resumed_from"]
    assert [s for s, _ in state["loss_log"]] == list(range(1, 7))
    assert not (run_dir / "ray").exists()
    results = json.loads((run_dir / "results.json").read_text())
    accuracy, n_test = results["models"]["sinkd"]["test"]["accuracy"], results["data"]["test"]
    assert accuracy * n_test == pytest.approx(round(accuracy * n_test), abs=1e-9)  # scored on every test row once
    # `sinkd export` on this machine finds the stage's latest checkpoint through ray.storage_path.
    from pipelines.cli import main

    assert main(["export", str(job), "--out", str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "sinkd_task.json").read_text())
    assert exported["global_step"] == 6 and exported["checkpoint"].startswith(str(storage / "sinkd"))

    # The same checkpoint on a non-local pyarrow filesystem (in memory, standing in for S3): export
    # reads it through Ray's Checkpoint API (a download) and writes the same weights.
    import fsspec
    import pyarrow.fs
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForSequenceClassification

    from pipelines.recipes.export import export_checkpoint

    remote = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fsspec.filesystem("memory")))
    pyarrow.fs.copy_files(exported["checkpoint"], "/bucket/sinkd/ckpt", destination_filesystem=remote)
    export_checkpoint(Checkpoint("/bucket/sinkd/ckpt", filesystem=remote), tmp_path / "from_remote")
    meta = json.loads((tmp_path / "from_remote" / "sinkd_task.json").read_text())
    assert meta["checkpoint"].endswith("memory://bucket/sinkd/ckpt") and meta["global_step"] == 6
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "from_remote").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
