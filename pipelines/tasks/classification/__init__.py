"""Sequence classification (GLUE-style): encoder classifiers (BERT family) and encoder-decoders
(T5 family, scored on the first token of each label word). One objective row per sample."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import Config, ConfigError, stage_model_dir
from ..common import PAD_ID, SameVocabObjective, epoch_shape, eval_pool, load_tokenizer
from ..protocol import TEACHER_STAGE, Prepared, Rows, Stage, StageMeta, WorkerContext
from ..shipping import ship
from .checks import check_classification
from .data import PadCollate, load_task, to_ray, with_teacher_logits
from .metrics import compute_metrics, evaluate_model, metric_names, predict
from .models import (
    Classifier,
    auto_class,
    build_student,
    build_teacher,
    is_task_tuned,
    label_token_ids,
    load_pretrained,
    model_inputs,
    model_kind,
)
from .summary import summarize


def caches_teacher(cfg: Config) -> bool:
    """teacher.cache_logits, with auto resolved: on for CPU jobs below ZeRO-3."""
    mode = cfg.teacher.cache_logits
    return mode is True or (mode == "auto" and cfg.train.zero_stage < 3 and not cfg.scaling.use_gpu)


class ClassificationTask:
    kinds = ("encoder", "seq2seq")

    def check(self, cfg: Config) -> None:
        check_classification(cfg)

    def prepare(self, cfg: Config) -> Prepared:
        data = load_task(cfg)
        if model_kind(cfg.teacher.path) == "seq2seq":  # the label words must tokenise apart
            try:
                label_token_ids(load_tokenizer(cfg.teacher.path), cfg.data.label_words or data.label_names or [])
            except (ValueError, IndexError) as e:
                raise ConfigError(str(e) if str(e).startswith("data.") else f"data.label_words: {e}") from None
        mode = cfg.teacher.finetune
        finetune = mode == "always" or (mode == "auto" and not is_task_tuned(cfg.teacher.path, data.num_labels))
        teacher_dir = str(stage_model_dir(cfg, TEACHER_STAGE)) if finetune else cfg.teacher.path
        return Prepared(data, teacher_dir, finetune, metric_names(data.task, data.num_labels),
                        f"{data.num_labels} labels", data.notes)

    def fingerprint(self, cfg: Config) -> dict:
        return {}

    def objective(self, values: dict, prefix: str = "objective") -> SameVocabObjective:
        return SameVocabObjective(values, prefix)

    def before_students(self, cfg: Config, prepared: Prepared) -> None:
        if caches_teacher(cfg):  # one teacher pass, before any student stage or Tune trial
            self.teacher_table(cfg, prepared)

    def teacher_table(self, cfg: Config, prepared: Prepared):
        """The tokenised training rows with the teacher's logits: one batch-inference pass (Ray Data
        actors shaped like the workers), exact because the teacher is frozen and in eval mode."""
        data, key = prepared.data, (prepared.teacher_dir, cfg.data.max_length)
        if key not in data.teacher_tables:
            tokens = data.tokenized("train", prepared.teacher_dir, cfg.data.max_length)
            meta = self.stage_meta(cfg, prepared, Stage(TEACHER_STAGE, prepared.teacher_dir, None, cfg.train))
            frame = predict(ship(prepared.teacher_dir, cfg), tokens, cfg.train.eval_batch_size, **eval_pool(cfg),
                            meta={"num_labels": meta.num_labels, "label_names": meta.label_names,
                                  "label_token_ids": meta.label_token_ids})
            data.teacher_tables[key] = with_teacher_logits(tokens, frame["id"].to_numpy(), list(frame["logits"]))
        return data.teacher_tables[key]

    def summarize(self, cfg: Config, prepared: Prepared) -> dict:
        return summarize(prepared.data, cfg.teacher.path, cfg.data.max_length)

    def stage_meta(self, cfg: Config, prepared: Prepared, stage: Stage) -> StageMeta:
        data = prepared.data
        kind = model_kind(stage.model_path)
        tok = load_tokenizer(stage.model_path)
        words = cfg.data.label_words or data.label_names
        label_ids = label_token_ids(tok, words) if kind == "seq2seq" else None
        batches, steps, id_sums = epoch_shape(cfg, data.splits["train"], stage.train)
        return StageMeta(kind, data.num_labels, data.label_names, label_ids, prepared.metrics,
                         batches, steps, tok.pad_token_id if tok.pad_token_id is not None else 0, id_sums)

    def ray_datasets(self, cfg: Config, prepared: Prepared, stage: Stage) -> dict:
        tables = {split: prepared.data.tokenized(split, stage.model_path, cfg.data.max_length)
                  for split in ("train", "validation")}
        if stage.objective is not None and caches_teacher(cfg):
            tables["train"] = self.teacher_table(cfg, prepared)
        return {split: to_ray(table, cfg.scaling.num_workers) for split, table in tables.items()}

    def build_student(self, cfg: Config, stage: Stage, meta: StageMeta):
        if stage.objective is None:  # teacher fine-tuning: the model itself
            hf = load_pretrained(stage.model_path, meta.kind, meta.num_labels, meta.label_names)
        else:
            hf = build_student(cfg, stage.model_path, meta.kind, meta.num_labels, meta.label_names)
        return hf, Classifier(hf, meta.kind, meta.label_token_ids)

    def build_teacher(self, cfg: Config, stage: Stage, meta: StageMeta, ds_config_zero3: dict | None):
        if caches_teacher(cfg):  # the training rows carry its logits
            return None
        model = build_teacher(stage.model_path, meta.kind, meta.num_labels, meta.label_names, ds_config_zero3)
        return Classifier(model, meta.kind, meta.label_token_ids)

    def student_tokenizer(self, cfg: Config, stage: Stage) -> str:
        return stage.model_path

    def collate(self, meta: StageMeta):
        return PadCollate(meta.pad_token_id)

    def forward(self, w: WorkerContext, batch: dict) -> Rows:
        """The objective's rows are this rank's real samples (padding rows only keep collectives matched)."""
        inputs = model_inputs(batch, w.device)
        labels, real = batch["labels"].to(w.device), (batch["ids"] != PAD_ID).to(w.device)
        logits = w.engine(**inputs).float()
        if not bool(real.any()):
            return Rows(logits, None, labels, empty=True)
        teacher = None
        if "teacher_logits" in batch:
            teacher = batch["teacher_logits"].to(w.device)[real]
        elif w.teacher is not None:
            with torch.no_grad():
                teacher = w.teacher(**inputs).float()[real]
        return Rows(logits[real], teacher, labels[real])

    def validation_metrics(self, cfg: Config, prepared: Prepared) -> list[str]:
        return [*prepared.metrics, "loss"]

    def validate(self, w: WorkerContext, shard) -> dict:
        """Predictions of every rank's validation shard, gathered, scored on all ranks."""
        w.engine.eval()
        ids, preds, labels, losses = [], [], [], []
        with torch.no_grad():
            for batch in shard.iter_torch_batches(batch_size=w.stage.train.eval_batch_size,
                                                  collate_fn=self.collate(w.meta)):
                logits = w.engine(**model_inputs(batch, w.device)).float()
                ids.append(batch["ids"])
                labels.append(batch["labels"])
                preds.append(logits.argmax(-1).cpu())
                losses.append(F.cross_entropy(logits.cpu(), batch["labels"], reduction="none"))
        w.engine.train()
        local = [torch.cat(x).tolist() if x else [] for x in (ids, preds, labels, losses)]
        rows = sorted(r for part in w.all_gather(local) for r in zip(*part) if r[0] != PAD_ID)
        _, p, y, loss = zip(*rows)
        return {**compute_metrics(w.meta.metrics, p, y), "loss": float(sum(loss) / len(loss)), "examples": len(rows)}

    def evaluate(self, model_dir: str, cfg: Config, prepared: Prepared, split: str,
                 cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict:
        tokens = prepared.data.tokenized(split, model_dir, cfg.data.max_length)
        return evaluate_model(ship(model_dir, cfg), tokens, prepared.metrics, cfg.train.eval_batch_size, cpus, actors,
                              gpus)

    def model_class(self, kind: str) -> type:
        return auto_class(kind)
