"""ray.storage_path at check time, against a real S3-compatible server (moto's, on the loopback
address) and local folders: the write probe (a missing bucket, rejected credentials, an unknown
scheme: one line naming the key; a good bucket: nothing left behind, nothing existing touched) and
the owner marker (a storage path reused by another run is refused before any stage starts, a rerun
of the same job resumes). No test here starts Ray."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import tiny_job
from s3_server import BUCKET

from pipelines.cli import main
from pipelines.config import ConfigError, join_storage
from pipelines.recipes import compare, tune
from pipelines.recipes.job import check_storage, plan_job, stage_claim, stage_storage
from pipelines.recipes.storage import MARKER, probe_storage, write_claim
from pipelines.recipes.tune_space import parse_space
from pipelines.tasks import checked_config

def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    return str(info.value)


# ----------------------------------------------------------------------------- the write probe


def test_probe_passes_on_a_bucket_touches_nothing_and_leaves_nothing(s3):
    s3.client.put_object(Bucket=BUCKET, Key="probe/run/keep.txt", Body=b"earlier run")
    probe_storage(s3.uri("probe/run"))
    probe_storage(s3.uri("probe/fresh"))  # a prefix nothing is under yet
    # Besides what was there, at most the empty directory markers pyarrow's delete_file keeps (the
    # same objects Ray's own create_dir of the storage path writes).
    assert s3.keys("probe/") | {"probe/run/": b"", "probe/fresh/": b""} == \
        {"probe/run/keep.txt": b"earlier run", "probe/run/": b"", "probe/fresh/": b""}


def test_probe_names_a_missing_bucket_in_one_line(s3):
    assert _error(probe_storage, s3.uri("run", bucket="no-such-bucket")) == \
        "ray.storage_path: cannot write to s3://no-such-bucket/run (NO_SUCH_BUCKET: The specified bucket does not exist)"


def test_probe_names_rejected_credentials(s3, monkeypatch):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on
    message = _error(probe_storage, s3.uri("run"))
    assert message.startswith(f"ray.storage_path: cannot write to s3://{BUCKET}/run (INVALID_ACCESS_KEY_ID: ")
    assert "endpoint_override" not in message  # the query (which may hold keys) is not shown


def test_probe_names_a_scheme_pyarrow_cannot_open():
    assert _error(probe_storage, "foo://bucket/run") == \
        "ray.storage_path: cannot open foo://bucket/run (Unrecognized filesystem type in URI: foo://bucket/run)"


def test_probe_of_local_folders(tmp_path):
    (tmp_path / "keep.txt").write_text("earlier run")
    probe_storage(str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "earlier run"
    probe_storage(str(tmp_path / "not" / "yet"))  # checked for creatability elsewhere; not made here
    assert not (tmp_path / "not").exists()


def test_join_storage_keeps_the_query_at_the_end():
    assert join_storage("s3://b/run/?endpoint_override=h:1&scheme=http", "tune", "t1") == \
        "s3://b/run/tune/t1?endpoint_override=h:1&scheme=http"
    assert join_storage("/runs/x/", "sinkd") == "/runs/x/sinkd"


# ----------------------------------------------------------------------------- through the CLI, before any work


@pytest.fixture
def job(tmp_path, tiny_bert, sst2_small):
    """A job YAML (and its raw mapping) of the tiny pipeline job."""
    raw = tiny_job(tmp_path / "run_a", tiny_bert, sst2_small)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_train_check_refuses_a_missing_bucket_before_any_work(s3, job, capsys):
    path, raw = job
    assert main(["train", str(path), "--check", "--set", f"ray.storage_path={s3.uri('run', bucket='nope')}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sinkd: error: ray.storage_path: cannot write to s3://nope/run (NO_SUCH_BUCKET: The specified bucket does not exist)"
    assert not Path(raw["run_dir"]).exists()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "shared" / "storage")
    return request.getfixturevalue("s3").uri(f"claims/{uuid.uuid4().hex[:8]}")


def _cfg(raw: dict, **sets):
    raw = yaml.safe_load(yaml.safe_dump(raw))
    for dotted, value in sets.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    return checked_config(raw)


def test_a_storage_path_reused_by_another_run_is_refused(job, storage, tmp_path, capsys):
    path, raw = job
    cfg_a = _cfg(raw, ray__storage_path=storage)
    plan = plan_job(cfg_a)  # a fresh storage path: accepted
    stage = cfg_a.name
    write_claim(stage_storage(cfg_a, stage), stage_claim(plan, stage))  # what a stage's start writes
    check_storage(plan)  # the same job again (a crash, a rerun): it resumes
    shown = storage.partition("?")[0]

    other_run = dataclasses.replace(plan, cfg=_cfg({**raw, "run_dir": str(tmp_path / "run_b")}, ray__storage_path=storage))
    assert _error(check_storage, other_run) == (
        f"ray.storage_path: {shown}/{stage} holds stage '{stage}' of another run (its run_dir is {cfg_a.run_dir}); "
        "use another ray.storage_path")
    other_settings = dataclasses.replace(plan, cfg=_cfg(raw, ray__storage_path=storage, train__lr=5e-4))
    assert _error(check_storage, other_settings) == (
        f"ray.storage_path: {shown}/{stage} holds stage '{stage}' of another run (train.lr changed); "
        "use another ray.storage_path")

    # The CLI says the same in one line, before anything is written to the new run_dir.
    assert main(["train", str(path), "--check", "--set", f"ray.storage_path={storage}",
                 "--set", f"run_dir={tmp_path / 'run_c'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sinkd: error: ray.storage_path: {shown}/{stage} holds stage '{stage}' of another run")
    assert len(err.splitlines()) == 1 and not (tmp_path / "run_c").exists()


class RayWouldStart(Exception):
    """Raised in place of ray_session: the recipe got past every check."""


def _refuse_ray(*args, **kwargs):
    raise RayWouldStart


SPACE = {"metric": "val_accuracy", "mode": "max", "num_samples": 1, "space": {"objective.beta": {"choice": [0.5, 1.0]}}}


def test_a_tune_experiment_under_a_reused_storage_path_is_refused(job, storage, tmp_path, monkeypatch):
    path, raw = job
    monkeypatch.setattr(tune, "ray_session", _refuse_ray)
    space = parse_space(SPACE)
    cfg_a = _cfg(raw, ray__storage_path=storage)
    with pytest.raises(RayWouldStart):
        tune.run_tune(cfg_a, space)  # a fresh storage path: past the checks, up to Ray's start
    shown = join_storage(storage, tune.EXPERIMENT).partition("?")[0]
    assert MARKER in _listing(storage, tune.EXPERIMENT)
    with pytest.raises(RayWouldStart):
        tune.run_tune(cfg_a, space)  # the same request again resumes
    cfg_b = _cfg({**raw, "run_dir": str(tmp_path / "run_b")}, ray__storage_path=storage)
    assert _error(tune.run_tune, cfg_b, space) == (
        f"ray.storage_path: {shown} holds the Tune experiment of another run (its run_dir is {cfg_a.run_dir}); "
        "use another ray.storage_path")
    other_space = parse_space({**SPACE, "num_samples": 2})
    assert "(space.num_samples changed)" in _error(tune.run_tune, _cfg(raw, ray__storage_path=storage), other_space)


def test_a_tune_experiment_in_a_reused_run_dir_is_refused(job, monkeypatch):
    """Without ray.storage_path the experiment lives in RUN_DIR/tune: another space is refused too."""
    path, raw = job
    monkeypatch.setattr(tune, "ray_session", _refuse_ray)
    with pytest.raises(RayWouldStart):
        tune.run_tune(_cfg(raw), parse_space(SPACE))
    with pytest.raises(RayWouldStart):  # more trials at once: the same experiment, resumed
        tune.run_tune(_cfg(raw), parse_space({**SPACE, "max_concurrent_trials": 2}))
    message = _error(tune.run_tune, _cfg(raw), parse_space({**SPACE, "space": {"objective.beta": {"choice": [0.1]}}}))
    assert message.startswith(f"run_dir: {raw['run_dir']}/tune holds the Tune experiment of another run (space.space.")


def test_a_comparison_under_a_reused_storage_path_is_refused(job, storage, tmp_path, monkeypatch):
    path, raw = job
    monkeypatch.setattr(compare, "ray_session", _refuse_ray)
    cfg_a = _cfg(raw, ray__storage_path=storage)
    with pytest.raises(RayWouldStart):
        compare.run_compare(cfg_a, ["ce", "kd"], seeds=1)
    with pytest.raises(RayWouldStart):
        compare.run_compare(cfg_a, ["ce", "kd"], seeds=1)  # the same comparison again resumes
    cfg_b = _cfg({**raw, "run_dir": str(tmp_path / "run_b")}, ray__storage_path=storage)
    shown = join_storage(storage, compare.EXPERIMENT).partition("?")[0]
    assert _error(compare.run_compare, cfg_b, ["ce", "kd"], 1) == (
        f"ray.storage_path: {shown} holds the comparison's trials of another run (its run_dir is {cfg_a.run_dir}); "
        "use another ray.storage_path")


def _listing(storage: str, *parts: str) -> list[str]:
    from pipelines.recipes.storage import open_storage
    import pyarrow.fs

    fs, path = open_storage(join_storage(storage, *parts))
    return [Path(info.path).name for info in fs.get_file_info(pyarrow.fs.FileSelector(path))]
