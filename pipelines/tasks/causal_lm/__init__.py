"""Decoder-only language models: token blocks of a corpus (or prompt/response records), one objective
row per labelled token. Logits at t predict the token at t + 1 (shifted); every token whose label
is not -100 is a row of the token-level objective (KD per token, batch-wise Sinkhorn over the batch's
tokens with sinkhorn.group_size / topk). The teacher runs live or is read from the logit cache."""

from __future__ import annotations

import dataclasses

import torch

from ...config import Config, model_config
from ..common import SameVocabObjective, epoch_shape, load_tokenizer
from ..protocol import Prepared, Rows, Stage, StageMeta, WorkerContext
from .checks import check_causal_lm, check_lm_models
from .data import IGNORE, PROMPT_FORMATS, LMCollate, lm_to_ray, load_lm_task
from .metrics import METRICS, VALIDATION_METRICS, cached_teacher, evaluate_lm, metrics_for, model_inputs, validate
from .models import CausalLM, build_student, build_teacher, hf_teacher_dir, in_lockstep
from .sgo import sgo_batch

KIND = "causal_lm"


def online_rows(w: WorkerContext, inputs: dict, logits: torch.Tensor, labels: torch.Tensor, block) -> Rows:
    """Rows against the teacher adapted by the student's online block, with the block's loss
    (sinkd.online.module_loss) as the objective's added term: the teacher's weights stay frozen, the
    student's logits enter it detached."""
    from sinkd.online import module_loss

    o = w.cfg.teacher.online
    # A ZeRO-3 teacher is a DeepSpeed inference engine: call its module, which keeps ZeRO-3's gather
    # hooks; the engine's own forward would hook the backward that runs through it, which is the student's.
    teacher = getattr(w.teacher, "module", w.teacher)
    adapted = teacher(**inputs, adapter=block, layer=-1 if o.layer is None else o.layer)[:, :-1].float()
    added = module_loss(adapted, logits, labels, o.ce_weight, o.student_weight, o.temperature, IGNORE)
    return Rows(logits, adapted.detach(), labels, extra={"added_loss": added})


def live_teacher_rows(w: WorkerContext, inputs: dict, logits: torch.Tensor, labels: torch.Tensor) -> Rows:
    """Rows against the live teacher, or against the teacher adapted by the OKD block."""
    block = getattr(w.engine.module, "online", None)
    if block is not None:  # OKD: the block trains on the adapted teacher; the student reads it detached
        return online_rows(w, inputs, logits, labels, block)
    with torch.no_grad():
        teacher = w.teacher(**inputs)[:, :-1].float()
    return Rows(logits, teacher, labels)


def self_generated_rows(w: WorkerContext, inputs: dict, logits: torch.Tensor, labels: torch.Tensor) -> Rows:
    """Rows of a student-generated batch: the teacher's (or adapted teacher's) rows on the sampled
    tokens, with the labels hidden from the objective's CE (its `mask` keeps the KD and Sinkhorn
    rows); the OKD block's own loss still reads the labels."""
    rows = live_teacher_rows(w, inputs, logits, labels)
    rows.extra["mask"] = labels != IGNORE
    rows.labels = torch.full_like(labels, IGNORE)
    return rows


class CausalLMTask:
    kinds = (KIND,)

    def check(self, cfg: Config) -> None:
        check_causal_lm(cfg)
        check_lm_models(cfg)

    def prepare(self, cfg: Config) -> Prepared:
        """The GGUF teacher converted if needed (a cache under lm.cache.dir, not the run), blocks tokenised."""
        teacher_dir = hf_teacher_dir(cfg)
        data = load_lm_task(cfg, load_tokenizer(teacher_dir))
        return Prepared(data, teacher_dir, False, metrics_for(cfg, METRICS), f"{data.vocab_size}-token vocabulary", data.notes)

    def fingerprint(self, cfg: Config) -> dict:
        online = cfg.teacher.online
        return {"lm": dataclasses.asdict(cfg.lm), **({"teacher_online": dataclasses.asdict(online)} if online.kind else {})}

    def objective(self, values: dict, prefix: str = "objective") -> SameVocabObjective:
        return SameVocabObjective(values, prefix)

    def before_students(self, cfg: Config, prepared: Prepared) -> None:
        if cfg.lm.cache.enabled:  # the teacher runs once, before any student stage or trial
            from .logit_cache import ensure_cache

            ensure_cache(cfg, prepared.data, prepared.teacher_dir)

    def summarize(self, cfg: Config, prepared: Prepared) -> dict:
        data, splits = prepared.data, {}
        for split, table in data.splits.items():
            splits[split] = {"blocks": table.num_rows, "available": data.available.get(split, table.num_rows),
                             "documents": data.documents.get(split), "tokens": data.tokens(split),
                             "source": data.sources.get(split)}
        records = cfg.lm.format in PROMPT_FORMATS  # rows are prompt/response records, not blocks of documents
        lines = [f"  {split:<10} {s['blocks']:>8,} {'records' if records else 'blocks'}"
                 + (f" of {s['available']:,}" if s["available"] > s["blocks"] else "")
                 + f"  {s['tokens']:,} labelled tokens" + ("" if records else f", {s['documents']:,} documents")
                 + f"  from {s['source']}" for split, s in splits.items()]
        return {"splits": splits, "warnings": [], "lines": lines}

    def stage_meta(self, cfg: Config, prepared: Prepared, stage: Stage) -> StageMeta:
        tok = load_tokenizer(stage.model_path)
        batches, steps, id_sums = epoch_shape(cfg, prepared.data.splits["train"], stage.train)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return StageMeta(KIND, prepared.data.vocab_size, None, None, prepared.metrics, batches, steps,
                         pad if pad is not None else 0, id_sums)

    def ray_datasets(self, cfg: Config, prepared: Prepared, stage: Stage) -> dict:
        """Train and validation blocks: from the logit cache (built on first use) or plain."""
        world = cfg.scaling.num_workers
        if cfg.lm.cache.enabled:
            from .logit_cache import ensure_cache, read_cache

            info = ensure_cache(cfg, prepared.data, prepared.teacher_dir)  # the one before_students made
            return {split: read_cache(info, split, world) for split in ("train", "validation")}
        return {split: lm_to_ray(prepared.data.splits[split], world) for split in ("train", "validation")}

    def build_student(self, cfg: Config, stage: Stage, meta: StageMeta):
        """The student; with teacher.online, the teacher's OKD block beside it in the module DeepSpeed trains."""
        hf = build_student(cfg, stage.model_path)
        o = cfg.teacher.online
        if o.kind is None or stage.objective is None:
            return hf, CausalLM(hf)
        from sinkd.online import ResidualAdapter

        block = ResidualAdapter(model_config(stage.model_path)["hidden_size"], o.rank)
        return hf, CausalLM(hf, block, o.lr)

    def build_teacher(self, cfg: Config, stage: Stage, meta: StageMeta, ds_config_zero3: dict | None):
        if cfg.lm.cache.enabled:  # training reads the teacher's cached top-k
            return None
        return CausalLM(build_teacher(stage.model_path, ds_config_zero3))

    def student_tokenizer(self, cfg: Config, stage: Stage) -> str:
        return stage.model_path

    def collate(self, meta: StageMeta):
        return LMCollate(meta.pad_token_id)

    def forward(self, w: WorkerContext, batch: dict) -> Rows:
        batch, generated = sgo_batch(w, batch)  # lm.sgo: the student's own continuations, scored by the live teacher
        inputs = model_inputs(batch, w.device)
        labels = batch["labels"][:, 1:].to(w.device)
        logits = w.engine(**inputs)[:, :-1].float()
        if not bool((labels != IGNORE).any()):
            if w.teacher is not None and in_lockstep(w):
                # a partitioned teacher (and an OKD block) gathers its weights from every rank: this one joins
                rows = live_teacher_rows(w, inputs, logits, labels)
                return Rows(logits, rows.teacher, labels, empty=True, extra=rows.extra)
            return Rows(logits, None, labels, empty=True)
        if generated and not w.cfg.lm.sgo.ce_on_generated:  # KD and Sinkhorn on the sampled tokens, no CE on them
            return self_generated_rows(w, inputs, logits, labels)
        teacher = cached_teacher(batch, w.device)
        if teacher is not None:
            return Rows(logits, teacher, labels)
        return live_teacher_rows(w, inputs, logits, labels)

    def validation_metrics(self, cfg: Config, prepared: Prepared) -> list[str]:
        return list(VALIDATION_METRICS)

    def validate(self, w: WorkerContext, shard) -> dict:
        return validate(w, shard)

    def evaluate(self, model_dir: str, cfg: Config, prepared: Prepared, split: str,
                 cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict:
        return evaluate_lm(model_dir, cfg, prepared.data, prepared.teacher_dir, split, cpus, actors, gpus)

    def model_class(self, kind: str) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
