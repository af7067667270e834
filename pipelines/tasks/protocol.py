"""The Task interface: everything the generic driver and training worker need from a kind of job.

A task (classification, causal_lm, ...) is a small object implementing `Task`; the registry in
`pipelines.tasks` maps `task_type` to it, and nothing below the registry compares task-type
strings. The driver (pipelines.recipes) calls check -> prepare -> stage_meta / ray_datasets ->
evaluate; the Ray Train worker (pipelines.train.worker) calls build_student / build_teacher ->
objective -> collate -> forward -> validate. Tasks are siblings; shared pieces live in
pipelines.tasks.common.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..config import Config, TrainConfig

TEACHER_STAGE = "teacher"  # the teacher's fine-tuning stage; its model lands in RUN_DIR/models/teacher


@dataclass
class Stage:
    """What one TorchTrainer run trains: `objective` None means CE fine-tuning of `model_path` itself."""

    name: str
    model_path: str  # the teacher (distillation) or the model to fine-tune
    objective: dict | None
    train: TrainConfig


@dataclass
class StageMeta:
    """Per-stage facts the driver computes once and every worker receives."""

    kind: str  # the model family the task exports: encoder | seq2seq | causal_lm
    num_labels: int  # classes, or the vocabulary size of a language model
    label_names: list | None
    label_token_ids: list | None  # encoder-decoders: the first token of each label word
    metrics: list
    batches_per_epoch: int  # per worker (equal shards)
    steps_per_epoch: int  # optimizer steps per epoch
    pad_token_id: int
    train_ids: list  # [count, sum, sum of squares] of the real training ids: checked every epoch

    def task_file(self, stage: str) -> dict:
        """What sinkd_task.json records beside a saved student (export and evaluation read it)."""
        return {"kind": self.kind, "num_labels": self.num_labels, "label_names": self.label_names,
                "label_token_ids": self.label_token_ids, "metrics": self.metrics, "stage": stage}


@dataclass
class Prepared:
    """What the driver prepared for a job: the task's checked data and the teacher to distil from."""

    data: Any  # the task's own data object: `.splits` (split -> Arrow table), `.notes`, `.sizes()`
    teacher_dir: str  # the teacher distillation uses (after fine-tuning, when that is planned)
    finetune: bool  # a CE fine-tuning stage of the teacher comes first
    metrics: list[str]  # the headline metric first
    description: str  # e.g. "3 labels": the summary's data line
    notes: list[str] = field(default_factory=list)


@dataclass
class Rows:
    """A batch as the objective takes it: one row per sample (classification) or labelled token (LMs).

    student: (..., V) logits with grad; teacher: (..., V) logits, a sinkd.TopKDistribution, or None
    (fine-tuning); labels: (...) class / next-token ids (-100 = ignore); empty: no real row in the
    batch (padding rows only keep the workers' collectives matched). A task whose student and teacher
    rows do not correspond (other vocabularies) gives its own shapes and reads them in its objective."""

    student: torch.Tensor
    teacher: Any
    labels: torch.Tensor
    empty: bool = False
    extra: dict = field(default_factory=dict)  # what else the task's objective reads (e.g. each side's mask)


class Objective(Protocol):
    """A stage's distillation loss on a task's Rows (a task builds it from the stage's objective mapping)."""

    def __call__(self, rows: Rows) -> Any:
        """An object with tensors `loss` (to backpropagate) and `ce`, `kd`, `sinkhorn` (logged terms)."""

    def describe(self) -> str:
        """The settings that tell objectives apart, in one line (compare.md)."""


class WorkerContext(Protocol):
    """What a task sees of a training worker (pipelines.train.worker.Worker)."""

    cfg: Config
    engine: Any  # the DeepSpeed engine around the student module
    teacher: Any  # the frozen teacher module (or its ZeRO-3 engine), None when fine-tuning or cached
    device: torch.device
    meta: StageMeta
    stage: Stage
    world: int
    position: tuple  # (epoch, micro-batch) being trained, for draws that must match across ranks and resumes
    rank: int
    task_state: dict  # what a task keeps across steps on this rank (JSON-able); saved in each checkpoint

    def all_sum(self, values) -> list[float]: ...  # a list, or a tensor on the rank's device

    def all_gather(self, value: Any) -> list: ...


class Task(Protocol):
    """One kind of distillation job. Methods are cheap unless they say otherwise."""

    kinds: tuple[str, ...]  # the StageMeta.kind values this task exports (export finds the task by kind)

    # ---- driver: before any work
    def check(self, cfg: Config) -> None:
        """Task-specific config checks (data source, models, tokenizers); raise ConfigError."""

    def prepare(self, cfg: Config) -> Prepared:
        """Read and check the data, locate the teacher, decide fine-tuning; writes nothing to run_dir."""

    def fingerprint(self, cfg: Config) -> dict:
        """Config parts beyond data, seed, models and objective that a trained stage depends on."""

    def summarize(self, cfg: Config, prepared: Prepared) -> dict:
        """The data before training: {"splits": {split: facts}, "warnings": [...], "lines": [terminal lines]}."""

    def objective(self, values: dict, prefix: str = "objective") -> Objective:
        """The loss a distillation stage trains with, from its objective mapping (the job's `objective`
        merged with a baseline's overrides). Checks the mapping: ConfigError naming `prefix`.key. Cheap:
        the driver calls it to check every stage, each worker to train."""

    def before_students(self, cfg: Config, prepared: Prepared) -> None:
        """Work shared by every student stage and Tune trial, run once (e.g. a teacher logit cache)."""

    # ---- driver: one stage
    def stage_meta(self, cfg: Config, prepared: Prepared, stage: Stage) -> StageMeta: ...

    def ray_datasets(self, cfg: Config, prepared: Prepared, stage: Stage) -> dict:
        """{"train": ray.data.Dataset, "validation": ...}, padded to a multiple of the worker count."""

    # ---- worker
    def build_student(self, cfg: Config, stage: Stage, meta: StageMeta) -> tuple[nn.Module, nn.Module]:
        """(the Hugging Face model, the module DeepSpeed wraps); called under a fixed seed."""

    def build_teacher(self, cfg: Config, stage: Stage, meta: StageMeta, zero3: bool) -> nn.Module | None:
        """The frozen teacher module (partitioned as it loads under ZeRO-3), or None (cached teacher)."""

    def student_tokenizer(self, cfg: Config, stage: Stage) -> str:
        """The directory whose tokenizer is saved with the stage's model (the teacher's, unless the
        student speaks another)."""

    def collate(self, meta: StageMeta) -> Callable:
        """Ray Data collate_fn: Arrow rows -> a dict of tensors with "ids" (-1 on padding rows)."""

    def forward(self, w: WorkerContext, batch: dict) -> Rows: ...

    def validate(self, w: WorkerContext, shard) -> dict:
        """Validation metrics over every rank's shard (all ranks get the same numbers)."""

    def validation_metrics(self, cfg: Config, prepared: Prepared) -> list[str]:
        """The scores `validate` reports each epoch (Tune sees them as val_<name>; counts left out):
        what a search space's `metric` may name, checked before any training."""

    # ---- driver: after training
    def evaluate(self, model_dir: str, cfg: Config, prepared: Prepared, split: str,
                 cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict:
        """Scores of an exported model on a split (Ray Data batch inference; up to `actors` actors of
        `cpus` CPUs and `gpus` GPUs each: common.eval_pool)."""

    def model_class(self, kind: str) -> type:
        """The transformers Auto class an exported model of this kind loads with."""

