"""Checks of a typed Config that hold for every task: value ranges, the objective and baselines, the
teacher's training overrides, the cluster settings. Task-specific checks live with their task."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .schema import Config, TrainConfig
from .typed import ConfigError, build_dataclass


def check_common(cfg: Config) -> None:
    """Cheap checks of everything knowable before data or Ray, except what a task checks itself (the
    objective mappings among them: each task builds its own loss)."""
    check_ranges(cfg)
    for name in cfg.baselines:
        if name in ("teacher", cfg.name):
            raise ConfigError(f"baselines.{name}: name clashes with the teacher or the main run '{cfg.name}'")
    teacher_train_config(cfg)
    check_cluster(cfg)


def teacher_train_config(cfg: Config) -> TrainConfig:
    """`train` with the `teacher.train` overrides: the teacher fine-tuning stage's settings."""
    for key in cfg.teacher.train:
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"teacher.train.{key}: unknown key (it overrides keys of train)")
    return build_dataclass(TrainConfig, {**dataclasses.asdict(cfg.train), **cfg.teacher.train}, "teacher.train")


# URI schemes Ray Train/Tune storage accepts, by the pyarrow.fs class that serves them.
STORAGE_SCHEMES = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
                   "viewfs": "HadoopFileSystem", "abfs": "AzureFileSystem", "abfss": "AzureFileSystem",
                   "file": "LocalFileSystem"}


def check_cluster(cfg: Config) -> None:
    """ray.storage_path (a creatable local dir or a URI pyarrow.fs serves) and scaling.worker_resources."""
    for name, amount in cfg.scaling.worker_resources.items():
        if name in ("CPU", "GPU"):
            raise ConfigError(f"scaling.worker_resources.{name}: set scaling.{name.lower()}s_per_worker instead")
        if amount <= 0:
            raise ConfigError(f"scaling.worker_resources.{name}: must be > 0, got {amount}")
    value = cfg.ray.storage_path
    if value is None:
        return
    if not value.strip():
        raise ConfigError("ray.storage_path: must not be empty (leave it out for RUN_DIR/ray)")
    if "://" in value:
        import pyarrow.fs

        scheme, _, rest = value.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES or not hasattr(pyarrow.fs, STORAGE_SCHEMES[scheme.lower()]):
            known = sorted(k for k, v in STORAGE_SCHEMES.items() if hasattr(pyarrow.fs, v))
            raise ConfigError(f"ray.storage_path: URI scheme '{scheme}' is not one pyarrow.fs serves ({', '.join(known)}): {value}")
        if not rest.strip("/"):
            raise ConfigError(f"ray.storage_path: {value} names no bucket or path")
        if scheme.lower() != "file":
            return
        value = "/" + rest.lstrip("/")
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"ray.storage_path: {path} exists and is not a directory")
    parent = next(p for p in (path, *path.parents) if p.exists())  # the first existing ancestor
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"ray.storage_path: cannot create {path} ({parent} is not a writable directory)")


def objective_config(values: dict, prefix: str = "objective"):
    """sinkd.ObjectiveConfig from the YAML mapping; its ValueErrors become ConfigErrors naming the key."""
    from sinkd import ObjectiveConfig

    try:
        return ObjectiveConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0]
        if msg.startswith("objective"):
            msg = msg[len("objective"):].lstrip(".")
        raise ConfigError(f"{prefix}.{msg}" if msg and not msg.startswith(":") else f"{prefix}{msg}") from None


def check_ranges(cfg: Config) -> None:
    def positive(key, value, allow_zero=False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    t, d, s = cfg.train, cfg.data, cfg.scaling
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "lr", "keep_checkpoints",
                 "log_every_steps", "checkpoint_every_steps", "max_steps_per_epoch"):
        positive(f"train.{name}", getattr(t, name))
    for name in ("weight_decay", "max_grad_norm", "shuffle_buffer"):
        positive(f"train.{name}", getattr(t, name), allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.precision != "fp32" and not s.use_gpu:
        raise ConfigError(f"train.precision: {t.precision} needs scaling.use_gpu: true (CPU runs are fp32)")
    positive("scaling.num_workers", s.num_workers)
    positive("scaling.cpus_per_worker", s.cpus_per_worker, allow_zero=True)
    positive("scaling.gpus_per_worker", s.gpus_per_worker)
    positive("scaling.max_failures", s.max_failures, allow_zero=True)
    positive("data.max_length", d.max_length)
    positive("data.max_train_examples", d.max_train_examples)
    positive("data.max_eval_examples", d.max_eval_examples)
    positive("ray.num_cpus", cfg.ray.num_cpus)
    if cfg.ray.num_cpus is not None and cfg.ray.address is None \
            and cfg.ray.num_cpus < s.num_workers * s.cpus_per_worker + 1:
        # Ray Data's tokenising tasks need a whole CPU beside the workers, or the first epoch waits forever.
        raise ConfigError(f"ray.num_cpus: {cfg.ray.num_cpus} leaves no CPU for Ray Data beside {s.num_workers} "
                          f"worker(s) x {s.cpus_per_worker:g} CPU; use >= {s.num_workers * s.cpus_per_worker + 1:g}")
    positive("ray.object_store_memory_mb", cfg.ray.object_store_memory_mb)
    positive("debug.fail_at_step", cfg.debug.fail_at_step)
    for name in ("validation_fraction", "test_fraction"):
        if not 0 < getattr(d, name) < 1:
            raise ConfigError(f"data.{name}: must be in (0, 1), got {getattr(d, name)}")
    if not cfg.name or not cfg.name.replace("-", "_").isidentifier():
        raise ConfigError(f"name: must be a simple identifier (letters, digits, _ or -), got {cfg.name!r}")
    if not cfg.run_dir:
        raise ConfigError("run_dir: must not be empty")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir: {cfg.run_dir} exists and is not a directory")

