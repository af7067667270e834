"""Decoder-only LMs in the pipeline: the model and batch adapters around the shared objective.

The worker loop, checkpoints, resume and the sinkd objective are those of classification
(pipelines/train.py); this module supplies what differs for causal LMs:
- models: `CausalLM` returns (B, L, V) logits; students from the teacher's config with overrides,
  from a subset of the teacher's layers, or pretrained; a GGUF teacher is dequantised once into a
  Hugging Face directory under lm.cache.dir/teachers (transformers + the `gguf` package);
- batches: logits at t predict the token at t + 1 (shifted), and every token whose label is not
  -100 is a row of the token-level objective (KD per token, batch-wise Sinkhorn over the batch's
  tokens with sinkhorn.group_size / topk); the teacher is live or read from the logit cache;
- validation and evaluation: perplexity and teacher/student top-1 agreement.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import shutil
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .lm_data import IGNORE, LMCollate, load_lm_task, lm_to_ray

KIND = "causal_lm"
METRICS = ["perplexity", "top1_agreement"]
_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


class CausalLM(nn.Module):
    """A Hugging Face causal LM returning logits (B, L, V) (the DeepSpeed engine wraps this)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


# ----------------------------------------------------------------------------- teacher and students


def hf_teacher_dir(cfg) -> str:
    """The teacher as a Hugging Face directory; a GGUF teacher is dequantised once and cached."""
    from .lm_config import teacher_source

    directory, gguf = teacher_source(cfg)
    return str(directory) if gguf is None else convert_gguf(directory, gguf, cfg.lm.cache.dir)


def convert_gguf(directory: Path, gguf: str, cache_dir: str) -> str:
    """Dequantise a GGUF model (weights and tokenizer) into cache_dir/teachers/<name>-<key>, once."""
    src = Path(directory) / gguf
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / "teachers" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import _quiet_transformers

    _quiet_transformers()
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized (not serialisable): the dequantised
        # weights go into a plain model of the same config.
        conf = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(conf, attr):
                delattr(conf, attr)
        with torch.device("meta"):  # no random init: the loaded tensors are assigned as they are
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # converted concurrently by another process
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_causal_lm(path: str, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from .models import _quiet_transformers

    _quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def student_from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """Same architecture with len(layers) decoder layers copied from those teacher layers;
    embeddings, final norm and LM head copied as they are."""
    conf = copy.deepcopy(teacher.config)
    conf.num_hidden_layers = len(layers)
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = [conf.layer_types[i] for i in layers]
    student = type(teacher)(conf)
    source = teacher.state_dict()
    state = {}
    for key in student.state_dict():
        m = _LAYER.match(key)
        state[key] = source[f"{m.group(1)}{layers[int(m.group(2))]}{m.group(3)}" if m else key].clone()
    student.load_state_dict(state, strict=True)
    return student


def build_student(cfg, teacher_dir: str) -> nn.Module:
    """The student per `student.init` (call under a fixed seed: identical on every rank)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = cfg.student
    if s.init == "pretrained":
        return load_causal_lm(s.path)
    if s.init == "teacher_layers":
        return student_from_teacher_layers(load_causal_lm(teacher_dir), s.layers)
    conf = AutoConfig.from_pretrained(teacher_dir)
    conf.update(dict(s.config))
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = conf.layer_types[: conf.num_hidden_layers]
    return AutoModelForCausalLM.from_config(conf)


def build_teacher(teacher_dir: str, ds_config: dict | None) -> nn.Module:
    """Frozen eval-mode teacher (ZeRO-3: built while an HfDeepSpeedConfig is alive, so it loads partitioned)."""
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 (weakly referenced by transformers)
    model = load_causal_lm(teacher_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------- driver side


def plan_parts(cfg):
    """(LMTask, teacher directory): the GGUF teacher converted if needed, blocks tokenised and checked."""
    from .data import load_tokenizer

    teacher_dir = hf_teacher_dir(cfg)
    return load_lm_task(cfg, load_tokenizer(teacher_dir)), teacher_dir


def stage_meta(cfg, task, stage):
    from .data import load_tokenizer
    from .train import TaskMeta, epoch_shape

    tok = load_tokenizer(stage.model_path)
    batches, steps, id_sums = epoch_shape(cfg, task, stage.train)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TaskMeta(KIND, task.vocab_size, None, None, METRICS, batches, steps, pad if pad is not None else 0, id_sums)


def ray_datasets(cfg, task, stage) -> dict:
    """Train and validation blocks for Ray Train: from the logit cache (built on first use) or plain."""
    world = cfg.scaling.num_workers
    if cfg.lm.cache.enabled:
        from .logit_cache import ensure_cache, read_cache

        info = ensure_cache(cfg, task, stage.model_path)
        return {split: read_cache(info, split, world) for split in ("train", "validation")}
    return {split: lm_to_ray(task.splits[split], world) for split in ("train", "validation")}


# ----------------------------------------------------------------------------- worker side


def setup_worker(worker_cls, cfg, stage, meta, ds_config: dict, device, ctx):
    """The student engine, and the teacher unless training reads the logit cache."""
    import deepspeed
    from sinkd import DistillationObjective

    from .config import objective_config
    from .train import _param_groups

    torch.manual_seed(cfg.seed)
    hf = build_student(cfg, stage.model_path)
    student = CausalLM(hf)
    engine = deepspeed.initialize(model=student, model_parameters=_param_groups(student, stage.train.weight_decay),
                                  config=ds_config)[0]
    w = worker_cls(cfg, stage, meta, ctx.get_world_rank(), ctx.get_world_size(), device, hf, engine)
    if not cfg.lm.cache.enabled:
        teacher = CausalLM(build_teacher(stage.model_path, ds_config))
        if stage.train.zero_stage == 3:
            inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
            w.teacher = deepspeed.initialize(model=teacher, config=inference)[0]
            w.teacher.eval()
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[stage.train.precision]
            w.teacher = teacher.to(device=device, dtype=dtype)
    w.objective = DistillationObjective(objective_config(stage.objective))
    return w


def _inputs(batch: dict, device) -> dict:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def cached_teacher(batch: dict, device):
    """The batch's cached teacher as a sinkd TopKDistribution (B, L-1, k), or None."""
    if "t_ids" not in batch:
        return None
    from sinkd import TopKDistribution

    return TopKDistribution(batch["t_probs"].to(device), batch["t_ids"].to(device), batch["t_rest"].to(device))


def loss(w, batch: dict):
    """The objective over every labelled token of the batch (shifted: logits at t predict t + 1)."""
    inputs = _inputs(batch, w.device)
    labels = batch["labels"][:, 1:].to(w.device)
    logits = w.engine(**inputs)[:, :-1].float()
    if not bool((labels != IGNORE).any()):
        return logits.sum() * 0.0, [0.0] * 4
    teacher = cached_teacher(batch, w.device)
    if teacher is None:
        with torch.no_grad():
            teacher = w.teacher(**inputs)[:, :-1].float()
    out = w.objective(logits, teacher, labels=labels)
    terms = out.as_dict()
    return out.loss, [terms[k] for k in ("loss", "ce", "kd", "sinkhorn")]


def validate(w, shard) -> dict:
    """Perplexity and top-1 agreement with the teacher over every rank's validation tokens."""
    engine = w.engine
    engine.eval()
    sums = [0.0, 0.0, 0.0]  # nll, tokens, agreements
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=w.stage.train.eval_batch_size, collate_fn=LMCollate(w.meta.pad_token_id)):
            inputs = _inputs(batch, w.device)
            logits = engine(**inputs)[:, :-1].float()
            labels = batch["labels"][:, 1:].to(w.device)
            real = labels != IGNORE
            teacher = cached_teacher(batch, w.device)
            t_top1 = teacher.ids[..., 0] if teacher is not None else w.teacher(**inputs)[:, :-1].argmax(-1)
            sums[0] += float(F.cross_entropy(logits[real], labels[real], reduction="sum"))
            sums[1] += float(real.sum())
            sums[2] += float((logits.argmax(-1) == t_top1)[real].sum())
    engine.train()
    nll, tokens, agree = w.all_sum(sums)
    tokens = max(tokens, 1.0)
    return {"perplexity": math.exp(min(nll / tokens, 700.0)), "loss": nll / tokens, "top1_agreement": agree / tokens,
            "tokens": int(tokens)}


# ----------------------------------------------------------------------------- evaluation of exported models


class LMScorer:
    """Ray Data callable class: per block, the model's summed NLL, labelled tokens and top-1 agreements
    with the teacher (from the cache's ids when the rows carry them, else a live teacher)."""

    def __init__(self, model_dir: str, teacher_dir: str | None = None, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = load_causal_lm(model_dir).eval()
        self.teacher = load_causal_lm(teacher_dir).eval() if teacher_dir else None
        pad = self.model.config.pad_token_id
        self.collate = LMCollate(pad if isinstance(pad, int) else 0)

    def __call__(self, batch) -> dict:
        t = self.collate(batch)
        inputs = {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}
        with torch.no_grad():
            logits = self.model(**inputs, use_cache=False).logits[:, :-1].float()
            if "t_ids" in t:
                t_top1 = t["t_ids"][..., 0]
            elif self.teacher is not None:
                t_top1 = self.teacher(**inputs, use_cache=False).logits[:, :-1].argmax(-1)
            else:
                t_top1 = logits.argmax(-1)
        labels = t["labels"][:, 1:]
        real = labels != IGNORE
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none") * real
        return {"id": t["ids"].numpy(), "nll": nll.sum(-1).double().numpy(), "tokens": real.sum(-1).numpy(),
                "agree": ((logits.argmax(-1) == t_top1) & real).sum(-1).numpy()}


def evaluate_lm(model_dir: str, cfg, task, teacher_dir: str, split: str = "test", cpus: float = 1.0, actors: int = 1) -> dict:
    """Perplexity and top-1 agreement of an exported model on a split (Ray Data, up to `actors` actors of
    `cpus` CPUs; token sums, so the order rows come back in does not matter)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from .data import PAD_ID
    from .evaluate import to_frame

    if cfg.lm.cache.enabled:  # the teacher's top-1 ids come with the cached rows
        from .logit_cache import ensure_cache, read_cache_table

        table, teacher = read_cache_table(ensure_cache(cfg, task, teacher_dir), split), None
    else:
        table, teacher = task.splits[split], teacher_dir
    ds = ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // cfg.train.eval_batch_size)))
    out = ds.map_batches(LMScorer, fn_constructor_kwargs={"model_dir": model_dir, "teacher_dir": teacher,
                                                          "num_threads": max(1, int(cpus))},
                         batch_size=cfg.train.eval_batch_size, batch_format="pyarrow",
                         compute=ActorPoolStrategy(min_size=1, max_size=actors), num_cpus=cpus)
    out = to_frame(out)
    out = out[out["id"] != PAD_ID]
    tokens = max(float(out["tokens"].sum()), 1.0)
    return {"perplexity": math.exp(min(float(out["nll"].sum()) / tokens, 700.0)),
            "top1_agreement": float(out["agree"].sum()) / tokens}
