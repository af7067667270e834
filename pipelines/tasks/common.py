"""Pieces every task uses: padding rows and batches, epoch sizes, tokenizers, frozen teachers,
students copied from teacher layers, seeded carving and subsampling of splits."""

from __future__ import annotations

import copy
import math
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
from torch import nn

from ..config import Config, ConfigError, TrainConfig, objective_config

PAD_ID = -1  # id of the rows added so every worker gets the same number of rows
TASK_FILE = "sinkd_task.json"  # written next to exported models: kind, labels, label token ids


class DataError(ConfigError):
    """A bad data file or row; the message names the file (or split) and the row."""


# ----------------------------------------------------------------------------- splits and epochs


def padded_rows(n: int, num_workers: int) -> int:
    """Rows to append so that n splits equally over num_workers."""
    return -n % num_workers


def batches_per_shard(rows: int, num_workers: int, batch_size: int) -> int:
    """Batches each worker gets from an equal split of `rows` (already padded to a multiple)."""
    return math.ceil(rows / num_workers / batch_size)


def epoch_shape(cfg: Config, train_table: pa.Table, t: TrainConfig) -> tuple[int, int, list[float]]:
    """Micro-batches per rank, optimizer steps per epoch, and the (count, sum, sum of squares) of the
    training ids that the exactly-once check compares against."""
    world = cfg.scaling.num_workers
    rows = train_table.num_rows
    batches = batches_per_shard(rows + padded_rows(rows, world), world, t.batch_size)
    steps = math.ceil(batches / t.grad_accum)
    if t.max_steps_per_epoch:
        steps = min(steps, t.max_steps_per_epoch)
    ids = train_table["id"].to_numpy().astype("float64")
    return batches, steps, [float(len(ids)), float(ids.sum()), float((ids ** 2).sum())]


def carve(n: int, sizes: list[tuple[str, int]], seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Seeded split of n items: ({name: sorted indices} in the order given, the sorted rest)."""
    order = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name, size in sizes:
        out[name] = np.sort(order[start:start + size])
        start += size
    return out, np.sort(order[start:])


def carved_size(fraction: float, n: int) -> int:
    return max(1, int(round(fraction * n)))


def subsample(table: pa.Table, cap: int | None, seed: int) -> pa.Table:
    """At most `cap` rows, chosen with `seed`, in their original order."""
    if cap is None or table.num_rows <= cap:
        return table
    return table.take(np.sort(np.random.default_rng(seed).permutation(table.num_rows)[:cap]))


def shuffled(table: pa.Table, seed: int) -> pa.Table:
    """A seeded global shuffle: files are often sorted (by label, source...), so every worker's shard
    and every batch mixes them; Ray Data's local shuffle then reorders each epoch."""
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def padded(column, fill, dtype, width: int | None = None, per_item: int = 1) -> np.ndarray:
    """A list<...> Arrow column -> (rows, width * per_item) numpy, right-padded with fill; width
    defaults to the longest row."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = col.offsets.to_numpy()
    lengths = np.diff(offsets)
    width = int(width if width is not None else lengths.max(initial=per_item) // per_item) * per_item
    mask = np.arange(width)[None, :] < lengths[:, None]
    out = np.full(mask.shape, fill, dtype=dtype)
    out[mask] = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    return out


def attention_mask(column, width: int) -> np.ndarray:
    """(rows, width) int64: 1 on each row's tokens of a list<...> Arrow column, 0 on the padding."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = np.diff(col.offsets.to_numpy())
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)


def epoch_batches(shard, batch_size: int, collate, seed: int, epoch: int, shuffle_buffer: int = 0):
    """A worker's batches for one epoch: local shuffle seeded by (seed, epoch), the task's collate."""
    return shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                    local_shuffle_buffer_size=shuffle_buffer or None,
                                    local_shuffle_seed=seed * 1000 + epoch if shuffle_buffer else None)


def eval_pool(cfg: Config) -> dict:
    """Batch-inference actors shaped like the training workers (one per worker, its CPUs each, and its
    GPU when the job trains on GPUs), so that each fits wherever a worker did; one asking for all the
    workers' CPUs might fit on no node."""
    s = cfg.scaling
    return {"cpus": max(1.0, s.cpus_per_worker), "actors": s.num_workers,
            "gpus": s.gpus_per_worker if s.use_gpu else 0.0}


def actor_resources(cpus: float, gpus: float) -> dict:
    """map_batches' resource arguments for one inference actor (num_gpus only when it asks for one)."""
    return {"num_cpus": cpus, **({"num_gpus": gpus} if gpus else {})}


def to_frame(ds):
    """A dataset's rows as one pandas frame, joined as Arrow (Ray Data's own to_pandas goes through a
    pandas call deprecated in pandas 3 once there are several blocks)."""
    return pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))).to_pandas()


# ----------------------------------------------------------------------------- objective


class SameVocabObjective:
    """sinkd.DistillationObjective on Rows whose student and teacher logits share a vocabulary, row
    for row (classification, causal_lm): CE + alpha * divergence + beta * batch-wise Sinkhorn."""

    def __init__(self, values: dict, prefix: str = "objective"):
        from sinkd import DistillationObjective

        self.config = objective_config(values, prefix)  # ConfigError naming prefix.key
        self.loss = DistillationObjective(self.config)

    def __call__(self, rows):
        out = self.loss(rows.student, rows.teacher, labels=rows.labels, mask=rows.extra.get("mask"))  # mask: rows without CE
        added = rows.extra.get("added_loss")  # a task's own trained term, e.g. causal_lm's online teacher block
        if added is not None:
            out.loss = out.loss + added
        return out

    def describe(self) -> str:
        o, s = self.config, self.config.sinkhorn
        parts = [f"ce {o.ce_weight:g}", f"{o.alpha:g} x {o.divergence} (T {o.temperature:g})"]
        if o.beta > 0:
            parts.append(f"{o.beta:g} x Sinkhorn (eps {s.eps:g}, {s.max_iter} its, {s.cost}, T {s.temperature:g}, "
                         f"{s.normalization})")
        return " + ".join(parts)


# ----------------------------------------------------------------------------- models and tokenizers


def quiet_transformers() -> None:
    """transformers' info logs and download bars are not for sinkd's users."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """A model directory's fast tokenizer, loaded once per process (Ray workers reuse it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True)


@lru_cache(maxsize=16)
def tokenizer_identity(path: str) -> str:
    """A digest of what a tokenizer does (vocabulary, normaliser, pre-tokeniser, post-processor):
    equal digests tokenise every text the same, whatever directory they were saved in. Truncation and
    padding are left out: a call with truncation=True sets them on the shared tokenizer object."""
    return backend_digest(load_tokenizer(path))


def backend_digest(tokenizer) -> str:
    """tokenizer_identity of a loaded fast tokenizer."""
    import hashlib
    import json

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def check_same_tokenizer(teacher: Path, student: Path, teacher_gguf: str | None = None,
                         require_student_tokenizer: bool = False) -> None:
    """Same vocabulary (token -> id) on both sides; teacher_gguf: the teacher's tokenizer lives in
    that GGUF file. Causal LMs distil token by token, so there the student must bring its tokenizer."""
    tok_files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any((student / f).is_file() for f in tok_files):
        if require_student_tokenizer:
            raise ConfigError(f"student.path: no tokenizer in {student}; a causal-LM student must ship the teacher's tokenizer")
        return  # the student will use the teacher's tokenizer
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(teacher, gguf_file=teacher_gguf) if teacher_gguf else AutoTokenizer.from_pretrained(teacher)
    s = AutoTokenizer.from_pretrained(student)
    if t.get_vocab() != s.get_vocab():
        raise ConfigError(f"student.path: its tokenizer ({len(s)} tokens) differs from the teacher's ({len(t)} tokens); "
                          "teacher and student must share a vocabulary")


def check_student_keys(cfg: Config, own_tokenizer: bool = False, fine_tunes_teacher: bool = False) -> None:
    """Keys of `student` the chosen init does not read are refused, not ignored. own_tokenizer: the
    task lets the student bring another tokenizer than the teacher's (student.tokenizer);
    fine_tunes_teacher: the task may fine-tune its teacher first (student.layers_from reads that)."""
    s = cfg.student
    if s.init != "pretrained" and (s.path or s.config and s.init != "config"):
        raise ConfigError(f"student: path/config are not used with student.init: {s.init}")
    if s.layers_from != "finetuned" and (s.init != "teacher_layers" or not fine_tunes_teacher):
        raise ConfigError(f"student.layers_from: used only with student.init: teacher_layers, in a task that fine-tunes "
                          f"its teacher (task_type classification); got init {s.init}, task_type {cfg.task_type}")
    if s.tokenizer and not own_tokenizer:
        raise ConfigError(f"student.tokenizer: task_type {cfg.task_type} distils into the teacher's tokenizer; "
                          "a student with its own tokenizer needs task_type: cross_tokenizer")


def check_no_online_teacher(cfg: Config) -> None:
    """Tasks whose teacher stays frozen refuse teacher.online (OKD modules are causal_lm's)."""
    if cfg.teacher.online.kind is not None:
        raise ConfigError(f"teacher.online: task_type {cfg.task_type} distils from a frozen teacher; "
                          "online teacher modules need task_type: causal_lm")


def frozen_teacher(load, ds_config_zero3: dict | None = None) -> nn.Module:
    """`load()`'s model in eval mode without gradients. With a ZeRO-3 DeepSpeed config it loads while
    an HfDeepSpeedConfig is alive, so transformers partitions the weights as they load
    (deepspeed.zero.Init directly fails in transformers 5)."""
    if ds_config_zero3 is not None:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config_zero3)  # noqa: F841 (weakly referenced by transformers)
    model = load().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Decoder/encoder layer indices in parameter names: BERT `encoder.layer.3.`, T5 `encoder.block.3.`,
# Llama-style decoders `model.layers.3.`.
_LAYER_KEY = re.compile(r"((?:^|\.)(?:(?:encoder|decoder)\.(?:layer|block)|layers)\.)(\d+)(\.)")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "num_decoder_layers")


def student_from_teacher_layers(teacher: nn.Module, layers: list[int]) -> nn.Module:
    """PKD-style: the teacher's architecture with len(layers) layers, initialised from those teacher
    layers; embeddings, pooler, final norm and heads copied as they are."""
    conf = copy.deepcopy(teacher.config)
    for key in _LAYER_COUNT_KEYS:
        if hasattr(conf, key):
            setattr(conf, key, len(layers))
    if isinstance(getattr(conf, "layer_types", None), list):  # per-layer attention kinds (e.g. sliding)
        conf.layer_types = [conf.layer_types[i] for i in layers]
    student = type(teacher)(conf)
    source = teacher.state_dict()

    def teacher_key(key: str) -> str:
        return _LAYER_KEY.sub(lambda m: f"{m.group(1)}{layers[int(m.group(2))]}{m.group(3)}", key)

    state = {}
    for key in student.state_dict():
        src = teacher_key(key)
        if src not in source:  # e.g. T5's relative attention bias lives in block 0 only
            src = _LAYER_KEY.sub(lambda m: f"{m.group(1)}0{m.group(3)}", key)
        state[key] = source[src].clone()
    student.load_state_dict(state, strict=True)
    return student


