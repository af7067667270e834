"""The generic Ray Train worker of one stage (teacher fine-tuning, or one distillation).

Each rank: a DeepSpeed engine around the student (the configured ZeRO stage), the frozen teacher
(ZeRO-3 partitioned under stage 3), the sinkd objective, per-epoch validation, and
`ray.train.report(metrics, checkpoint)` with a DeepSpeed checkpoint. A restarted worker group
(FailureConfig) or a re-launched run resumes from the latest checkpoint at the exact optimizer step:
the data order is a deterministic function of (seed, epoch) and dropout is seeded per micro-batch.
What differs between tasks (models, batches, the objective's rows, validation) comes from the Task
object in the payload; this module imports no task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config, TrainConfig, build_dataclass
from ..tasks.common import PAD_ID, TASK_FILE, epoch_batches, load_tokenizer
from ..tasks.protocol import Stage, StageMeta, Task
from ..tasks.shipping import fetch
from .engine import deepspeed_config, place_teacher, student_engine
from .files import DS_TAG, META_DIR, STATE_FILE, TASK_STATE_FILE

TERMS = ("loss", "ce", "kd", "sinkhorn")  # logged per optimizer step, averaged over ranks


@dataclass
class State:
    """Where training stands; saved beside DeepSpeed's files in every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`
    global_step: int = 0
    loss_log: list = field(default_factory=list)  # [global_step, mean loss over ranks] per optimizer step
    resumed_from: list = field(default_factory=list)  # global steps this lineage restarted from


@dataclass
class Worker:
    """What one rank holds: the task, the student engine, the frozen teacher, the objective."""

    task: Task
    cfg: Config
    stage: Stage
    meta: StageMeta
    rank: int
    world: int
    device: torch.device
    hf: Any  # the student's Hugging Face model (config and tokenizer for checkpoints)
    engine: Any  # DeepSpeed engine around the task's student module
    teacher: Any = None  # the task's teacher module (or its ZeRO-3 engine); None when fine-tuning or cached
    objective: Any = None  # the task's Objective on its Rows; None when fine-tuning (plain CE)
    position: tuple = (0, 0)  # (epoch, micro-batch) being trained: a task's per-batch draws (causal_lm's SGO coin)
    task_state: dict = field(default_factory=dict)  # the task's per-rank state (JSON-able), saved with each checkpoint

    def all_sum(self, values) -> list[float]:
        """Sum over ranks of a list (or a tensor on this rank's device): one host sync. The tensor goes
        through this rank's device, where the process group's backend (NCCL on GPUs) works."""
        tensor = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def all_gather(self, value) -> list:
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train entry point: setup, resume, then per epoch train -> validate -> checkpoint + report."""
    import ray.train

    clock = StartupClock(payload.get("fit_called"))
    progress = payload.get("progress")
    forward_warnings(progress)
    w = setup(payload)
    clock.mark("setup")
    state = resume(w)
    if state.resumed_from and w.rank == 0 and progress is not None:
        progress.push.remote("resumed", state.global_step, {"step": state.global_step})
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation")
    for epoch in range(state.epoch, w.stage.train.epochs):
        stats = train_epoch(w, train_shard, epoch, state, progress, clock)
        val = {f"val_{k}": v for k, v in w.task.validate(w, val_shard).items()}
        state.epoch, state.step_in_epoch = epoch + 1, 0
        if w.rank == 0 and progress is not None:
            progress.push.remote("val", state.global_step, {**val, "epoch": epoch + 1})
        save_and_report(w, state, {"stage": w.stage.name, "epoch": epoch + 1, "global_step": state.global_step,
                                   **stats, **val, **teacher_footprint(w), **clock.report()})


class StartupClock:
    """Seconds from the driver's fit() call to this worker's entry, its setup (models, DeepSpeed), its
    first batch and its first optimizer step: where a stage's start-up goes (wall clocks: the driver
    and the workers of one cluster agree to well under the second asked for)."""

    PHASES = ("entered", "setup", "first_batch", "first_step")

    def __init__(self, fit_called: float | None):
        self.start = fit_called or time.time()
        self.marks = {"entered": time.time()}

    def mark(self, phase: str) -> None:
        self.marks.setdefault(phase, time.time())

    def report(self) -> dict:
        """startup_<phase>_s for each phase reached (in every epoch's metrics: Ray keeps the last)."""
        return {f"startup_{p}_s": round(self.marks[p] - self.start, 2) for p in self.PHASES if p in self.marks}


def forward_warnings(progress) -> None:
    """Python warnings of this worker also go to the driver's terminal (its output does not, unless
    --verbose: it stays in Ray's log files)."""
    if progress is None:
        return
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        progress.push.remote("warning", 0, {"text": f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"})
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def setup(payload: dict) -> Worker:
    import ray.train
    import ray.train.torch

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO code calls torch.distributed functions torch has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    task: Task = payload["task"]
    cfg = Config.from_dict(payload["config"])  # checked on the driver; typing only here
    stage = Stage(**{**payload["stage"], "train": build_dataclass(TrainConfig, payload["stage"]["train"], "")})
    stage.model_path, cfg.student.path = fetch(stage.model_path), fetch(cfg.student.path)  # node-local copies
    # teacher.path is shipped when the student copies its layers (shipped_inputs); a local path stays as it is
    cfg.student.tokenizer, cfg.teacher.path = fetch(cfg.student.tokenizer), fetch(cfg.teacher.path)
    meta, t = StageMeta(**payload["meta"]), stage.train
    ctx = ray.train.get_context()
    ds_config = deepspeed_config(t, meta.steps_per_epoch * t.epochs, cfg.scaling.use_gpu)
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # the same initial student on every rank
    hf, student = task.build_student(cfg, stage, meta)
    w = Worker(task, cfg, stage, meta, ctx.get_world_rank(), ctx.get_world_size(), device, hf,
               student_engine(student, t, ds_config, alone=ctx.get_world_size() == 1 and device.type == "cpu"))
    if stage.objective is not None:
        teacher = task.build_teacher(cfg, stage, meta, ds_config if t.zero_stage == 3 else None)
        w.teacher = None if teacher is None else place_teacher(teacher, t, ds_config, device)
        w.objective = task.objective(stage.objective)
    return w


def teacher_footprint(w: Worker) -> dict:
    """The teacher's parameter count and how many of them this rank holds (fewer under ZeRO-3)."""
    if w.teacher is None:
        return {}
    params = list(w.teacher.parameters())
    return {"teacher_params": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "teacher_params_on_rank": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)}


def resume(w: Worker) -> State:
    """The latest checkpoint of this run (after a worker failure or a relaunch), else a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return State()
    with checkpoint.as_directory() as ckpt_dir:
        w.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        state = State(**json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
        task_state = Path(ckpt_dir) / TASK_STATE_FILE.format(rank=w.rank)
        if task_state.exists():
            w.task_state = json.loads(task_state.read_text())
    if w.engine.global_steps != state.global_step:
        raise RuntimeError(f"checkpoint mismatch: DeepSpeed at step {w.engine.global_steps}, sinkd at {state.global_step}")
    state.resumed_from.append(state.global_step)
    return state


def step_loss(w: Worker, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one micro-batch and its terms (a TERMS-long tensor on the device: no host sync
    here), from the objective on the task's rows, or CE when fine-tuning."""
    rows = w.task.forward(w, batch)
    if rows.empty:  # padding rows only: a zero loss keeps the collectives matched (and reaches every trained module)
        loss = (rows.student.sum() + rows.extra.get("added_loss", 0.0)) * 0.0
        return loss, loss.detach().new_zeros(len(TERMS))
    if w.objective is None:
        loss = F.cross_entropy(rows.student, rows.labels)
        zero = loss.detach().new_zeros(())
        return loss, torch.stack([loss.detach(), loss.detach(), zero, zero])
    out = w.objective(rows)
    return out.loss, torch.stack([getattr(out, k).detach().float() for k in TERMS])


class IdChecksum:
    """Count, sum and sum of squares of the real row ids a rank saw: summed over ranks at the end of
    an epoch, they must equal the training split's, i.e. every row exactly once."""

    def __init__(self):
        self.sums = [0.0, 0.0, 0.0]

    def add(self, ids: torch.Tensor) -> None:
        real = ids[ids != PAD_ID].double()
        self.sums = [self.sums[0] + len(real), self.sums[1] + float(real.sum()), self.sums[2] + float((real ** 2).sum())]


class StepTerms:
    """The objective's terms over an accumulation window (each micro-batch weighted 1/window size,
    summed on the device), averaged over ranks at each optimizer step with one host sync, and their
    sum over the epoch's steps."""

    def __init__(self):
        self.window, self.epoch, self.steps = 0.0, dict.fromkeys(TERMS, 0.0), 0

    def add(self, terms: torch.Tensor, size: int) -> None:
        self.window = self.window + terms.double() / size

    def step(self, w: Worker) -> dict:
        window = self.window if torch.is_tensor(self.window) else torch.zeros(len(TERMS))
        logged = dict(zip(TERMS, (v / w.world for v in w.all_sum(window))))
        self.window = 0.0
        self.epoch, self.steps = {k: self.epoch[k] + logged[k] for k in TERMS}, self.steps + 1
        return logged

    def means(self) -> dict:
        return {f"train_{k}": self.epoch[k] / max(self.steps, 1) for k in TERMS}


class Throughput:
    """Examples per second over the epoch, and from the first optimizer step on (steady state: without
    the data pipeline's start-up)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.examples, self.first_step = 0, None

    def add(self, batch: dict) -> None:
        self.examples += int((batch["ids"] != PAD_ID).sum())

    def stepped(self) -> None:
        if self.first_step is None:
            self.first_step = (time.perf_counter(), self.examples)

    def rate(self) -> float:
        """This rank's examples per second so far in the epoch."""
        return self.examples / max(time.perf_counter() - self.started, 1e-9)

    def sums(self) -> list[float]:
        now = time.perf_counter()
        since, done = self.first_step or (self.started, 0)
        return [self.examples, now - self.started, self.examples - done, now - since]


def trains(micro: int, skip: int, t: TrainConfig, meta: StageMeta) -> bool:
    """Whether micro-batch `micro` is trained: not among the `skip` a resumed run already trained
    (mid-epoch resume), nor past train.max_steps_per_epoch. Skipped batches are still consumed, so
    every rank's epoch ends together."""
    return micro >= skip and micro // t.grad_accum < meta.steps_per_epoch


def window_size(micro: int, t: TrainConfig, meta: StageMeta) -> int:
    """Micro-batches in this accumulation window (the epoch's last window may be partial)."""
    return min(t.grad_accum, meta.batches_per_epoch - (micro // t.grad_accum) * t.grad_accum)


def ends_window(micro: int, t: TrainConfig, meta: StageMeta) -> bool:
    return (micro + 1) % t.grad_accum == 0 or micro + 1 >= meta.batches_per_epoch


def mid_epoch_checkpoint_due(t: TrainConfig, state: State, meta: StageMeta) -> bool:
    """train.checkpoint_every_steps, except at the epoch's end (which saves anyway)."""
    return bool(t.checkpoint_every_steps) and state.global_step % t.checkpoint_every_steps == 0 \
        and state.step_in_epoch < meta.steps_per_epoch


def train_epoch(w: Worker, shard, epoch: int, state: State, progress, startup: StartupClock | None = None) -> dict:
    """One pass over this rank's shard; an optimizer step every grad_accum micro-batches (and at the end)."""
    t, meta = w.stage.train, w.meta
    w.engine.train()
    skip = state.step_in_epoch * t.grad_accum  # micro-batches a resumed run already trained
    seen, terms, clock, micro = IdChecksum(), StepTerms(), Throughput(), -1
    for micro, batch in enumerate(epoch_batches(shard, t.batch_size, w.task.collate(meta), w.cfg.seed, epoch,
                                                t.shuffle_buffer)):
        seen.add(batch["ids"])
        if startup is not None:
            startup.mark("first_batch")
        if not trains(micro, skip, t, meta):
            continue
        torch.manual_seed(hash((w.cfg.seed, epoch, micro, w.rank)) % (1 << 31))  # dropout, reproducible on resume
        size = window_size(micro, t, meta)
        w.position = (epoch, micro)
        loss, micro_terms = step_loss(w, batch)
        w.engine.backward(loss / size, scale_wrt_gas=False)
        terms.add(micro_terms, size)
        clock.add(batch)
        if not ends_window(micro, t, meta):
            continue
        w.engine.step()
        if startup is not None:
            startup.mark("first_step")
        logged = terms.step(w)
        state.global_step, state.step_in_epoch = state.global_step + 1, state.step_in_epoch + 1
        state.loss_log.append([state.global_step, logged["loss"]])
        clock.stepped()
        if w.rank == 0 and progress is not None and state.global_step % t.log_every_steps == 0:
            progress.push.remote("train", state.global_step, {
                **logged, "lr": float(w.engine.get_lr()[0]), "epoch": epoch + state.step_in_epoch / meta.steps_per_epoch,
                "examples_per_s": clock.rate() * w.world})
        maybe_inject_failure(w, state.global_step)
        if mid_epoch_checkpoint_due(t, state, meta):
            save_and_report(w, state, {"stage": w.stage.name, "epoch": epoch, "global_step": state.global_step,
                                       "train_loss": logged["loss"]})
    if micro + 1 != meta.batches_per_epoch:
        raise RuntimeError(f"rank {w.rank} got {micro + 1} batches in epoch {epoch}, expected {meta.batches_per_epoch}")
    sums = w.all_sum(seen.sums + clock.sums())
    ids, (n, elapsed, steady_n, steady) = sums[:3], sums[3:]
    if ids != meta.train_ids:
        raise RuntimeError(f"epoch {epoch}: the workers saw {int(ids[0])} training rows, not each of the "
                           f"{int(meta.train_ids[0])} exactly once (id checksum mismatch)")
    return {**terms.means(), "train_examples": int(n), "train_examples_per_s": n / max(elapsed / w.world, 1e-9),
            "train_steady_examples_per_s": steady_n / max(steady / w.world, 1e-9)}


def save_and_report(w: Worker, state: State, metrics: dict) -> None:
    """DeepSpeed checkpoint (every rank writes its partitions) + state + student meta -> ray.train.report."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        w.engine.save_checkpoint(tmp, tag=DS_TAG)
        if w.task_state:  # every rank its own (e.g. causal_lm's replay buffer)
            (Path(tmp) / TASK_STATE_FILE.format(rank=w.rank)).write_text(json.dumps(w.task_state))
        if w.rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
            write_meta(Path(tmp) / META_DIR, w)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def write_meta(path: Path, w: Worker) -> None:
    """The student's config, tokenizer and task file: with the weights, a loadable model."""
    path.mkdir(parents=True, exist_ok=True)
    w.hf.config.save_pretrained(path)
    load_tokenizer(w.task.student_tokenizer(w.cfg, w.stage)).save_pretrained(path)
    (path / TASK_FILE).write_text(json.dumps(w.meta.task_file(w.stage.name), indent=1))


def maybe_inject_failure(w: Worker, step: int) -> None:
    """debug.fail_at_step: hard-kill the last rank once (tests the FailureConfig restart + resume)."""
    marker = Path(w.cfg.run_dir) / f".fault_injected_{w.stage.name}"
    if w.cfg.debug.fail_at_step == step and w.rank == w.world - 1 and not marker.exists():
        import ray.train

        ray.train.get_all_reported_checkpoints()  # die after the earlier checkpoints are registered
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {w.rank} at step {step}\n")
        os._exit(1)
