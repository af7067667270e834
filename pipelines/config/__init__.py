"""The job configuration: schema (dataclasses), loading with `--set` overrides, task-free checks, paths.

Dependencies run one way: config imports only sinkd; tasks, train and recipes import config.
"""

from .checks import check_common, objective_config, teacher_train_config
from .loading import DEFAULT_CONFIG, apply_override, load_config, read_yaml, set_key
from .paths import (data_file_paths, join_storage, model_config, model_dir, resolve_path, resolve_paths,
                    stage_model_dir, storage_root)
from .schema import (Config, DataConfig, DebugConfig, LMConfig, LogitCacheConfig, RayConfig, ScalingConfig,
                     StudentConfig, TeacherConfig, TrainConfig)
from .typed import ConfigError, build_dataclass

__all__ = [
    "DEFAULT_CONFIG", "Config", "ConfigError", "DataConfig", "DebugConfig", "LMConfig", "LogitCacheConfig",
    "RayConfig", "ScalingConfig", "StudentConfig", "TeacherConfig", "TrainConfig", "apply_override",
    "build_dataclass", "check_common", "data_file_paths", "join_storage", "load_config", "model_config", "model_dir",
    "objective_config", "read_yaml", "resolve_path", "resolve_paths", "set_key", "stage_model_dir", "storage_root",
    "teacher_train_config",
]
