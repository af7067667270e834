"""A Ray cluster whose nodes share nothing but an object store: `ray start --head` + `ray start --address`
on this machine, the worker node in a mount namespace of its own with an empty tmpfs over the test's
whole temporary tree (the driver's run dirs, the data files, the model folders), and ray.storage_path
on moto's S3 server on the loopback address. One training worker per node (each node offers one
`sinkd_trainer` slot): the isolated worker reads the teacher, the student and everything else through
Ray or the bucket, or the job fails. The same cluster runs `sinkd tune` with its trials on the isolated
node, and `ray job submit` / `sinkd submit` report a job's error."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from local_cluster import BIN, LocalCluster, can_isolate
from pipeline_helpers import tiny_job
from s3_server import BUCKET

from pipelines.train.files import STATE_FILE

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SLOT, ISOLATED = "sinkd_trainer", "sinkd_isolated"


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    why = can_isolate()
    if why:  # a failure, not a skip: this test is what proves the cluster path
        pytest.fail(f"cannot start a node in its own mount namespace (util-linux unshare, root or user namespaces): {why}")
    root = Path(tempfile.mkdtemp(prefix="sinkd-iso-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    hidden = tmp_path_factory.getbasetemp()  # every fixture's models and data, and the jobs' run dirs
    c = LocalCluster(root, head_cpus=2, worker_cpus=2, head_resources={SLOT: 1, "sinkd_head": 1},
                     worker_resources={SLOT: 1, ISOLATED: 2}, worker_hidden=[hidden],
                     worker_env={"SINKD_SHIPPED_CACHE": str(hidden / "isolated_node_cache")})  # in its tmpfs
    try:
        c.start()
        yield c
    finally:
        c.stop()
        left = c.leftovers()
        if not left:
            shutil.rmtree(root, ignore_errors=True)  # Ray's session logs
        assert left == [], f"processes of the test cluster survived: {left}"


def _job(cluster, s3, tiny_bert, sst2_small, folder: Path, **over) -> tuple[Path, dict]:
    raw = tiny_job(folder / "run", tiny_bert, sst2_small, **{
        "data.max_train_examples": 96, "data.max_eval_examples": 24, "train.epochs": 1, "train.grad_accum": 1,
        "train.zero_stage": 2, "train.checkpoint_every_steps": 1, "scaling.worker_resources": {SLOT: 1},
        "scaling.max_failures": 2, "ray.address": cluster.address, "ray.storage_path": s3.uri(folder.name), **over})
    path = folder / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def _isolated_node(cluster) -> str | None:
    return next((n["node_id"] for n in cluster.alive_nodes() if ISOLATED in n["resources_total"]), None)


def _state(s3, prefix: str) -> dict:
    """The sinkd_state.json of the stage's newest checkpoint in the bucket."""
    keys = sorted(k for k in s3.keys(prefix) if k.endswith("/" + STATE_FILE))
    assert keys, f"no checkpoint under s3://{BUCKET}/{prefix}"
    return json.loads(s3.keys(keys[-1])[keys[-1]])


def test_a_job_runs_with_a_node_that_sees_no_driver_file_and_resumes_when_it_is_lost(cluster, s3, tiny_bert,
                                                                                     sst2_small, tmp_path):
    """Teacher fine-tuning and a SinKD stage, one worker per node, checkpoints in the bucket; the
    isolated node is killed after the student's first checkpoint and restarted with empty folders
    (it fetches everything again); every step runs once; export and test scores as on one machine."""
    job, raw = _job(cluster, s3, tiny_bert, sst2_small, tmp_path / "iso_job", **{"teacher.finetune": "always"})
    run_dir, prefix = Path(raw["run_dir"]), "iso_job/sinkd/"
    first = _isolated_node(cluster)
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with open(out, "w") as o, open(err, "w") as e:  # files: a full pipe would stall the driver
        driver = subprocess.Popen([str(BIN / "sinkd"), "train", str(job), "--no-progress"], cwd=tmp_path,
                                  env=cluster.env, stdout=o, stderr=e)
    try:
        deadline = time.time() + 600
        while not any("/checkpoint_" in k for k in s3.keys(prefix)):  # the student stage is under way
            assert time.time() < deadline and driver.poll() is None, out.read_text()[-3000:] + err.read_text()[-5000:]
            time.sleep(0.3)
        cluster.worker.stop()
        assert driver.poll() is None  # stopped mid-stage, not after it
        cluster.wait_nodes(1)
        cluster.worker.start()
        cluster.wait_nodes(2)
        second = _isolated_node(cluster)
        driver.wait(timeout=max(10.0, deadline - time.time()))
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out.read_text()[-3000:] + err.read_text()[-5000:]
    assert second != first

    # Training workers ran on the head, the first isolated node and its replacement.
    placed = {a["node_id"] for a in cluster.state("actors", "class_name=RayTrainWorker")}
    head = next(n["node_id"] for n in cluster.alive_nodes() if "sinkd_head" in n["resources_total"])
    assert {head, first, second} <= placed, placed
    # Each of the 6 steps once (96 rows / 2 workers / batch 8) across the loss, resumed from the bucket;
    # nothing persisted on the driver's disk but the exported models, scores and reports.
    state = _state(s3, prefix)
    assert len(state["resumed_from"]) == 1 and 1 <= state["resumed_from"][0] < 6, state["resumed_from"]
    assert [s for s, _ in state["loss_log"]] == list(range(1, 7))
    assert not (run_dir / "ray").exists()
    shipped = {k.split("/")[2].rsplit("-", 1)[0] for k in s3.keys("iso_job/shipped/") if k.count("/") > 2}
    assert shipped == {"tiny_bert", "teacher", "sinkd"}, shipped  # the model fine-tuned, its result, the student
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["models"]) == {"teacher", "sinkd"}
    for name, info in results["models"].items():
        accuracy, n_test = info["test"]["accuracy"], results["data"]["test"]
        assert accuracy * n_test == pytest.approx(round(accuracy * n_test), abs=1e-9), name  # every test row once
    # `sinkd export` on the driver reads the stage's newest checkpoint from the bucket.
    from pipelines.cli import main

    assert main(["export", str(job), "--out", str(tmp_path / "exported")]) == 0
    exported = json.loads((tmp_path / "exported" / "sinkd_task.json").read_text())
    assert exported["global_step"] == 6 and exported["checkpoint"].startswith(f"s3://{BUCKET}/iso_job/sinkd/")
    # ... and writes the model to the bucket when asked: the same files, sinkd_task.json among them.
    assert main(["export", str(job), "--out", s3.uri("iso_job/exported/sinkd")]) == 0
    uploaded = {k.rsplit("/", 1)[1]: v for k, v in s3.keys("iso_job/exported/sinkd/").items() if not k.endswith("/")}
    local = {p.name: p.read_bytes() for p in (tmp_path / "exported").iterdir()}
    assert uploaded.keys() == local.keys() and uploaded["model.safetensors"] == local["model.safetensors"]


def test_tune_trials_run_on_the_isolated_node(cluster, s3, tiny_bert, sst2_small, tmp_path):
    """Two `sinkd tune` trials whose drivers and workers can only run on the isolated node (its
    sinkd_isolated resource): the given teacher reaches them through the bucket."""
    job, raw = _job(cluster, s3, tiny_bert, sst2_small, tmp_path / "iso_tune", **{
        "data.max_train_examples": 32, "scaling.num_workers": 1, "scaling.worker_resources": {ISOLATED: 1},
        "train.checkpoint_every_steps": None})
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"metric": "val_accuracy", "mode": "max", "num_samples": 1, "max_concurrent_trials": 1,
                                     "trial_resources": {"cpu": 0.01, ISOLATED: 1}, "scheduler": "none",
                                     "space": {"objective.sinkhorn.eps": {"grid": [0.05, 0.2]}}}))
    cmd = subprocess.run([str(BIN / "sinkd"), "tune", str(job), str(space)], cwd=tmp_path,
                         env=cluster.env, capture_output=True, text=True, timeout=600)
    assert cmd.returncode == 0, cmd.stdout[-3000:] + cmd.stderr[-5000:]
    trials = json.loads((Path(raw["run_dir"]) / "trials.json").read_text())
    assert [t["status"] for t in trials] == ["OK", "OK"], trials
    assert sorted(t["params"]["objective.sinkhorn.eps"] for t in trials) == [0.05, 0.2]
    assert any(k.startswith("iso_tune/shipped/tiny_bert-") for k in s3.keys("iso_tune/shipped/"))


def test_a_failing_job_reports_its_error_and_exit_code_through_both_submit_commands(cluster, s3, tiny_bert,
                                                                                   sst2_small, tmp_path):
    """A config error only the cluster can see (ranges are checked there; `sinkd submit` checks keys and
    types locally): `ray job submit` fails, `sinkd submit --follow` streams the one-line error and exits 2."""
    job, _ = _job(cluster, s3, tiny_bert, sst2_small, tmp_path / "bad", **{"train.epochs": 0})
    ray_cmd = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard, "--",
                              "sinkd", "train", str(job), "--no-progress"],
                             cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=300)
    assert ray_cmd.returncode != 0 and "train.epochs: must be > 0, got 0" in ray_cmd.stdout + ray_cmd.stderr
    ours = subprocess.run([str(BIN / "sinkd"), "submit", "--address", cluster.dashboard, "--working-dir", str(job.parent),
                           "--follow", "train", job.name], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert ours.returncode == 2, ours.stdout[-2000:] + ours.stderr[-2000:]
    assert ours.stdout.splitlines()[0].startswith("raysubmit_")
    assert "sinkd: error: train.epochs: must be > 0, got 0" in ours.stdout
