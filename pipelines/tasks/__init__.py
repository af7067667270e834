"""The task registry: `task_type` -> its Task, decided here once; below this, code asks its Task.

    task = get_task(cfg.task_type)          # the only place a task type is looked up
    cfg = load_checked_config("job.yaml")  # typed, then every check (task-free and the task's), paths resolved

A new kind of job is a sibling folder implementing pipelines.tasks.protocol.Task, and one entry in TASKS.
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError, check_common, load_config, resolve_paths
from .causal_lm import CausalLMTask
from .classification import ClassificationTask
from .cross_tokenizer import CrossTokenizerTask
from .protocol import Objective, Prepared, Rows, Stage, StageMeta, Task, WorkerContext

TASKS: dict[str, Task] = {"classification": ClassificationTask(), "causal_lm": CausalLMTask(),
                          "cross_tokenizer": CrossTokenizerTask()}  # exports causal LMs: after causal_lm


def get_task(task_type: str) -> Task:
    if task_type not in TASKS:
        raise ConfigError(f"task_type: must be one of {', '.join(TASKS)}, got {task_type!r}")
    return TASKS[task_type]


def task_for_kind(kind: str) -> Task:
    """The task whose models are of this kind (StageMeta.kind, recorded in sinkd_task.json)."""
    for task in TASKS.values():
        if kind in task.kinds:
            return task
    raise ValueError(f"no task exports models of kind {kind!r}")


def check_config(cfg: Config) -> Config:
    """Every check that can fail without training, in place: task-free ones, then the task's (files,
    models, tokenizers: I/O, once); then pkg:// and relative paths become absolute for the workers."""
    task = get_task(cfg.task_type)
    check_common(cfg)
    task.objective(cfg.objective)
    for name, overrides in cfg.baselines.items():
        task.objective({**cfg.objective, **overrides}, prefix=f"baselines.{name}")
    task.check(cfg)
    resolve_paths(cfg)
    return cfg


def checked_config(raw: dict) -> Config:
    """A job mapping -> a typed, checked Config (raises ConfigError naming the key, file or row)."""
    return check_config(Config.from_dict(raw))


def load_checked_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A YAML file (or the embedded default job) with overrides -> a typed, checked Config."""
    return check_config(load_config(path, overrides))


__all__ = ["TASKS", "Objective", "Prepared", "Rows", "Stage", "StageMeta", "Task", "WorkerContext", "check_config",
           "checked_config", "get_task", "load_checked_config", "task_for_kind"]
