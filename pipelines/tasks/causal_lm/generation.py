"""Greedy continuations of test prompts, scored with Rouge-L against the reference responses.

For prompt/response data (lm.format prompt_response or prompt_continuation) both LM tasks let every
evaluated model (the teacher and each student) continue each test prompt, as its own tokenizer
spells it in the rows, with Hugging Face `generate` (greedy, KV cache, `lm.max_new_tokens` new tokens
at most, stopping at that side's end token); the new tokens are decoded with the model's tokenizer
(special tokens skipped) and scored with Rouge-L F (the `rouge-score` package, stemming on: its
tokenizer lowercases and keeps letters and digits, so a lowercasing WordPiece student is not
penalised for case or spacing) against the reference text. The score of a model is the mean over the
prompts. It runs as Ray Data batch inference (one prompt at a time, so the result does not depend on
how rows are batched); every generation lands in RUN_DIR/generations/<model>.<split>.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..common import PAD_ID, actor_resources, load_tokenizer, to_frame
from ..shipping import fetch, ship
from .models import load_causal_lm

DEFAULT_MAX_NEW_TOKENS = 32


def rouge_scorer():
    from rouge_score import rouge_scorer as rs

    return rs.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Rouge-L F of each prediction against its reference."""
    scorer = rouge_scorer()
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def greedy_new_tokens(model, prompt_ids: list[int], eos_id: int | None, pad_id: int, max_new_tokens: int) -> list[int]:
    """The tokens `model` appends to the prompt, greedily (KV cache), without the end token."""
    from transformers import GenerationConfig

    ids = torch.tensor([prompt_ids], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id,
                              use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eos_id)] if eos_id in new else new


class Generator:
    """Ray Data callable class: per row (id, prompt_ids, response), the decoded greedy continuation
    and its Rouge-L F."""

    def __init__(self, model_dir: str, eos_id: int | None, max_new_tokens: int, num_threads: int | None = None,
                 device: str = "cpu"):
        if num_threads:
            torch.set_num_threads(num_threads)
        local = fetch(model_dir)
        self.model = load_causal_lm(local).to(device).eval()
        self.tokenizer = load_tokenizer(local)
        pad = self.tokenizer.pad_token_id
        self.eos_id, self.max_new_tokens = eos_id, max_new_tokens
        self.pad_id = pad if pad is not None else (eos_id if eos_id is not None else 0)
        self.scorer = rouge_scorer()

    def __call__(self, batch: pa.Table) -> dict:
        texts = []
        for ids in batch.column("prompt_ids").to_pylist():
            new = greedy_new_tokens(self.model, ids, self.eos_id, self.pad_id, self.max_new_tokens)
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        refs = batch.column("response").to_pylist()
        return {"id": batch.column("id").to_numpy(), "generated": np.array(texts, dtype=object),
                "rouge_l": np.array([self.scorer.score(r, t)["rougeL"].fmeasure for r, t in zip(refs, texts)])}


def prompt_table(ids: list[int], prompt_ids: list[list[int]], responses: list[str]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "prompt_ids": pa.array(prompt_ids, pa.list_(pa.int32())),
                     "response": pa.array(responses, pa.string())})


def generations_file(run_dir: str, model_dir: str, split: str) -> Path:
    return Path(run_dir) / "generations" / f"{Path(model_dir).name}.{split}.jsonl"


def generate_rouge(model_dir: str, cfg, table: pa.Table, eos_id: int | None, split: str, cpus: float = 1.0,
                   actors: int = 1, gpus: float = 0.0) -> float:
    """Mean Rouge-L F of the model's greedy continuations of the table's prompts (Ray Data actors);
    writes each generation to generations_file."""
    import ray.data
    from ray.data import ActorPoolStrategy

    max_new = cfg.lm.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    ds = ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // cfg.train.eval_batch_size)))
    out = ds.map_batches(Generator, fn_constructor_kwargs={"model_dir": ship(model_dir, cfg), "eos_id": eos_id,
                                                           "max_new_tokens": max_new, "num_threads": max(1, int(cpus)),
                                                           "device": "cuda" if gpus else "cpu"},
                         batch_size=cfg.train.eval_batch_size, batch_format="pyarrow",
                         compute=ActorPoolStrategy(min_size=1, max_size=actors), **actor_resources(cpus, gpus))
    out = to_frame(out)
    out = out[out["id"] != PAD_ID].sort_values("id")
    refs = dict(zip(table.column("id").to_pylist(), table.column("response").to_pylist()))
    path = generations_file(cfg.run_dir, model_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in out.itertuples():
            f.write(json.dumps({"id": int(row.id), "reference": refs[int(row.id)], "generated": row.generated,
                                "rouge_l": float(row.rouge_l)}) + "\n")
    return float(out["rouge_l"].mean()) if len(out) else 0.0
