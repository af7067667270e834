"""One training stage (teacher fine-tuning, or one distillation) as a Ray Train V2 TorchTrainer run.

Each worker: deepspeed.initialize(student) with the configured ZeRO stage, a frozen eval-mode teacher
(ZeRO-3 partitioned under stage 3), the sinkd objective, per-epoch validation, and
`ray.train.report(metrics, checkpoint)` with a DeepSpeed checkpoint. A restarted worker group
(FailureConfig) or a re-launched run resumes from the latest checkpoint at the exact optimizer step:
the data order is a deterministic function of (seed, epoch) and dropout is seeded per micro-batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, TrainConfig, _build, objective_config, storage_root
from .data import PAD_ID, PadCollate, batches_per_shard, epoch_batches, ingest_config, padded_rows, to_ray
from .evaluate import compute_metrics, metric_names

STATE_FILE = "sinkd_state.json"  # progress counters and the per-step loss log, beside DeepSpeed's files
META_DIR = "hf_meta"  # the student's config, tokenizer and task file: what export needs besides weights
DS_TAG = "ds"


@dataclass
class Stage:
    """What one TorchTrainer run trains: `objective` None means CE fine-tuning of `model_path` itself."""

    name: str
    model_path: str  # the teacher (distillation) or the model to fine-tune
    objective: dict | None
    train: TrainConfig


@dataclass
class TaskMeta:
    kind: str  # encoder | seq2seq
    num_labels: int
    label_names: list | None
    label_token_ids: list | None
    metrics: list
    batches_per_epoch: int  # per worker (equal shards)
    steps_per_epoch: int  # optimizer steps per epoch
    pad_token_id: int
    train_ids: list  # [count, sum, sum of squares] of the real training ids: checked every epoch


def deepspeed_config(t: TrainConfig, total_steps: int, use_gpu: bool) -> dict:
    """DeepSpeed settings from the job config; we own gradient-accumulation boundaries (epochs end
    on a partial window) so the loop, not DeepSpeed's counter, decides when a step happens."""
    warmup = max(1, round(t.warmup_ratio * total_steps))
    scheduler = {
        "linear": {"type": "WarmupDecayLR", "params": {"total_num_steps": max(total_steps, warmup + 1), "warmup_min_lr": 0.0,
                                                       "warmup_max_lr": t.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}},
        "cosine": {"type": "WarmupCosineLR", "params": {"total_num_steps": max(total_steps, warmup + 1), "warmup_min_ratio": 0.0,
                                                        "warmup_num_steps": warmup, "cos_min_ratio": 0.0, "warmup_type": "linear"}},
        "constant": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}},
    }[t.schedule]
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": scheduler,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": use_gpu and t.zero_stage == 2},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _param_groups(model, weight_decay: float):
    """No weight decay on biases and LayerNorm weights (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- worker side


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
    """What one rank holds: the student engine, the frozen teacher, the objective."""

    cfg: Config
    stage: Stage
    meta: TaskMeta
    rank: int
    world: int
    device: torch.device
    hf: object  # the student's Hugging Face model (config and tokenizer for checkpoints)
    engine: object  # DeepSpeed engine around models.Classifier(student)
    teacher: object = None  # Classifier (or ZeRO-3 inference engine); None for fine-tuning
    objective: object = None

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train entry point: setup, resume, then per epoch train -> validate -> checkpoint + report."""
    import ray.train

    w = _setup(payload)
    state = _resume(w)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("validation")
    for epoch in range(state.epoch, w.stage.train.epochs):
        stats = _train_epoch(w, train_shard, epoch, state, payload.get("progress"))
        val = {f"val_{k}": v for k, v in _validate(w, val_shard).items()}
        state.epoch, state.step_in_epoch = epoch + 1, 0
        metrics = {"stage": w.stage.name, "epoch": epoch + 1, "global_step": state.global_step, **stats, **val}
        if w.rank == 0 and payload.get("progress") is not None:
            payload["progress"].push.remote("val", state.global_step, {k: v for k, v in val.items()})
        _save_and_report(w, state, metrics)


def _setup(payload: dict) -> Worker:
    import deepspeed
    import ray.train
    import ray.train.torch
    from sinkd import DistillationObjective

    from .models import Classifier, build_student, build_teacher, load_pretrained

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    # DeepSpeed's ZeRO code calls torch.distributed functions torch has deprecated; not ours to fix.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    cfg: Config = _build(Config, payload["config"], "")
    stage = Stage(**{**payload["stage"], "train": _build(TrainConfig, payload["stage"]["train"], "")})
    meta, t = TaskMeta(**payload["meta"]), stage.train
    ctx = ray.train.get_context()
    ds_config = deepspeed_config(t, meta.steps_per_epoch * t.epochs, cfg.scaling.use_gpu)
    device = ray.train.torch.get_device()
    if meta.kind == "causal_lm":  # decoder-only LMs: their own model and teacher adapters
        from .causal_lm import setup_worker

        return setup_worker(Worker, cfg, stage, meta, ds_config, device, ctx)

    torch.manual_seed(cfg.seed)  # the same initial student on every rank
    if stage.objective is None:
        hf = load_pretrained(stage.model_path, meta.kind, meta.num_labels, meta.label_names)
    else:
        hf = build_student(cfg, stage.model_path, meta.kind, meta.num_labels, meta.label_names)
    student = Classifier(hf, meta.kind, meta.label_token_ids)
    engine = deepspeed.initialize(model=student, model_parameters=_param_groups(student, t.weight_decay),
                                  config=ds_config)[0]
    w = Worker(cfg, stage, meta, ctx.get_world_rank(), ctx.get_world_size(), device, hf, engine)
    if stage.objective is not None:
        teacher = Classifier(build_teacher(stage.model_path, meta.kind, meta.num_labels, meta.label_names, ds_config),
                             meta.kind, meta.label_token_ids)
        if t.zero_stage == 3:  # ZeRO-3 inference: the teacher stays partitioned, gathered layer by layer
            inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            w.teacher = deepspeed.initialize(model=teacher, config=inference)[0]
            w.teacher.eval()
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
            w.teacher = teacher.to(device=device, dtype=dtype)
        w.objective = DistillationObjective(objective_config(stage.objective))
    return w


def _resume(w: Worker) -> State:
    """The latest checkpoint of this run (after a worker failure or a relaunch), else a fresh start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return State()
    with checkpoint.as_directory() as ckpt_dir:
        w.engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
        state = State(**json.loads((Path(ckpt_dir) / STATE_FILE).read_text()))
    if w.engine.global_steps != state.global_step:
        raise RuntimeError(f"checkpoint mismatch: DeepSpeed at step {w.engine.global_steps}, sinkd at {state.global_step}")
    state.resumed_from.append(state.global_step)
    return state


def _loss(w: Worker, batch: dict):
    """The objective on this rank's real rows (padding rows only keep collectives matched)."""
    from .models import model_inputs

    if w.meta.kind == "causal_lm":  # token-level: every labelled token is a row of the objective
        from .causal_lm import loss

        return loss(w, batch)
    inputs = model_inputs(batch, w.device)
    labels, real = batch["labels"].to(w.device), (batch["ids"] != PAD_ID).to(w.device)
    logits = w.engine(**inputs).float()
    if not bool(real.any()):
        return logits.sum() * 0.0, [0.0] * 4
    if w.teacher is None:  # teacher fine-tuning: plain cross-entropy
        loss = F.cross_entropy(logits[real], labels[real])
        return loss, [float(loss.detach()), float(loss.detach()), 0.0, 0.0]
    with torch.no_grad():
        t_logits = w.teacher(**inputs).float()
    out = w.objective(logits[real], t_logits[real], labels=labels[real])
    terms = out.as_dict()
    return out.loss, [terms[k] for k in ("loss", "ce", "kd", "sinkhorn")]


def _train_epoch(w: Worker, shard, epoch: int, state: State, progress) -> dict:
    """One pass over this rank's shard; an optimizer step every grad_accum micro-batches (and at the end)."""
    t, meta = w.stage.train, w.meta
    w.engine.train()
    batches_of = epoch_batches  # a local import named epoch_batches would shadow the module's for classification too
    if meta.kind == "causal_lm":
        from .lm_data import lm_epoch_batches as batches_of  # token blocks (+ cached teacher top-k)
    batches = batches_of(shard, t.batch_size, meta.pad_token_id, w.cfg.seed, epoch, t.shuffle_buffer)
    skip = state.step_in_epoch * t.grad_accum  # micro-batches already trained (mid-epoch resume)
    window_terms, epoch_terms, steps, examples = [0.0] * 4, [0.0] * 4, 0, 0
    ids_seen = [0.0, 0.0, 0.0]  # count, sum, sum of squares of real ids: the exactly-once check
    micro, started = -1, time.perf_counter()
    first_step = (started, 0)
    for micro, batch in enumerate(batches):
        real_ids = batch["ids"][batch["ids"] != PAD_ID].double()
        ids_seen = [ids_seen[0] + len(real_ids), ids_seen[1] + float(real_ids.sum()), ids_seen[2] + float((real_ids ** 2).sum())]
        step_idx = micro // t.grad_accum
        if micro < skip or step_idx >= meta.steps_per_epoch:
            continue  # consumed but not trained: every rank's epoch still ends together
        torch.manual_seed(hash((w.cfg.seed, epoch, micro, w.rank)) % (1 << 31))  # dropout, reproducible on resume
        window = min(t.grad_accum, meta.batches_per_epoch - step_idx * t.grad_accum)
        loss, terms = _loss(w, batch)
        w.engine.backward(loss / window, scale_wrt_gas=False)
        window_terms = [a + b / window for a, b in zip(window_terms, terms)]
        examples += int((batch["ids"] != PAD_ID).sum())
        if (micro + 1) % t.grad_accum and micro + 1 < meta.batches_per_epoch:
            continue
        w.engine.step()  # the end of an accumulation window
        logged = [v / w.world for v in w.all_sum(window_terms)]
        window_terms = [0.0] * 4
        state.global_step += 1
        state.step_in_epoch += 1
        state.loss_log.append([state.global_step, logged[0]])
        epoch_terms, steps = [a + b for a, b in zip(epoch_terms, logged)], steps + 1
        if steps == 1:  # steady-state throughput leaves out the data pipeline's start-up
            first_step = (time.perf_counter(), examples)
        if w.rank == 0 and progress is not None and state.global_step % t.log_every_steps == 0:
            progress.push.remote("train", state.global_step, {
                **dict(zip(("loss", "ce", "kd", "sinkhorn"), logged)), "lr": float(w.engine.get_lr()[0]),
                "epoch": epoch + state.step_in_epoch / meta.steps_per_epoch})
        _maybe_inject_failure(w, state.global_step)
        if t.checkpoint_every_steps and state.global_step % t.checkpoint_every_steps == 0 \
                and state.step_in_epoch < meta.steps_per_epoch:
            _save_and_report(w, state, {"stage": w.stage.name, "epoch": epoch, "global_step": state.global_step,
                                        "train_loss": logged[0]})
    now = time.perf_counter()
    elapsed, steady = now - started, now - first_step[0]
    if micro + 1 != meta.batches_per_epoch:
        raise RuntimeError(f"rank {w.rank} got {micro + 1} batches in epoch {epoch}, expected {meta.batches_per_epoch}")
    totals = w.all_sum(ids_seen + [examples, elapsed, examples - first_step[1], steady])
    if totals[:3] != meta.train_ids:
        raise RuntimeError(f"epoch {epoch}: the workers saw {int(totals[0])} training rows, not each of the "
                           f"{int(meta.train_ids[0])} exactly once (id checksum mismatch)")
    means = [v / max(steps, 1) for v in epoch_terms]
    return {"train_loss": means[0], "train_ce": means[1], "train_kd": means[2], "train_sinkhorn": means[3],
            "train_examples": int(totals[3]), "train_examples_per_s": totals[3] / max(totals[4] / w.world, 1e-9),
            "train_steady_examples_per_s": totals[5] / max(totals[6] / w.world, 1e-9)}


def _save_and_report(w: Worker, state: State, metrics: dict) -> None:
    """DeepSpeed checkpoint (every rank writes its partitions) + state + student meta -> ray.train.report."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        w.engine.save_checkpoint(tmp, tag=DS_TAG)
        if w.rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
            _write_meta(Path(tmp) / META_DIR, w.hf, w.stage, w.meta)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _validate(w: Worker, shard) -> dict:
    """Predictions of every rank's validation shard, gathered, scored on all ranks."""
    from .models import model_inputs

    if w.meta.kind == "causal_lm":  # perplexity and top-1 agreement with the teacher
        from .causal_lm import validate

        return validate(w, shard)
    engine, world, device, meta = w.engine, w.world, w.device, w.meta
    collate, batch_size = PadCollate(meta.pad_token_id), w.stage.train.eval_batch_size
    engine.eval()
    ids, preds, labels, losses = [], [], [], []
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            logits = engine(**model_inputs(batch, device)).float()
            ids.append(batch["ids"])
            labels.append(batch["labels"])
            preds.append(logits.argmax(-1).cpu())
            losses.append(F.cross_entropy(logits.cpu(), batch["labels"], reduction="none"))
    engine.train()
    local = [torch.cat(x).tolist() if x else [] for x in (ids, preds, labels, losses)]
    gathered = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(gathered, local)
    else:
        gathered = [local]
    rows = [r for part in gathered for r in zip(*part) if r[0] != PAD_ID]
    rows.sort()
    _, p, y, loss = zip(*rows)
    return {**compute_metrics(meta.metrics, p, y), "loss": float(sum(loss) / len(loss)), "examples": len(rows)}


def _maybe_inject_failure(w: Worker, step: int) -> None:
    """debug.fail_at_step: hard-kill the last rank once (tests the FailureConfig restart + resume)."""
    marker = Path(w.cfg.run_dir) / f".fault_injected_{w.stage.name}"
    if w.cfg.debug.fail_at_step == step and w.rank == w.world - 1 and not marker.exists():
        import ray.train

        ray.train.get_all_reported_checkpoints()  # die after the earlier checkpoints are registered
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"killed rank {w.rank} at step {step}\n")
        os._exit(1)


def _write_meta(path: Path, hf, stage: Stage, meta: TaskMeta) -> None:
    from .data import load_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(path)
    load_tokenizer(stage.model_path).save_pretrained(path)
    task = {"kind": meta.kind, "num_labels": meta.num_labels, "label_names": meta.label_names,
            "label_token_ids": meta.label_token_ids, "metrics": meta.metrics, "stage": stage.name}
    (path / "sinkd_task.json").write_text(json.dumps(task, indent=1))


# ----------------------------------------------------------------------------- driver side


def epoch_shape(cfg: Config, task, t: TrainConfig) -> tuple[int, int, list[float]]:
    """Micro-batches per rank, optimizer steps per epoch, and the (count, sum, sum of squares) of the
    training ids that the exactly-once check compares against; the same for every task type."""
    world = cfg.scaling.num_workers
    rows = task.splits["train"].num_rows
    batches = batches_per_shard(rows + padded_rows(rows, world), world, t.batch_size)
    steps = math.ceil(batches / t.grad_accum)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    ids = task.splits["train"]["id"].to_numpy().astype("float64")
    return batches, steps, [float(len(ids)), float(ids.sum()), float((ids ** 2).sum())]


def stage_meta(cfg: Config, task, stage: Stage) -> TaskMeta:
    from .data import load_tokenizer
    from .models import label_token_ids, model_kind

    if cfg.task_type == "causal_lm":
        from .causal_lm import stage_meta as lm_stage_meta

        return lm_stage_meta(cfg, task, stage)
    kind = model_kind(stage.model_path)
    tok = load_tokenizer(stage.model_path)
    words = cfg.data.label_words or task.label_names
    label_ids = label_token_ids(tok, words) if kind == "seq2seq" else None
    batches, steps, id_sums = epoch_shape(cfg, task, stage.train)
    return TaskMeta(kind, task.num_labels, task.label_names, label_ids, metric_names(task.task, task.num_labels),
                    batches, steps, tok.pad_token_id if tok.pad_token_id is not None else 0, id_sums)


def fit_stage(cfg: Config, task, stage: Stage, show_progress: bool = True, callbacks: list | None = None):
    """Run one stage with Ray Train; returns the ray.train.Result (checkpoint = the final epoch's).
    callbacks: Ray Train UserCallbacks (Tune's TuneReportCallback when a trial runs this stage)."""
    import ray
    from ray.data import DataContext
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .progress import ProgressLog, ProgressUI

    DataContext.get_current().enable_progress_bars = False
    meta = stage_meta(cfg, task, stage)
    world, s, t = cfg.scaling.num_workers, cfg.scaling, stage.train
    if cfg.task_type == "causal_lm":  # token blocks, or the teacher logit cache (built on first use)
        from .causal_lm import ray_datasets

        datasets = ray_datasets(cfg, task, stage)
    else:
        datasets = {split: to_ray(task.splits[split], world, stage.model_path, cfg.data.max_length)
                    for split in ("train", "validation")}
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {}), **s.worker_resources}
    log = ProgressLog.remote()
    payload = {"config": cfg.to_dict(), "stage": {**dataclasses.asdict(stage)}, "meta": dataclasses.asdict(meta),
               "progress": log}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=world, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=stage.name, storage_path=storage_root(cfg),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             callbacks=callbacks,
                             worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if s.use_gpu else "cpu",
                                                              "TOKENIZERS_PARALLELISM": "false"}}),
        datasets=datasets,
        dataset_config=ingest_config(),
    )
    tb = Path(cfg.run_dir) / "tb" / stage.name
    with ProgressUI(log, stage.name, meta.steps_per_epoch * t.epochs, tb, show=show_progress):
        result = trainer.fit()
    ray.kill(log)
    return result
