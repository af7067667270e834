"""ray.storage_path and scaling.worker_resources: checked before any work, one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipelines.tasks import checked_config
from pipeline_helpers import tiny_job

from pipelines.cli import main
from pipelines.config import ConfigError, storage_root


@pytest.fixture
def raw(tmp_path, tiny_bert, sst2_small):
    return tiny_job(tmp_path / "run", tiny_bert, sst2_small)


def _with(raw: dict, section: str, key: str, value) -> dict:
    raw.setdefault(section, {})[key] = value
    return raw


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        checked_config(raw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_default_storage_is_the_run_dir(raw, tmp_path):
    cfg = checked_config(raw)
    assert cfg.ray.storage_path is None and storage_root(cfg) == str(tmp_path / "run" / "ray")


def test_local_storage_is_made_absolute_and_not_created_by_validation(raw, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = checked_config(_with(raw, "ray", "storage_path", "shared/a/b"))
    assert cfg.ray.storage_path == str(tmp_path / "shared" / "a" / "b") == storage_root(cfg)
    assert not (tmp_path / "shared").exists()  # validation writes nothing


@pytest.mark.parametrize("uri", ["s3://bucket/sinkd/run1", "gs://bucket/prefix", "file:///tmp/sinkd-storage"])
def test_uris_pyarrow_serves_are_kept_verbatim(raw, uri):
    cfg = checked_config(_with(raw, "ray", "storage_path", uri))
    assert cfg.ray.storage_path == uri == storage_root(cfg)


@pytest.mark.parametrize("value, expected", [
    ("foo://bucket/x", "ray.storage_path: URI scheme 'foo' is not one pyarrow.fs serves ("),
    ("http://host/x", "ray.storage_path: URI scheme 'http' is not one pyarrow.fs serves"),
    ("s3://", "ray.storage_path: s3:// names no bucket or path"),
    ("", "ray.storage_path: must not be empty"),
    (42, "ray.storage_path: expected a string, got 42"),
])
def test_bad_storage_names_the_key(raw, value, expected):
    assert expected in _error(_with(raw, "ray", "storage_path", value))


def test_storage_under_a_file_cannot_be_created(raw, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert f"ray.storage_path: cannot create {blocker / 'sub'} ({blocker} is not a writable directory)" \
        in _error(_with(raw, "ray", "storage_path", str(blocker / "sub")))
    assert f"ray.storage_path: {blocker} exists and is not a directory" in _error(_with(raw, "ray", "storage_path", str(blocker)))
    assert "cannot create" in _error(_with(raw, "ray", "storage_path", f"file://{blocker}/sub"))


@pytest.mark.parametrize("value, expected", [
    ({"CPU": 1}, "scaling.worker_resources.CPU: set scaling.cpus_per_worker instead"),
    ({"trainer_slot": 0}, "scaling.worker_resources.trainer_slot: must be > 0, got 0.0"),
    ({"trainer_slot": "x"}, "scaling.worker_resources.trainer_slot: expected a number, got 'x'"),
])
def test_bad_worker_resources_name_the_key(raw, value, expected):
    assert expected in _error(_with(raw, "scaling", "worker_resources", value))


def test_cli_rejects_a_bad_scheme_in_one_line_before_any_work(raw, tmp_path, capsys):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--set", "ray.storage_path=ftp://host/runs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sinkd: error: ray.storage_path: URI scheme 'ftp'") and len(err.splitlines()) == 1
    assert not Path(raw["run_dir"]).exists()
