"""Cross-tokenizer distillation (issue 16): a decoder-only teacher and a student with different
vocabularies. Both tokenise the same text blocks (data.paired_blocks); the student is trained against
the teacher with a ranked-distribution loss from sinkd.cross_vocab (ULD, MultiLevelOT) or DSKD's
cross-model attention (dskd.py), chosen by objective.CrossTokenizerObjective, and every model is
scored in bits per byte, the one figure comparable across tokenizers (metrics). The teacher runs
live, or once into the ranked logit cache that ULD and MultiLevelOT stages read (cache.py)."""

from __future__ import annotations

import dataclasses

import torch

from ...config import Config, model_config
from ..causal_lm.data import IGNORE
from ..causal_lm.logit_cache import read_cache
from ..causal_lm.metrics import metrics_for
from ..causal_lm.models import build_teacher, hf_teacher_dir, in_lockstep
from ..common import PAD_ID, epoch_shape, load_tokenizer
from ..protocol import Prepared, Rows, Stage, StageMeta, WorkerContext
from .cache import USES, cached_teacher, ensure_ranked_cache, teacher_use
from .checks import check_cross_tokenizer, student_tokenizer_dir
from .data import PairCollate, load_cross_task, pairs_to_ray
from .dskd import CMAProjectors, Side, dskd_cma_terms
from .metrics import METRICS, VALIDATION_METRICS, evaluate_pairs, side_inputs, validate
from .models import PairLM, build_student, whole_weights
from .objective import CrossTokenizerObjective

KIND = "causal_lm"  # what it exports: a plain Hugging Face causal LM with the student's tokenizer


def side_view(model, ids: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor, real: torch.Tensor,
              mask: torch.Tensor) -> Side:
    """One model's rows of the real blocks as DSKD reads them: row t predicts token t + 1. The
    embedding and head are read whole (gathered under ZeRO-3)."""
    ids = ids.to(logits.device)[real]
    embedding, head = whole_weights(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    return Side(logits[real], hidden[:, :-1][real].float(), ids[:, :-1], ids[:, 1:], mask, embedding, head)


class CrossTokenizerTask:
    kinds = (KIND,)

    def check(self, cfg: Config) -> None:
        check_cross_tokenizer(cfg)

    def prepare(self, cfg: Config) -> Prepared:
        teacher_dir = hf_teacher_dir(cfg)
        data = load_cross_task(cfg, load_tokenizer(teacher_dir), load_tokenizer(student_tokenizer_dir(cfg)))
        notes = list(data.notes)
        if cfg.lm.cache.enabled:  # which stage trains against which teacher, said before any work
            for name, values in cfg.student_objectives().items():
                use, why = teacher_use(cfg, self.objective(values))
                notes.append(f"{name}: {USES[use]} ({why})")
        return Prepared(data, teacher_dir, False, metrics_for(cfg, METRICS),
                        f"teacher vocabulary {data.teacher_vocab:,}, student vocabulary {data.student_vocab:,}", notes)

    def fingerprint(self, cfg: Config) -> dict:
        return {"lm": dataclasses.asdict(cfg.lm)}

    def objective(self, values: dict, prefix: str = "objective") -> CrossTokenizerObjective:
        return CrossTokenizerObjective(values, prefix)

    def before_students(self, cfg: Config, prepared: Prepared) -> None:
        """The ranked cache, once, when a stage of the job reads it (the others run the teacher live)."""
        if any(self.teacher_use(cfg, values) == "cache" for values in cfg.student_objectives().values()):
            ensure_ranked_cache(cfg, prepared.data, prepared.teacher_dir)

    def teacher_use(self, cfg: Config, values: dict | None) -> str:
        """"cache", "live" or "none" (cache.teacher_use) for a stage's objective mapping (None: live)."""
        return "live" if values is None else teacher_use(cfg, self.objective(values))[0]

    def summarize(self, cfg: Config, prepared: Prepared) -> dict:
        data, splits = prepared.data, {}
        for split, table in data.splits.items():
            splits[split] = {"blocks": table.num_rows, "available": data.available.get(split, table.num_rows),
                             "documents": data.documents.get(split), "teacher_tokens": data.tokens(split, "t"),
                             "student_tokens": data.tokens(split, "s"), "bytes": data.text_bytes(split, "t"),
                             "truncated": data.truncated.get(split), "source": data.sources.get(split)}
        lines = [f"  {split:<10} {s['blocks']:>6,} blocks" + (f" of {s['available']:,}" if s["available"] > s["blocks"] else "")
                 + f"  {s['teacher_tokens']:,} teacher / {s['student_tokens']:,} student tokens, {s['documents']:,} documents"
                 f"  from {s['source']}" for split, s in splits.items()]
        return {"splits": splits, "warnings": [], "lines": lines}

    def stage_meta(self, cfg: Config, prepared: Prepared, stage: Stage) -> StageMeta:
        batches, steps, id_sums = epoch_shape(cfg, prepared.data.splits["train"], stage.train)
        return StageMeta(KIND, prepared.data.student_vocab, None, None, prepared.metrics, batches, steps, 0, id_sums)

    def ray_datasets(self, cfg: Config, prepared: Prepared, stage: Stage) -> dict:
        """Train and validation blocks; the train blocks with the teacher's ranked rows when the stage reads the cache."""
        world = cfg.scaling.num_workers
        out = {split: pairs_to_ray(prepared.data.splits[split], world) for split in ("train", "validation")}
        if self.teacher_use(cfg, stage.objective) == "cache":
            out["train"] = read_cache(ensure_ranked_cache(cfg, prepared.data, prepared.teacher_dir), "train", world)
        return out

    def build_student(self, cfg: Config, stage: Stage, meta: StageMeta):
        """The student; with DSKD, its projectors beside it in the module DeepSpeed trains."""
        hf = build_student(cfg, stage.model_path, student_tokenizer_dir(cfg))
        lr = self.objective(stage.objective).projector_lr if stage.objective is not None else None
        if lr is None:
            return hf, PairLM(hf)
        teacher_dim = model_config(stage.model_path)["hidden_size"]
        return hf, PairLM(hf, CMAProjectors(hf.config.hidden_size, teacher_dim), lr)

    def build_teacher(self, cfg: Config, stage: Stage, meta: StageMeta, ds_config_zero3: dict | None):
        if self.teacher_use(cfg, stage.objective) != "live":  # the cache's rows, or no teacher at all (CE)
            return None
        return PairLM(build_teacher(stage.model_path, ds_config_zero3))

    def student_tokenizer(self, cfg: Config, stage: Stage) -> str:
        return student_tokenizer_dir(cfg)

    def collate(self, meta: StageMeta):
        return PairCollate()

    def forward(self, w: WorkerContext, batch: dict) -> Rows:
        """The student's rows (B, T_s - 1, V_s) and the teacher's (B, T_t - 1, V_t) of the real blocks;
        row t predicts token t + 1 of its own side."""
        student = w.engine.module
        hidden = hasattr(student, "projectors")  # DSKD reads both models' last hidden states
        out = w.engine(**side_inputs(batch, "s", w.device), hidden=hidden)
        logits = (out[0] if hidden else out)[:, :-1].float()
        real = (batch["ids"] != PAD_ID).to(w.device)
        labels = batch["s_labels"][:, 1:].to(w.device)
        empty = not bool(real.any())
        if empty and (w.teacher is None or not in_lockstep(w)):
            return Rows(logits, None, labels, empty=True)
        teacher = cached_teacher(batch, w.device)  # the ranked cache's rows (sinkd.RankedLogits), or None
        if w.teacher is not None:
            with torch.no_grad():  # every rank runs the teacher on its whole batch (ZeRO-3 gathers in step)
                t_out = w.teacher(**side_inputs(batch, "t", w.device), hidden=hidden)
            teacher = (t_out[0] if hidden else t_out)[:, :-1].float()
        t_mask = (batch["t_labels"][:, 1:] != IGNORE).to(w.device)  # the rows predicting response (or block) tokens
        s_mask = labels != IGNORE
        if empty:  # ZeRO-3 over several ranks: this rank joins the others' gathers on its padding rows, for a zero loss
            real, t_mask, s_mask = torch.ones_like(real), torch.ones_like(t_mask), torch.ones_like(s_mask)
        extra = {"student_mask": s_mask[real], "teacher_mask": t_mask[real]}
        if hidden:
            s_side = side_view(student.model, batch["s_input_ids"], logits, out[1], real, s_mask[real])
            t_side = side_view(w.teacher.model, batch["t_input_ids"], teacher, t_out[1], real, t_mask[real])
            extra.update(projectors=student.projectors, student_side=s_side, teacher_side=t_side)
            if empty:  # the projectors' gathers and gradient reduction run on every rank
                extra["added_loss"] = sum(dskd_cma_terms(student.projectors, s_side, t_side).values())
        return Rows(logits[real], None if teacher is None else teacher[real], labels[real], empty=empty, extra=extra)

    def validation_metrics(self, cfg: Config, prepared: Prepared) -> list[str]:
        return list(VALIDATION_METRICS)

    def validate(self, w: WorkerContext, shard) -> dict:
        return validate(w, shard)

    def evaluate(self, model_dir: str, cfg: Config, prepared: Prepared, split: str,
                 cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict:
        return evaluate_pairs(model_dir, cfg, prepared.data, prepared.teacher_dir, split, cpus, actors, gpus)

    def model_class(self, kind: str) -> type:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM
