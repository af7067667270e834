"""Task data: load and check on the driver, then Ray Data for tokenising and streaming to workers.

- `load_task` reads a split set with Hugging Face datasets (hub name/config, `load_from_disk`, or
  CSV/TSV/JSONL/Parquet files), checks every row (errors name the file and row) and returns
  normalised Arrow tables: id (row in its source), text_a, [text_b], label.
- `ClassificationData.tokenized` tokenises a split once per job on the driver (the rows are there
  already, checked one by one; a fast tokenizer does thousands a second) and keeps it for every
  stage, epoch and evaluation with the same tokenizer: no tokenising tasks compete with training.
- `to_ray` turns a tokenised table into a Ray Dataset, padded with id = -1 rows to a multiple of the
  worker count, so that Ray Train's equal streaming split hands every worker the same number of rows
  (same number of batches: collectives stay matched) without dropping a real example.
- `PadCollate` pads each batch to its own longest row in `iter_torch_batches`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import ArrowBatchCollateFn

from ...config import Config, DataConfig, resolve_path
from ..common import (PAD_ID, DataError, attention_mask, carve, carved_size, load_tokenizer, padded, padded_rows,
                      shuffled, subsample, tokenizer_identity)

FILE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")


@dataclass
class ClassificationData:
    """The checked splits (Arrow tables: id, label, text_a[, text_b]) and what the labels mean."""

    splits: dict[str, pa.Table]
    num_labels: int
    label_names: list[str] | None
    pair: bool
    task: str | None = None
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # split -> where its rows came from
    available: dict[str, int] = field(default_factory=dict)  # split -> rows before data.max_*_examples
    token_tables: dict = field(default_factory=dict, repr=False)  # (split, tokenizer, max_length) -> table
    teacher_tables: dict = field(default_factory=dict, repr=False)  # (teacher, max_length) -> train + logits

    def sizes(self) -> dict[str, int]:
        return {k: v.num_rows for k, v in self.splits.items()}

    def tokenized(self, split: str, tokenizer_path: str, max_length: int) -> pa.Table:
        """The split's rows as token ids (id, label, input_ids[, token_type_ids]), tokenised once per
        tokenizer: the teacher, its fine-tuned copy and the students share one (checked up front)."""
        key = (split, tokenizer_identity(tokenizer_path), max_length)
        if key not in self.token_tables:
            self.token_tables[key] = tokenize_table(self.splits[split], tokenizer_path, max_length)
        return self.token_tables[key]


# ----------------------------------------------------------------------------- reading


def _read_source(cfg: DataConfig) -> dict[str, tuple[object, str, str]]:
    """split -> (datasets.Dataset, where (for messages), row style)."""
    import datasets

    datasets.disable_progress_bars()
    out = {}
    if cfg.name:
        where = f"{cfg.name}/{cfg.config}" if cfg.config else cfg.name
        try:
            dd = datasets.load_dataset(cfg.name, cfg.config)
        except Exception as e:  # offline, unknown name or config
            raise DataError(f"data.name: cannot load {where} from the Hugging Face hub: {_first_line(e)}") from None
        for split, hf_split in cfg.splits.items():
            if hf_split in dd:
                out[split] = (dd[hf_split], f"{where} split {hf_split}", "row")
        return out
    if cfg.load_from_disk:
        path = resolve_path(cfg.load_from_disk, "data.load_from_disk")
        try:
            dd = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"data.load_from_disk: cannot load {path}: {_first_line(e)}") from None
        if isinstance(dd, datasets.Dataset):
            return {"train": (dd, f"{path}", "row")}
        for split, hf_split in cfg.splits.items():
            if hf_split in dd:
                out[split] = (dd[hf_split], f"{path} split {hf_split}", "row")
        return out
    for split, value in cfg.files.items():
        path = resolve_path(value, f"data.files.{split}")
        fmt = file_format(cfg, path)
        text_like = {c: str for c in [*cfg.text_columns, cfg.label_column]}  # no type guessing
        builder, kwargs = {
            "csv": ("csv", dict(encoding=cfg.encoding, keep_default_na=False)),
            "tsv": ("csv", dict(encoding=cfg.encoding, keep_default_na=False, delimiter="\t",
                                quoting=csv.QUOTE_NONE)),
            "jsonl": ("json", {}),
            "parquet": ("parquet", {}),
        }[fmt]
        try:
            if builder == "csv":
                _check_columns(_csv_header(path, kwargs), cfg, str(path))
                kwargs["converters"] = text_like
            ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"data.files.{split}: cannot read {path} as {fmt}: {_first_line(e)}") from None
        out[split] = (ds, str(path), {"csv": "csv", "tsv": "csv", "jsonl": "line"}.get(fmt, "row"))
    return out


def _csv_header(path: Path, kwargs: dict) -> list[str]:
    import pandas as pd

    return list(pd.read_csv(path, nrows=0, **kwargs).columns)


def _check_columns(columns: list[str], cfg: DataConfig, where: str) -> None:
    for col in cfg.text_columns:
        if col not in columns:
            raise DataError(f"data.text_columns: column '{col}' not found in {where} (columns: {', '.join(columns)})")
    if cfg.label_column not in columns:
        raise DataError(f"data.label_column: column '{cfg.label_column}' not found in {where} (columns: {', '.join(columns)})")


def _first_line(e: BaseException) -> str:
    """The root cause's first line (datasets wraps the parser's precise error in a generic one)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _row_name(style: str, i: int) -> str:
    return {"csv": f"row {i + 1} (line {i + 2})", "line": f"line {i + 1}"}.get(style, f"row {i + 1}")


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


# ----------------------------------------------------------------------------- checking


def _check_split(ds, where: str, style: str, cfg: DataConfig, label_names: list[str] | None,
                 num_labels: int | None, hidden_ok: bool) -> pa.Table | None:
    """Every row checked; returns the normalised table, or None for a split with hidden labels (-1)."""
    _check_columns(list(ds.column_names), cfg, where)
    labels = ds[cfg.label_column]
    if hidden_ok and labels and all(v == -1 for v in labels):
        return None  # e.g. GLUE test splits: labels withheld
    texts = [ds[c] for c in cfg.text_columns]
    label_ids = np.empty(len(labels), dtype=np.int64)
    index = {name: i for i, name in enumerate(label_names)} if label_names else None
    for i, value in enumerate(labels):
        for col, column in zip(cfg.text_columns, texts):
            text = column[i]
            if _is_missing(text):
                raise DataError(f"{where} {_row_name(style, i)}: empty text in column '{col}'")
            if not isinstance(text, str):
                raise DataError(f"{where} {_row_name(style, i)}: text in column '{col}' is not a string: {text!r}")
        if _is_missing(value):
            raise DataError(f"{where} {_row_name(style, i)}: missing label in column '{cfg.label_column}'")
        label = _label_id(value, index, num_labels)
        if label is None:
            expected = (f"one of {', '.join(label_names)}" if label_names
                        else f"an integer in 0..{num_labels - 1}" if num_labels else "an integer class id >= 0")
            raise DataError(f"{where} {_row_name(style, i)}: unknown label {value!r} (expected {expected})")
        label_ids[i] = label
    table = {"id": np.arange(len(labels), dtype=np.int64), "label": label_ids, "text_a": texts[0]}
    if len(texts) == 2:
        table["text_b"] = texts[1]
    return pa.table(table)


def _label_id(value, index: dict | None, num_labels: int | None) -> int | None:
    if index is not None:
        if isinstance(value, str) and value.strip() in index:
            return index[value.strip()]
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(index):
            return int(value)
        return None
    try:
        label = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        return None
    if label is None or isinstance(value, bool) or label < 0 or (num_labels is not None and label >= num_labels):
        return None
    return label


def file_format(cfg: DataConfig, path: Path) -> str:
    fmt = cfg.format or path.suffix.lower().lstrip(".")
    return {"json": "jsonl"}.get(fmt, fmt)


def load_task(config: Config) -> ClassificationData:
    """Read, check and split the task's data on the driver (no Ray needed); raises DataError."""
    cfg = config.data
    source = _read_source(cfg)
    if "train" not in source:
        raise DataError(f"data: no train split found (have: {', '.join(source) or 'none'})")
    label_names = cfg.label_names
    train_ds = source["train"][0]
    feature = getattr(train_ds, "features", {}).get(cfg.label_column) if hasattr(train_ds, "features") else None
    if label_names is None and feature is not None and hasattr(feature, "names"):
        label_names = list(feature.names)  # hub ClassLabel: names come with the data
    num_labels = len(label_names) if label_names else cfg.num_labels
    splits, notes, sources = {}, [], {}
    for split in ("train", "validation", "test"):
        if split in source:
            ds, where, style = source[split]
            table = _check_split(ds, where, style, cfg, label_names, num_labels, hidden_ok=split == "test")
            if table is None:
                notes.append(f"{where}: labels withheld; the test scores use the validation split")
                continue
            splits[split], sources[split] = table, Path(where).name if Path(where).is_file() else where
            if num_labels is None and split == "train":  # later splits are checked against train's classes
                num_labels = max(int(pa.compute.max(table["label"]).as_py()) + 1, 2)
    carved = _carve(splits, sources, cfg, config.seed)
    available = {split: table.num_rows for split, table in splits.items()}
    splits = {split: subsample(table, cfg.max_train_examples if split == "train" else cfg.max_eval_examples,
                               config.seed + 1 + i)  # i: the split's place in `splits`, as it always was
              for i, (split, table) in enumerate(splits.items())}
    splits["train"] = shuffled(splits["train"], config.seed)
    for split, table in splits.items():
        if table.num_rows == 0:
            raise DataError(f"data: split {split} is empty")
    if carved:  # the counts actually used, after data.max_*_examples
        notes.append(" and ".join(f"{name} {splits[name].num_rows}" + (f" of {available[name]}" if splits[name].num_rows
                                  < available[name] else "") for name in ("validation", "test") if name in carved)
                     + f" rows carved out of train (seed {config.seed})")
    return ClassificationData(splits, num_labels, label_names, len(cfg.text_columns) == 2, cfg.task, notes,
                              sources, available)


def _carve(splits: dict, sources: dict, cfg: DataConfig, seed: int) -> list[str]:
    """Missing validation/test splits, in place: test falls back to validation, else both come out of
    train (seeded). Returns the splits carved out of train."""
    train = splits["train"]
    if "validation" not in splits and "test" not in splits:
        sizes = [("test", carved_size(cfg.test_fraction, train.num_rows)),
                 ("validation", carved_size(cfg.validation_fraction, train.num_rows))]
    elif "validation" not in splits:
        sizes = [("validation", carved_size(cfg.validation_fraction, train.num_rows))]
    else:
        if "test" not in splits:
            splits["test"], sources["test"] = splits["validation"], f"{sources['validation']} (no test split)"
        return []
    parts, rest = carve(train.num_rows, sizes, seed)
    for name, index in parts.items():
        splits[name], sources[name] = train.take(index), f"carved out of {sources['train']} (seed {seed})"
    splits["train"] = train.take(rest)
    return list(parts)


# ----------------------------------------------------------------------------- Ray Data


def to_ray(table: pa.Table, num_workers: int, blocks: int | None = None):
    """Ray Dataset of a tokenised table, padded with id=-1 rows (copies of the first row, outside
    every loss and score) to a multiple of num_workers."""
    import ray.data

    extra = padded_rows(table.num_rows, num_workers)
    if extra:
        first = table.slice(0, 1)
        pad = first.set_column(first.schema.get_field_index("id"), "id", pa.array([PAD_ID], pa.int64()))
        table = pa.concat_tables([table, *[pad] * extra])
    blocks = blocks or max(1, min(64, table.num_rows // 256))
    return ray.data.from_arrow(table, override_num_blocks=blocks)


def with_teacher_logits(tokens: pa.Table, ids, logits) -> pa.Table:
    """The tokenised rows with a `teacher_logits` column (fixed-size float32 lists), matched by id:
    `ids` and `logits` (rows x classes) come in any order, every row of `tokens` must be among them."""
    position = {int(i): k for k, i in enumerate(np.asarray(ids))}
    wanted = [int(i) for i in tokens["id"].to_numpy()]
    missing = [i for i in wanted if i not in position]
    if missing:
        raise ValueError(f"teacher logits missing for {len(missing)} row id(s), e.g. {missing[:3]}")
    logits = np.asarray(logits, dtype=np.float32)[[position[i] for i in wanted]]
    column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), logits.shape[1])
    return tokens.append_column("teacher_logits", column)


TOKENIZE_CHUNK = 10_000  # rows per tokenizer call: bounded memory for the Python lists it returns


def tokenize_table(table: pa.Table, tokenizer_path: str, max_length: int) -> pa.Table:
    """Rows (id, label, text_a[, text_b]) -> (id, label, input_ids[, token_type_ids]), truncated."""
    parts = [tokenize_batch(table.slice(start, TOKENIZE_CHUNK), tokenizer_path, max_length)
             for start in range(0, table.num_rows, TOKENIZE_CHUNK)]
    return pa.concat_tables(parts) if parts else tokenize_batch(table, tokenizer_path, max_length)


def tokenize_batch(batch: pa.Table, tokenizer_path: str, max_length: int) -> pa.Table:
    tok = load_tokenizer(tokenizer_path)
    text_b = batch.column("text_b").to_pylist() if "text_b" in batch.column_names else None
    enc = tok(batch.column("text_a").to_pylist(), text_b, truncation=True, max_length=max_length,
              return_attention_mask=False)
    out = {"id": batch.column("id"), "label": batch.column("label"),
           "input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32()))}
    if "token_type_ids" in enc:
        out["token_type_ids"] = pa.array(enc["token_type_ids"], pa.list_(pa.int8()))
    return pa.table(out)


class PadCollate(ArrowBatchCollateFn):
    """Arrow batch from Ray Data -> torch tensors padded to the batch's longest row (dynamic padding)."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        ids = padded(batch.column("input_ids"), self.pad_token_id, np.int64)
        mask = attention_mask(batch.column("input_ids"), ids.shape[1])
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
               "labels": torch.from_numpy(batch.column("label").to_numpy().astype(np.int64)),
               "ids": torch.from_numpy(batch.column("id").to_numpy().astype(np.int64))}
        if "token_type_ids" in batch.column_names:
            out["token_type_ids"] = torch.from_numpy(padded(batch.column("token_type_ids"), 0, np.int64, ids.shape[1]))
        if "teacher_logits" in batch.column_names:  # cached: the teacher does not run in the workers
            column = batch.column("teacher_logits").combine_chunks()
            values = column.flatten().to_numpy(zero_copy_only=False)
            out["teacher_logits"] = torch.from_numpy(values.reshape(len(column), column.type.list_size).copy())
        return out
