"""Paths a config names: `pkg://` files that Python packages ship, data files, model directories,
and where Ray persists a run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .schema import Config
from .typed import ConfigError


def resolve_path(value: str, key: str) -> Path:
    """Local path, or `pkg://module/inner/path` for files a Python package ships."""
    if value.startswith("pkg://"):
        module, _, inner = value[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{key}: python package '{module}' is not installed ({value})")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    return Path(value).expanduser()


def data_file_paths(files: dict) -> dict:
    """data.files as {split: existing Path}; a ConfigError names the first bad split or file."""
    paths = {}
    for split, value in files.items():
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"data.files.{split}: unknown split; use train, validation or test")
        paths[split] = resolve_path(value, f"data.files.{split}")
        if not paths[split].is_file():
            raise ConfigError(f"data.files.{split}: file not found: {paths[split]}")
    return paths


def model_dir(value: str | None, key: str) -> Path:
    """A Hugging Face model directory (one with config.json) named by the config key `key`."""
    if not value:
        raise ConfigError(f"{key}: required")
    path = resolve_path(value, key)
    if not (path / "config.json").is_file():
        what = "directory not found" if not path.exists() else "no config.json in"
        raise ConfigError(f"{key}: {what} {path} (expected a Hugging Face model directory)")
    return path


def model_config(path: str | Path) -> dict:
    """A model directory's config.json as a mapping."""
    return json.loads((Path(path) / "config.json").read_text())


def resolve_paths(cfg: Config) -> None:
    """pkg:// and relative paths -> absolute, so Ray workers (other cwd) find the same files."""
    cfg.teacher.path = str(resolve_path(cfg.teacher.path, "teacher.path").resolve())
    if cfg.student.path:
        cfg.student.path = str(resolve_path(cfg.student.path, "student.path").resolve())
    if cfg.student.tokenizer:
        cfg.student.tokenizer = str(resolve_path(cfg.student.tokenizer, "student.tokenizer").resolve())
    if cfg.data.load_from_disk:
        cfg.data.load_from_disk = str(resolve_path(cfg.data.load_from_disk, "data.load_from_disk").resolve())
    cfg.data.files = {k: str(resolve_path(v, f"data.files.{k}").resolve()) for k, v in cfg.data.files.items()}
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    cfg.lm.cache.dir = str(Path(cfg.lm.cache.dir).expanduser().resolve())
    if cfg.ray.storage_path and "://" not in cfg.ray.storage_path:  # workers and the Tune driver use other cwds
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).expanduser().resolve())


def storage_root(cfg: Config) -> str:
    """Where Ray Train and Tune persist this run (checkpoints, trial results): ray.storage_path or RUN_DIR/ray."""
    return cfg.ray.storage_path or str(Path(cfg.run_dir) / "ray")


def join_storage(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI; a URI's query (`?endpoint_override=...`) stays at
    the end, where pyarrow.fs.FileSystem.from_uri (and so Ray) reads it."""
    head, sep, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def stage_model_dir(cfg: Config, stage: str) -> Path:
    """Where a stage's trained model is exported: RUN_DIR/models/<stage>."""
    return Path(cfg.run_dir) / "models" / stage
