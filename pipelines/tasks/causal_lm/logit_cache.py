"""The teacher logit cache: the teacher runs once over the token blocks, training reads Parquet.

A Ray Data stage (`map_batches` with the callable class `TeacherScorer`: one model load per actor,
`lm.cache.concurrency` actors, `num_gpus` of them on GPU hosts) stores, for every position of every
block, the teacher's top-k log-probabilities (temperature 1), their token ids and the probability
mass of all other tokens. The cache lives in `<root>/<fingerprint>/<write>/split=<split>/*.parquet`,
where root is lm.cache.dir, or `<ray.storage_path>/logit_cache` when that is an object store (the
Ray Data tasks that write it and the workers that read it may run on any node). The fingerprint
covers the teacher's weights, the exact token blocks, k, max_length and the dtype, so a later run or
Tune trial with the same inputs reuses it and a changed input never reads stale logits. Its
`manifest.json`, written last, lists the files: readers never see half a cache, and two runs that
build the same cache at once each write a folder of their own. That machinery (`cached_or_built`)
also builds the cross-tokenizer task's ranked cache (cross_tokenizer/cache.py).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ...config import join_storage
from ...config.uris import is_object_store, open_storage
from ..shipping import fetch, ship

SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
FORMAT = 2


@dataclass
class CacheInfo:
    root: str  # <root>/<fingerprint>: a local folder or a storage URI
    fingerprint: str
    built: bool  # False: an earlier run's cache was reused (the teacher did not run)
    rows: dict
    files: dict  # split -> Parquet files, relative to root, in a fixed order

    def paths(self, split: str) -> tuple:
        """(pyarrow filesystem, the split's file paths on it)."""
        fs, root = open_storage(self.root)
        return fs, [f"{root.rstrip('/')}/{f}" for f in self.files[split]]


def cache_location(cfg) -> str:
    """Where caches live: lm.cache.dir, or <ray.storage_path>/logit_cache on an object store."""
    if is_object_store(cfg.ray.storage_path):
        return join_storage(cfg.ray.storage_path, "logit_cache")
    return cfg.lm.cache.dir


def cache_key(cfg) -> str:
    """The config key errors about the cache's place name."""
    return "ray.storage_path" if is_object_store(cfg.ray.storage_path) else "lm.cache.dir"


def teacher_identity(teacher_dir: str) -> dict:
    """What a teacher's outputs depend on, cheaply: its folder, config and weight files (name, size, mtime)."""
    d = Path(teacher_dir)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.glob("*.safetensors"))
    weights += sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.glob("*.bin"))
    return {"dir": str(d.resolve()), "config": json.loads((d / "config.json").read_text()), "weights": weights}


def hash_list_columns(h, table: pa.Table, columns) -> None:
    """Feed `h` the exact contents of list columns (row lengths, then values)."""
    for col in columns:
        arr = table.column(col).combine_chunks()
        h.update(np.diff(arr.offsets.to_numpy()).tobytes())
        h.update(arr.values.to_numpy().tobytes())


def fingerprint(cfg, data, teacher_dir: str) -> str:
    """Hash of what the cached values depend on: teacher weights, token blocks, k, length, dtype."""
    h = hashlib.sha256()
    c = cfg.lm.cache
    h.update(json.dumps({"format": FORMAT, "teacher": teacher_identity(teacher_dir), "k": c.topk,
                         "max_length": cfg.data.max_length, "dtype": c.dtype}, sort_keys=True, default=str).encode())
    for split in SPLITS:
        h.update(split.encode())
        hash_list_columns(h, data.splits[split], ("input_ids", "labels"))
    return h.hexdigest()[:24]


def load_scoring_teacher(teacher_dir: str, dtype: str, num_threads: int | None):
    """(the frozen teacher on this actor's device, in eval mode; the device): for a cache's scorer."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..common import quiet_transformers

    quiet_transformers()
    if num_threads:
        torch.set_num_threads(num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(fetch(teacher_dir), dtype=getattr(torch, dtype)).to(device).eval()
    return model, device


class TeacherScorer:
    """Ray Data callable class: the frozen teacher, loaded once per actor, scoring batches of blocks."""

    def __init__(self, teacher_dir: str, k: int, dtype: str = "float32", num_threads: int | None = None):
        self.model, self.device = load_scoring_teacher(teacher_dir, dtype, num_threads)
        pad = self.model.config.pad_token_id
        self.pad = pad if isinstance(pad, int) else 0
        self.k = k

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from sinkd import TopKDistribution

        from .data import LMCollate

        tensors = LMCollate(self.pad)(batch)
        with torch.no_grad():
            logits = self.model(input_ids=tensors["input_ids"].to(self.device),
                                attention_mask=tensors["attention_mask"].to(self.device)).logits[:, :-1]
            top = TopKDistribution.from_logits(logits, self.k)
        logp = top.probs.clamp_min(torch.finfo(torch.float32).tiny).log().float().cpu().numpy()
        ids, rest = top.ids.to(torch.int32).cpu().numpy(), top.rest.float().cpu().numpy()
        lengths = tensors["attention_mask"].sum(-1).numpy() - 1  # positions that predict a next token
        k = logp.shape[-1]
        extra = {"split": batch.column("split")} if "split" in batch.column_names else {}
        return pa.table({
            **extra, "id": batch.column("id"), "input_ids": batch.column("input_ids"), "labels": batch.column("labels"),
            "k": pa.array(np.full(len(lengths), k), pa.int32()),
            "t_logp": pa.array([logp[i, :n].reshape(-1) for i, n in enumerate(lengths)], pa.list_(pa.float32())),
            "t_ids": pa.array([ids[i, :n].reshape(-1) for i, n in enumerate(lengths)], pa.list_(pa.int32())),
            "t_rest": pa.array([rest[i, :n] for i, n in enumerate(lengths)], pa.list_(pa.float32())),
        })


def ensure_cache(cfg, data, teacher_dir: str) -> CacheInfo:
    """The cache for (teacher, data, k, max_length): reused when present, else built with Ray Data.
    Remembered on `data`, so a Tune trial that receives it (on a node without the teacher's folder)
    reads the cache the driver made without hashing the teacher again."""
    c = cfg.lm.cache
    memo = (teacher_dir, cache_location(cfg), c.topk, c.dtype, cfg.data.max_length)
    kwargs = {"teacher_dir": ship(teacher_dir, cfg), "k": c.topk, "dtype": c.dtype, "num_threads": max(1, int(c.num_cpus))}
    return cached_or_built(cfg, data, memo, lambda: fingerprint(cfg, data, teacher_dir), {s: data.splits[s] for s in SPLITS},
                           TeacherScorer, kwargs, {"teacher": teacher_dir, "topk": c.topk})


def cached_or_built(cfg, data, memo: tuple, fingerprint_of, tables: dict, scorer: type, scorer_kwargs: dict,
                    manifest: dict) -> CacheInfo:
    """A teacher cache of `tables` (split -> rows) scored by the Ray Data callable class `scorer`:
    the one remembered on `data` under `memo`, else the one whose manifest is found under the hash
    `fingerprint_of()`, else built. `manifest`: what else the manifest records (which teacher, k)."""
    if memo in data.caches:
        return data.caches[memo]
    fp = fingerprint_of()
    root = join_storage(cache_location(cfg), fp)
    fs, path = open_storage(root, cache_key(cfg))
    found = _read_manifest(fs, f"{path}/{MANIFEST}")
    if found is not None:
        info = CacheInfo(root, fp, False, found["rows"], found["files"])
    else:
        info = _build(cfg, fp, root, fs, path, tables, scorer, scorer_kwargs, manifest)
    data.caches[memo] = info
    return info


def _read_manifest(fs, path: str) -> dict | None:
    import pyarrow.fs

    if fs.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _build(cfg, fp: str, root: str, fs, path: str, tables: dict, scorer: type, scorer_kwargs: dict,
           manifest: dict) -> CacheInfo:
    """One teacher pass over all `tables` (one set of actors), written partitioned by split into a
    folder of this build's own, then the manifest that makes it the cache. fs, path: root opened."""
    import pyarrow.fs
    import ray.data

    c = cfg.lm.cache
    write = uuid.uuid4().hex[:12]
    table = pa.concat_tables([t.append_column("split", pa.array([s] * t.num_rows)) for s, t in tables.items()])
    ds = ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // (4 * c.batch_size))))
    scored = ds.map_batches(
        scorer, fn_constructor_kwargs=scorer_kwargs, batch_size=c.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=c.concurrency), num_cpus=c.num_cpus,
        **({"num_gpus": c.num_gpus} if c.num_gpus else {}))
    try:
        scored.write_parquet(f"{path}/{write}", filesystem=fs, partition_cols=["split"])
    except BaseException:
        fs.delete_dir_contents(f"{path}/{write}", missing_dir_ok=True)
        raise
    files = {s: [] for s in tables}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(f"{path}/{write}", recursive=True)):
        rel = info.path[len(path.rstrip("/")) + 1:]
        split = rel.split("/")[1].partition("=")[2] if rel.count("/") >= 2 else ""
        if info.type == pyarrow.fs.FileType.File and rel.endswith(".parquet") and split in files:
            files[split].append(rel)
    files = {k: sorted(v) for k, v in files.items()}
    rows = {s: t.num_rows for s, t in tables.items()}
    with fs.open_output_stream(f"{path}/{MANIFEST}") as out:  # last: the cache exists from here on
        out.write(json.dumps({"fingerprint": fp, **manifest, "max_length": cfg.data.max_length, "dtype": c.dtype,
                              "rows": rows, "files": files}, indent=1).encode())
    return CacheInfo(root, fp, True, rows, files)


def read_cache(info: CacheInfo, split: str, num_workers: int):
    """A split of the cache as a Ray Dataset (files in a fixed order), padded for an equal split."""
    import pyarrow.parquet as pq
    import ray.data

    from ..common import padded_rows
    from .data import padding_rows

    fs, files = info.paths(split)
    if not files:
        raise FileNotFoundError(f"logit cache {info.root}: no Parquet files for split {split}")
    ds = ray.data.read_parquet(files, filesystem=fs, partitioning=None)  # rows as written, without a split column
    extra = padded_rows(info.rows[split], num_workers)
    if extra:
        ds = ds.union(ray.data.from_arrow(padding_rows(pq.read_table(files[0], filesystem=fs).slice(0, 1), extra)))
    return ds


def read_cache_table(info: CacheInfo, split: str) -> pa.Table:
    """A whole split on the driver (evaluation, tests), rows sorted by id."""
    import pyarrow.parquet as pq

    fs, files = info.paths(split)
    table = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])
    return table.take(np.argsort(table.column("id").to_numpy(), kind="stable"))
