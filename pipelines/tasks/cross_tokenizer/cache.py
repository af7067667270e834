"""The teacher's ranked logit cache of a cross-tokenizer job (lm.cache.enabled): the teacher runs once
over the training blocks (a Ray Data pass, the causal-LM cache's machinery: causal_lm/logit_cache.py),
and every stage whose loss reads only ranked teacher vectors trains from Parquet without a teacher.

The ranked losses read softmax(z / T) of each teacher token sorted and cut to the top k, and that is
exactly the top k logits minus one log-normaliser per temperature (sinkd.RankedLogits). So per teacher
row (row t of a block predicts its teacher token t + 1) the cache keeps the w = lm.cache.topk largest
logits, sorted (`t_top`), and logsumexp(z / T) over the whole vocabulary for each T of
lm.cache.temperatures (`t_lse`): w + m floats a token instead of the vocabulary. The rows are keyed by
the teacher's own tokens and stored whole, beside the paired block they belong to; the fingerprint
covers every column of the training split (both sides' tokens), the teacher's weights, w, the
temperatures, max_length and the dtype.

Which teacher a stage trains against (teacher_use):
    cache  ULD with a k, MultiLevelOT: when w >= k and every temperature the loss reads is kept
    live   DSKD (it reads the teacher's hidden states and whole distributions through its projectors),
           ULD with k: null (whole sorted vocabularies), a larger k or another temperature
    none   CE alone: no teacher at all
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from ..causal_lm.logit_cache import (
    CacheInfo,
    cache_location,
    cached_or_built,
    hash_list_columns,
    load_scoring_teacher,
    teacher_identity,
)
from ..shipping import ship
from .data import PairCollate
from .objective import CrossTokenizerObjective

DEFAULT_TEMPERATURES = (1.0, 2.0)
FORMAT = 1
USES = {"cache": "reads the teacher logit cache", "live": "runs the teacher live", "none": "needs no teacher"}


def cache_temperatures(cfg) -> tuple[float, ...]:
    t = cfg.lm.cache.temperatures
    return DEFAULT_TEMPERATURES if t is None else tuple(float(x) for x in t)


def teacher_use(cfg, objective: CrossTokenizerObjective) -> tuple[str, str]:
    """("cache" | "live" | "none", why) for a stage with this objective."""
    if objective.method == "ce":
        return "none", "CE alone reads no teacher"
    if not cfg.lm.cache.enabled:
        return "live", "lm.cache.enabled is false"
    if objective.method == "dskd":
        return "live", "DSKD reads the teacher's hidden states and whole distributions"
    k, temperatures = objective.ranked_needs()
    width, kept = cfg.lm.cache.topk, cache_temperatures(cfg)
    if k is None:
        return "live", "ULD with k: null reads whole sorted vocabularies (set uld.k to read the cache)"
    if k > width:
        return "live", f"its k {k} is above the {width} logits kept per token (lm.cache.topk)"
    missing = sorted(t for t in temperatures if not any(np.isclose(t, kept, rtol=1e-9, atol=0)))
    if missing:
        return "live", (f"temperature {missing[0]:g} is not among lm.cache.temperatures "
                        f"({', '.join(f'{t:g}' for t in kept)})")
    return "cache", f"top {width} logits and the normalisers at {', '.join(f'{t:g}' for t in kept)}"


def hash_table(h, table: pa.Table) -> None:
    """Feed `h` every column of `table` exactly, in name order."""
    for name in sorted(table.column_names):
        h.update(name.encode())
        column = table.column(name)
        if pa.types.is_list(column.type):
            hash_list_columns(h, table, (name,))
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            h.update("\0".join(column.to_pylist()).encode())
        else:
            h.update(column.to_numpy().tobytes())


def fingerprint(cfg, table: pa.Table, teacher_dir: str) -> str:
    c = cfg.lm.cache
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "task": "cross_tokenizer", "teacher": teacher_identity(teacher_dir),
                         "width": c.topk, "temperatures": cache_temperatures(cfg), "max_length": cfg.data.max_length,
                         "dtype": c.dtype}, sort_keys=True, default=str).encode())
    hash_table(h, table)
    return h.hexdigest()[:24]


class RankedScorer:
    """Ray Data callable class: the frozen teacher, loaded once per actor, adding each block's ranked
    cache columns (t_top, t_lse, t_vocab, t_temperatures) to its paired rows."""

    def __init__(self, teacher_dir: str, width: int, temperatures: list, dtype: str = "float32",
                 num_threads: int | None = None):
        self.model, self.device = load_scoring_teacher(teacher_dir, dtype, num_threads)
        self.width, self.temperatures = width, tuple(temperatures)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from sinkd import RankedLogits

        t = PairCollate()(batch)
        with torch.no_grad():
            logits = self.model(input_ids=t["t_input_ids"].to(self.device),
                                attention_mask=t["t_attention_mask"].to(self.device), use_cache=False).logits[:, :-1]
            ranked = RankedLogits.from_logits(logits, self.width, self.temperatures)
        top, lse = ranked.values.float().cpu().numpy(), ranked.log_normalizers.float().cpu().numpy()
        lengths = t["t_attention_mask"].sum(-1).numpy() - 1  # rows that predict a next teacher token
        rows = len(lengths)
        columns = {
            "t_top": pa.array([top[i, :n].reshape(-1) for i, n in enumerate(lengths)], pa.list_(pa.float32())),
            "t_lse": pa.array([lse[i, :n].reshape(-1) for i, n in enumerate(lengths)], pa.list_(pa.float32())),
            "t_vocab": pa.array(np.full(rows, ranked.vocab), pa.int32()),
            "t_temperatures": pa.array([list(self.temperatures)] * rows, pa.list_(pa.float64())),
        }
        for name, column in columns.items():
            batch = batch.append_column(name, column)
        return batch


def ensure_ranked_cache(cfg, data, teacher_dir: str) -> CacheInfo:
    """The ranked cache of the training split: remembered on `data`, found by its fingerprint, or built."""
    c = cfg.lm.cache
    temperatures = cache_temperatures(cfg)
    memo = ("ranked", teacher_dir, cache_location(cfg), c.topk, temperatures, c.dtype, cfg.data.max_length)
    train = data.splits["train"]
    kwargs = {"teacher_dir": ship(teacher_dir, cfg), "width": c.topk, "temperatures": list(temperatures),
              "dtype": c.dtype, "num_threads": max(1, int(c.num_cpus))}
    return cached_or_built(cfg, data, memo, lambda: fingerprint(cfg, train, teacher_dir), {"train": train},
                           RankedScorer, kwargs, {"teacher": teacher_dir, "topk": c.topk, "temperatures": list(temperatures)})


def cached_teacher(batch: dict, device):
    """The batch's cached teacher rows as a sinkd.RankedLogits (B, T_t - 1), or None for plain rows."""
    if "t_top" not in batch:
        return None
    from sinkd import RankedLogits

    temperatures = tuple(batch["t_temperatures"][0].tolist())
    return RankedLogits(batch["t_top"].to(device), batch["t_lse"].to(device), temperatures, int(batch["t_vocab"][0]))
