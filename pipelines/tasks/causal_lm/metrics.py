"""Perplexity, bits per byte and top-1 agreement with the teacher: during training (every rank's
validation tokens) and for exported models (Ray Data batch inference)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import Config
from ..common import PAD_ID, actor_resources, load_tokenizer, to_frame
from ..protocol import WorkerContext
from ..shipping import fetch, ship
from .data import IGNORE, PROMPT_FORMATS, LMCollate, LMData, prompt_rows
from .generation import generate_rouge, prompt_table
from .models import load_causal_lm

METRICS = ["perplexity", "bits_per_byte", "top1_agreement"]
VALIDATION_METRICS = ["perplexity", "loss", "top1_agreement"]  # what validate reports each epoch
PROMPT_METRICS = ["rouge_l"]  # prompt/response data: greedy continuations of the test prompts (generation.py)


def metrics_for(cfg: Config, metrics: list[str]) -> list[str]:
    """The task's metrics, with Rouge-L for prompt/response data."""
    return list(metrics) + (PROMPT_METRICS if cfg.lm.format in PROMPT_FORMATS else [])


def model_inputs(batch: dict, device) -> dict:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def cached_teacher(batch: dict, device):
    """The batch's cached teacher as a sinkd TopKDistribution (B, L-1, k), or None."""
    if "t_ids" not in batch:
        return None
    from sinkd import TopKDistribution

    return TopKDistribution(batch["t_probs"].to(device), batch["t_ids"].to(device), batch["t_rest"].to(device))


def validate(w: WorkerContext, shard) -> dict:
    """Perplexity and top-1 agreement with the teacher over every rank's validation tokens."""
    engine = w.engine
    engine.eval()
    sums = [0.0, 0.0, 0.0]  # nll, tokens, agreements
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=w.stage.train.eval_batch_size, collate_fn=LMCollate(w.meta.pad_token_id)):
            inputs = model_inputs(batch, w.device)
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


class LMScorer:
    """Ray Data callable class: per block, the model's summed NLL, labelled tokens and top-1 agreements
    with the teacher (from the cache's ids when the rows carry them, else a live teacher)."""

    def __init__(self, model_dir: str, teacher_dir: str | None = None, num_threads: int | None = None,
                 device: str = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = device  # "cuda" in an actor given a GPU
        self.model = load_causal_lm(fetch(model_dir)).to(device).eval()  # fetch: a shipped folder's local copy
        self.teacher = load_causal_lm(fetch(teacher_dir)).to(device).eval() if teacher_dir else None
        pad = self.model.config.pad_token_id
        self.collate = LMCollate(pad if isinstance(pad, int) else 0)

    def __call__(self, batch) -> dict:
        t = self.collate(batch)
        inputs = model_inputs(t, self.device)
        with torch.no_grad():
            logits = self.model(**inputs, use_cache=False).logits[:, :-1].float().cpu()
            if "t_ids" in t:
                t_top1 = t["t_ids"][..., 0]
            elif self.teacher is not None:
                t_top1 = self.teacher(**inputs, use_cache=False).logits[:, :-1].argmax(-1).cpu()
            else:
                t_top1 = logits.argmax(-1)
        labels = t["labels"][:, 1:]
        real = labels != IGNORE
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none") * real
        return {"id": t["ids"].numpy(), "nll": nll.sum(-1).double().numpy(), "tokens": real.sum(-1).numpy(),
                "agree": ((logits.argmax(-1) == t_top1) & real).sum(-1).numpy()}


def evaluate_lm(model_dir: str, cfg: Config, data: LMData, teacher_dir: str, split: str = "test", cpus: float = 1.0,
                actors: int = 1, gpus: float = 0.0) -> dict:
    """Perplexity, bits per byte and top-1 agreement of an exported model on a split (Ray Data, up to
    `actors` actors of `cpus` CPUs and `gpus` GPUs; token sums, so the order rows come back in does
    not matter)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    if cfg.lm.cache.enabled:  # the teacher's top-1 ids come with the cached rows
        from .logit_cache import ensure_cache, read_cache_table

        table, teacher = read_cache_table(ensure_cache(cfg, data, teacher_dir), split), None
    else:
        table, teacher = data.splits[split], teacher_dir
    ds = ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // cfg.train.eval_batch_size)))
    out = ds.map_batches(LMScorer, fn_constructor_kwargs={"model_dir": ship(model_dir, cfg), "teacher_dir": ship(teacher, cfg),
                                                          "num_threads": max(1, int(cpus)), "device": "cuda" if gpus else "cpu"},
                         batch_size=cfg.train.eval_batch_size, batch_format="pyarrow",
                         compute=ActorPoolStrategy(min_size=1, max_size=actors), **actor_resources(cpus, gpus))
    out = to_frame(out)
    out = out[out["id"] != PAD_ID]
    tokens, nll = max(float(out["tokens"].sum()), 1.0), float(out["nll"].sum())
    text_bytes = data.split_bytes(split, teacher_dir)  # counted on the driver at prepare time
    scores = {"perplexity": math.exp(min(nll / tokens, 700.0)), "bits_per_byte": nll / math.log(2) / max(text_bytes, 1),
              "top1_agreement": float(out["agree"].sum()) / tokens}
    if cfg.lm.format in PROMPT_FORMATS:  # the model continues each prompt; stops at the EOS the rows end with
        eos = load_tokenizer(teacher_dir).eos_token_id
        scores["rouge_l"] = generate_rouge(model_dir, cfg, prompt_table(*prompt_rows(data.splits[split])), eos, split,
                                           cpus, actors, gpus)
    return scores
