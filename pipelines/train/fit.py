"""One training stage as a Ray Train V2 TorchTrainer run, from the driver: the task's Ray datasets,
one worker group running pipelines.train.worker, live progress, checkpoints under ray.storage_path."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..config import Config, storage_root
from ..tasks import Prepared, Stage, get_task
from ..tasks.shipping import fetch, ship
from .worker import train_loop_per_worker


class StageInterrupted(KeyboardInterrupt):
    """A stage stopped before its last step (Ctrl-C); its checkpoints stay, a rerun resumes from them."""

    def __init__(self, stage: str, step: int, total: int):
        super().__init__(f"interrupted in stage {stage} at step {step} of {total}; rerun the same command to resume")
        self.stage, self.step, self.total = stage, step, total


def ingest_config(num_workers: int):
    """Ray Train's dataset config: preserve_order makes each rank's rows and their order a function of
    the data alone (a resumed run replays the same batches); the equal split never drops a real row
    because the task's datasets are padded to a multiple of the worker count. One worker reads the
    datasets whole: the same rows in the same order, without a split coordinator actor to start."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(datasets_to_split="all" if num_workers > 1 else [],
                      execution_options=ExecutionOptions(preserve_order=True))


def shipped_inputs(cfg: Config, stage: Stage) -> tuple[Config, Stage]:
    """The config and stage with the model folders workers read (the stage's model, a pretrained
    student, the student's own tokenizer, teacher.path when the student copies its layers) as
    references every node can fetch: uploaded to an object-store ray.storage_path once."""
    student = dataclasses.replace(cfg.student, path=ship(cfg.student.path, cfg, "student.path"),
                                  tokenizer=ship(cfg.student.tokenizer, cfg, "student.tokenizer"))
    teacher = cfg.teacher
    if cfg.student.layers_from == "pretrained":
        teacher = dataclasses.replace(teacher, path=ship(teacher.path, cfg, "teacher.path"))
    return (dataclasses.replace(cfg, student=student, teacher=teacher),
            dataclasses.replace(stage, model_path=ship(stage.model_path, cfg)))


def fit_stage(cfg: Config, prepared: Prepared, stage: Stage, show_progress: bool = True, callbacks: list | None = None):
    """Run one stage with Ray Train; returns the ray.train.Result (checkpoint = the final epoch's).
    callbacks: Ray Train UserCallbacks (Tune's TuneReportCallback when a trial runs this stage)."""
    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .progress import ProgressLog, ProgressUI

    DataContext.get_current().enable_progress_bars = False  # the ProgressUI below is this stage's bar
    task = get_task(cfg.task_type)
    cfg, stage = shipped_inputs(cfg, stage)
    here = dataclasses.replace(stage, model_path=fetch(stage.model_path))  # this process reads the files
    meta = task.stage_meta(cfg, prepared, here)
    s, t = cfg.scaling, stage.train
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}), **s.worker_resources}
    log = ProgressLog.remote()
    payload = {"task": task, "config": cfg.to_dict(), "stage": dataclasses.asdict(stage),
               "meta": dataclasses.asdict(meta), "progress": log, "fit_called": time.time()}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=stage.name, storage_path=storage_root(cfg),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             callbacks=callbacks,
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if s.use_gpu else "cpu",
                                                              "TOKENIZERS_PARALLELISM": "false"}}),
        datasets=task.ray_datasets(cfg, prepared, here),
        dataset_config=ingest_config(s.num_workers),
    )
    tb, total = Path(cfg.run_dir) / "tb" / stage.name, meta.steps_per_epoch * t.epochs
    with ProgressUI(log, stage.name, total, tb, show=show_progress) as ui:
        try:
            result = trainer.fit()  # Ctrl-C: Ray Train aborts the run gracefully and returns, or exits
        except (KeyboardInterrupt, SystemExit):  # its SIGINT handler calls sys.exit once the controller is gone
            raise StageInterrupted(stage.name, ui.step, total) from None
    ray.kill(log)
    if (result.metrics or {}).get("epoch") != t.epochs or result.checkpoint is None:
        raise StageInterrupted(stage.name, ui.step, total)
    return result
