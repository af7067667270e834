"""Model folders carried to other nodes through an object-store ray.storage_path (moto's S3 server on
the loopback address): shipped once per content, fetched once per node into a node-local copy that
is byte-for-byte the driver's folder, never read half-way, and left alone on a shared storage path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from s3_server import BUCKET

from pipelines.config import Config, ConfigError
from pipelines.tasks import shipping


def _cfg(storage: str | None) -> Config:
    cfg = Config()
    cfg.ray.storage_path = storage
    return cfg


@pytest.fixture
def model(tmp_path) -> Path:
    folder = tmp_path / "driver" / "teacher"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(os.urandom(300_000))
    (folder / "sub" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    return folder


@pytest.fixture
def node(tmp_path, monkeypatch):
    """Another node: its own download cache, and no memory of what this process shipped."""
    monkeypatch.setenv("SINKD_SHIPPED_CACHE", str(tmp_path / "node_cache"))
    monkeypatch.setattr(shipping, "_origins", {})
    return tmp_path / "node_cache"


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_local_or_shared_storage_path_ships_nothing(model, tmp_path):
    for storage in (None, str(tmp_path / "nfs"), f"file://{tmp_path / 'nfs'}"):
        assert shipping.ship(str(model), _cfg(storage)) == str(model)
    assert shipping.ship("bert-base-uncased", _cfg("s3://bucket/run")) == "bert-base-uncased"  # a hub id
    assert shipping.fetch(str(model)) == str(model) and shipping.fetch(None) is None
    assert not (tmp_path / "nfs").exists()


def test_ship_uploads_once_per_content_and_fetch_gives_another_node_the_same_bytes(s3, model, node):
    cfg = _cfg(s3.uri("run"))
    uri = shipping.ship(str(model), cfg)
    assert uri.startswith(f"s3://{BUCKET}/run/shipped/teacher-") and uri.endswith(f"?endpoint_override={s3.endpoint}&scheme=http")
    prefix = uri.split("?")[0][len(f"s3://{BUCKET}/"):]
    stored = s3.keys(prefix)
    assert sorted(k[len(prefix) + 1:] for k in stored if not k.endswith("/")) == \
        sorted([*_tree(model), shipping.MANIFEST])
    assert shipping.ship(str(model), cfg) == uri and s3.keys(prefix) == stored  # unchanged: not sent again
    assert shipping.fetch(uri) == str(model)  # the shipping process reads its own folder

    shipping._origins.clear()  # from here on, a process on another node
    local = Path(shipping.fetch(uri))
    assert local.parent == node and {k: v for k, v in _tree(local).items() if k != shipping.MANIFEST} == _tree(model)
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert shipping.fetch(uri) == str(local) and (local / "model.safetensors").stat().st_mtime_ns == stamp  # once per node
    assert [p.name for p in node.iterdir()] == [local.name]  # no partial download left beside it

    (model / "config.json").write_text('{"model_type": "bert", "changed": true}')  # new content: a new folder
    assert shipping.ship(str(model), cfg) != uri


def test_an_upload_without_its_manifest_is_never_read(s3, model, node):
    uri = shipping.ship(str(model), _cfg(s3.uri("partial")))
    key = uri.split("?")[0][len(f"s3://{BUCKET}/"):] + "/" + shipping.MANIFEST
    s3.client.delete_object(Bucket=BUCKET, Key=key)  # as if the upload had stopped before its last file
    shipping._origins.clear()
    with pytest.raises(FileNotFoundError, match=r"shipped folder s3://sinkd/partial/shipped/teacher-\w+ is incomplete"):
        shipping.fetch(uri)
    assert not node.exists() or not any(node.iterdir())
    assert shipping.ship(str(model), _cfg(s3.uri("partial"))) == uri  # shipping again completes it
    shipping._origins.clear()
    assert Path(shipping.fetch(uri)).parent == node


def test_an_unwritable_bucket_names_the_key(s3, model):
    with pytest.raises(ConfigError, match=r"^student.path: cannot upload .*teacher to s3://no-such-bucket/run/shipped/"):
        shipping.ship(str(model), _cfg(s3.uri("run", bucket="no-such-bucket")), "student.path")


def test_a_stage_ships_teacher_path_only_when_the_student_copies_its_pretrained_layers(s3, model, tmp_path):
    """shipped_inputs: the stage's model always, teacher.path (before fine-tuning) only with
    student.layers_from: pretrained, where the workers build the student from it."""
    from pipelines.tasks.protocol import Stage
    from pipelines.train.fit import shipped_inputs

    cfg = _cfg(s3.uri("run"))
    cfg.teacher.path = str(model)
    tuned = tmp_path / "driver" / "tuned"
    tuned.mkdir()
    (tuned / "config.json").write_text('{"model_type": "bert"}')
    stage = Stage(name="sinkd", model_path=str(tuned), objective={}, train=cfg.train)
    shipped_cfg, shipped_stage = shipped_inputs(cfg, stage)
    assert shipped_stage.model_path.startswith(f"s3://{BUCKET}/run/shipped/tuned-")
    assert shipped_cfg.teacher.path == str(model)  # not read by the workers: not uploaded
    cfg.student.layers_from = "pretrained"
    shipped_cfg, _ = shipped_inputs(cfg, stage)
    assert shipped_cfg.teacher.path.startswith(f"s3://{BUCKET}/run/shipped/teacher-") and cfg.teacher.path == str(model)
