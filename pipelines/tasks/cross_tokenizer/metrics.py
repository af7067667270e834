"""Bits per byte (the score that compares models with different tokenizers), perplexity over each
model's own tokens (not comparable across tokenizers), during training and for exported models."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...config import Config
from ..causal_lm.data import IGNORE, PROMPT_FORMATS
from ..causal_lm.generation import generate_rouge, prompt_table
from ..causal_lm.models import load_causal_lm
from ..common import PAD_ID, actor_resources, to_frame, tokenizer_identity
from ..protocol import WorkerContext
from ..shipping import fetch, ship
from .data import CrossData, PairCollate

METRICS = ["bits_per_byte", "perplexity"]
VALIDATION_METRICS = ["bits_per_byte", "perplexity", "loss"]  # what validate reports each epoch


def side_inputs(batch: dict, side: str, device) -> dict:
    return {"input_ids": batch[f"{side}_input_ids"].to(device), "attention_mask": batch[f"{side}_attention_mask"].to(device)}


def block_nll(logits: torch.Tensor, batch: dict, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: the summed NLL of the side's scored tokens (B,) (a block's, a response's) and their count (B,)."""
    labels = batch[f"{side}_labels"][:, 1:].to(logits.device)
    mask = labels != IGNORE
    nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp_min(0), reduction="none") * mask
    return nll.sum(-1), mask.sum(-1)


def scores(nll: float, tokens: float, text_bytes: float) -> dict:
    tokens = max(tokens, 1.0)
    return {"bits_per_byte": nll / math.log(2) / max(text_bytes, 1.0), "perplexity": math.exp(min(nll / tokens, 700.0)),
            "loss": nll / tokens}


def validate(w: WorkerContext, shard) -> dict:
    """The student's bits per byte and perplexity over every rank's validation blocks."""
    engine = w.engine
    engine.eval()
    sums = [0.0, 0.0, 0.0]  # nll, tokens, bytes
    collate = PairCollate()
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=w.stage.train.eval_batch_size, collate_fn=collate):
            logits = engine(**side_inputs(batch, "s", w.device))[:, :-1].float()
            nll, count = block_nll(logits, batch, "s")
            sums = [sums[0] + float(nll.sum()), sums[1] + float(count.sum()), sums[2] + float(batch["s_bytes"].sum())]
    engine.train()
    nll, tokens, text_bytes = w.all_sum(sums)
    return {**scores(nll, tokens, text_bytes), "tokens": int(tokens)}


class PairScorer:
    """Ray Data callable class: per block, a model's summed NLL over its own side's tokens."""

    def __init__(self, model_dir: str, side: str, num_threads: int | None = None, device: str = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device, self.side = device, side
        self.model = load_causal_lm(fetch(model_dir)).to(device).eval()
        self.collate = PairCollate()

    def __call__(self, batch) -> dict:
        t = self.collate(batch)
        with torch.no_grad():
            logits = self.model(**side_inputs(t, self.side, self.device), use_cache=False).logits[:, :-1].float()
        nll, count = block_nll(logits, t, self.side)
        return {"id": t["ids"].numpy(), "nll": nll.double().cpu().numpy(), "tokens": count.numpy(),
                "bytes": t[f"{self.side}_bytes"].numpy()}


def model_side(model_dir: str, teacher_dir: str) -> str:
    """"t" for a model that speaks the teacher's tokenizer, else "s" (the students)."""
    return "t" if tokenizer_identity(fetch(model_dir)) == tokenizer_identity(teacher_dir) else "s"


def evaluate_pairs(model_dir: str, cfg: Config, data: CrossData, teacher_dir: str, split: str = "test", cpus: float = 1.0, actors: int = 1, gpus: float = 0.0) -> dict:
    """Bits per byte and perplexity of an exported model (the teacher or a student) on a split, and
    for prompt/response data the Rouge-L F of its greedy continuations of the split's prompts."""
    import ray.data
    from ray.data import ActorPoolStrategy

    table, side = data.splits[split], model_side(model_dir, teacher_dir)
    ds = ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // cfg.train.eval_batch_size)))
    out = ds.map_batches(PairScorer, fn_constructor_kwargs={"model_dir": ship(model_dir, cfg), "side": side,
                                                            "num_threads": max(1, int(cpus)), "device": "cuda" if gpus else "cpu"},
                         batch_size=cfg.train.eval_batch_size, batch_format="pyarrow",
                         compute=ActorPoolStrategy(min_size=1, max_size=actors), **actor_resources(cpus, gpus))
    out = to_frame(out)
    out = out[out["id"] != PAD_ID]
    result = scores(float(out["nll"].sum()), float(out["tokens"].sum()), float(out["bytes"].sum()))
    if cfg.lm.format in PROMPT_FORMATS:  # the model continues the prompt as its own side spells it
        starts = table.column(f"{side}_response_start").to_pylist()
        prompts = [ids[:n] for ids, n in zip(table.column(f"{side}_input_ids").to_pylist(), starts)]
        result["rouge_l"] = generate_rouge(model_dir, cfg, prompt_table(table.column("id").to_pylist(), prompts,
                                                                        table.column("response").to_pylist()),
                                           data.end_tokens[side], split, cpus, actors, gpus)
    return result
