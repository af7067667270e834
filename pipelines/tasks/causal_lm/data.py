"""Causal-LM data: documents or prompt/response records -> token blocks with next-token labels.

- Packed (`lm.format: packed`): documents (txt paragraphs, a jsonl text column, or the pages of a
  Wikipedia XML dump, markup removed by gensim's `filter_wiki`) are tokenised, joined with EOS and cut
  into blocks of `data.max_length` tokens; every token is a label.
- Prompt/response (`lm.format: prompt_response`): one jsonl record a row, prompt + response + EOS;
  labels are -100 on the prompt, so the loss covers response tokens only; the row keeps the
  response's text (`response`), the reference greedy generations are scored against (Rouge-L).
- Prompt/continuation (`lm.format: prompt_continuation`): the same rows, cut from the documents'
  paragraphs (prompts.py: the first `lm.prompt_words` words, then `lm.response_words`).
Labels are the input ids themselves (the model shifts them: logits at t predict the token at t + 1).
Splits come from data.files, else whole documents are carved out of train (seeded). Rows are
checked as they are read: errors name the file and line.
"""

from __future__ import annotations

import bz2
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import ArrowBatchCollateFn

from ...config import Config
from ..common import (PAD_ID, DataError, attention_mask, carve, carved_size, load_tokenizer, padded, padded_rows, shuffled,
                      subsample)
from .checks import PROMPT_FORMATS, lm_file_format
from .prompts import continuation_records

IGNORE = -100  # label of tokens outside the loss (prompt, padding)


def record_where(cfg: Config, split: str, number: int) -> str:
    """Where a prompt/response record came from, for errors: the file and its line (jsonl), or the
    file and the passage's number in its split (prompt_continuation; carved splits come from train's file)."""
    where = cfg.data.files.get(split, cfg.data.files["train"])
    if cfg.lm.format == "prompt_response":
        return f"{where} line {number}"
    return f"{where} passage {number} of the {split} split"


@dataclass
class LMData:
    """Checked token blocks per split (Arrow: id, input_ids, labels) and what they came from."""

    splits: dict[str, pa.Table]
    vocab_size: int
    notes: list[str] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)  # split -> documents (or records) read
    available: dict[str, int] = field(default_factory=dict)  # split -> blocks before data.max_*_examples
    sources: dict[str, str] = field(default_factory=dict)  # split -> where its documents came from
    caches: dict = field(default_factory=dict)  # logit caches found or built for these blocks (logit_cache.ensure_cache)
    text_bytes: dict = field(default_factory=dict)  # split -> UTF-8 bytes its labels spell (bits per byte)

    def sizes(self) -> dict[str, int]:
        return {k: v.num_rows for k, v in self.splits.items()}

    def split_bytes(self, split: str, tokenizer) -> int:
        """The bytes a split's predicted tokens spell (label_bytes), counted once: load_lm_task counts
        the evaluation splits on the driver, so a Tune trial elsewhere needs no tokenizer for them.
        tokenizer: the tokenizer, or its model directory (loaded only when the split is not counted)."""
        if split not in self.text_bytes:
            tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
            self.text_bytes[split] = int(label_bytes(tok, self.splits[split]).sum())
        return self.text_bytes[split]

    def tokens(self, split: str) -> int:
        """Tokens that carry a label in a split (what perplexity averages over)."""
        labels = self.splits[split].column("labels").combine_chunks().values.to_numpy()
        return int((labels != IGNORE).sum())


def label_bytes(tokenizer, table) -> np.ndarray:
    """UTF-8 bytes of the text each row's predicted tokens spell (labels at positions 1.., not -100).

    Bits per byte = summed NLL / ln 2 / these bytes: a per-text figure that does not depend on the
    tokenizer (perplexity does: a coarser vocabulary has fewer, harder tokens). Special tokens (EOS
    between packed documents) are predicted and scored but spell no bytes."""
    out = np.zeros(table.num_rows, dtype=np.int64)
    for i, (ids, labels) in enumerate(zip(table["input_ids"].to_pylist(), table["labels"].to_pylist())):
        target = [t for t, lab in zip(ids[1:], labels[1:]) if lab != IGNORE]
        text = tokenizer.decode(target, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        out[i] = len(text.encode("utf-8"))
    return out


# ----------------------------------------------------------------------------- reading


def wiki_pages(path: Path, limit: int | None, min_chars: int):
    """Article text of a MediaWiki XML export (.bz2 or plain): main namespace, no redirects."""
    import xml.etree.ElementTree as ET

    from gensim.corpora.wikicorpus import filter_wiki

    opener = bz2.open if path.suffix.lower() == ".bz2" else open
    count = 0
    try:
        with opener(path, "rb") as f:
            for _, el in ET.iterparse(f):
                if not el.tag.endswith("}page") and el.tag != "page":
                    continue
                ns, text = el.find("{*}ns"), el.find("{*}revision/{*}text")
                if ns is not None and ns.text == "0" and el.find("{*}redirect") is None and text is not None and text.text:
                    clean = re.sub(r"\n{3,}", "\n\n", filter_wiki(text.text).replace("'''", "").replace("''", "")).strip()
                    if len(clean) >= min_chars:
                        yield clean
                        count += 1
                el.clear()
                if limit is not None and count >= limit:
                    return
    except (ET.ParseError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read as a Wikipedia XML export: {e}") from None


def _txt_documents(path: Path, encoding: str, limit: int | None, min_chars: int):
    """Paragraphs (blocks separated by blank lines) of a text file."""
    try:
        text = path.read_text(encoding=encoding)
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: cannot read as {encoding} text: {e}") from None
    docs = [d.strip() for d in re.split(r"\n\s*\n", text) if len(d.strip()) >= min_chars]
    return docs[:limit] if limit is not None else docs


def _jsonl_records(path: Path, columns: list[str], encoding: str, limit: int | None, min_chars: int):
    """Tuples of the named string columns, one per jsonl line; a bad line names file and line."""
    out = []
    with path.open(encoding=encoding) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {i}: expected a JSON object, got {type(row).__name__}")
            values = []
            for col in columns:
                if col not in row:
                    raise DataError(f"{path} line {i}: no column '{col}' (columns: {', '.join(row)})")
                if not isinstance(row[col], str) or not row[col].strip():
                    raise DataError(f"{path} line {i}: column '{col}' must be a non-empty string, got {row[col]!r:.40}")
                values.append(row[col])
            if len(values[-1].strip()) >= min_chars or len(columns) > 1:
                out.append((i, tuple(values)))
            if limit is not None and len(out) >= limit:
                break
    return out


def read_split(cfg: Config, split: str) -> list:
    """Documents (str) for packing, or (line, prompt, response) records, of one split's file."""
    lm, path = cfg.lm, Path(cfg.data.files[split])
    fmt = lm_file_format(cfg, path)
    if lm.format == "prompt_response":  # prompt_continuation reads documents (cut into records in read_documents)
        recs = _jsonl_records(path, [lm.prompt_column, lm.response_column], cfg.data.encoding, lm.max_documents, 1)
        return [(line, p, r) for line, (p, r) in recs]
    if fmt == "wiki_xml":
        docs = list(wiki_pages(path, lm.max_documents, lm.min_document_chars))
    elif fmt == "txt":
        docs = _txt_documents(path, cfg.data.encoding, lm.max_documents, lm.min_document_chars)
    else:
        docs = [v[0] for _, v in _jsonl_records(path, [lm.text_column], cfg.data.encoding, lm.max_documents, lm.min_document_chars)]
    if not docs:
        raise DataError(f"data.files.{split}: no documents in {path} (at least {lm.min_document_chars} characters each)")
    return docs


# ----------------------------------------------------------------------------- tokens


def pack_blocks(token_lists: list[list[int]], block: int, eos_id: int) -> np.ndarray:
    """Documents joined with EOS after each, cut into (n, block) rows; the final partial block is dropped."""
    stream = np.fromiter((t for doc in token_lists for t in (*doc, eos_id)), dtype=np.int64)
    n = len(stream) // block
    return stream[: n * block].reshape(n, block)


def prompt_response_row(prompt: list[int], response: list[int], eos_id: int, max_length: int, where: str):
    """(input_ids, labels): labels -100 on the prompt; the response is cut to fit max_length."""
    if len(prompt) >= max_length - 1:
        raise DataError(f"{where}: the prompt has {len(prompt)} tokens, no room for a response within "
                        f"data.max_length={max_length}")
    ids = (prompt + response + [eos_id])[:max_length]
    labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    return ids, labels


def prompt_rows(table: pa.Table):
    """A prompt/response split as generation reads it: (ids, prompt ids: the tokens before the first
    label, reference response texts)."""
    prompts = [ids[:next(i for i, lab in enumerate(labels) if lab != IGNORE)]
               for ids, labels in zip(table["input_ids"].to_pylist(), table["labels"].to_pylist())]
    return table["id"].to_pylist(), prompts, table["response"].to_pylist()


def _table(ids_rows, label_rows, first_id: int = 0) -> pa.Table:
    return pa.table({"id": pa.array(np.arange(first_id, first_id + len(ids_rows)), pa.int64()),
                     "input_ids": pa.array([list(map(int, r)) for r in ids_rows], pa.list_(pa.int32())),
                     "labels": pa.array([list(map(int, r)) for r in label_rows], pa.list_(pa.int32()))})


def tokenize_split(cfg: Config, tokenizer, split: str, items: list) -> pa.Table:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("teacher.path: the tokenizer has no EOS token to separate documents")
    if cfg.lm.format in PROMPT_FORMATS:
        prompts = tokenizer([p for _, p, _ in items], add_special_tokens=False)["input_ids"]
        responses = tokenizer([r for _, _, r in items], add_special_tokens=False)["input_ids"]
        rows = [prompt_response_row(p, r, eos, cfg.data.max_length, record_where(cfg, split, line))
                for (line, _, _), p, r in zip(items, prompts, responses)]
        table = _table([r[0] for r in rows], [r[1] for r in rows])
        return table.append_column("response", pa.array([r for _, _, r in items], pa.string()))
    blocks = pack_blocks(tokenizer(items, add_special_tokens=False)["input_ids"], cfg.data.max_length, eos)
    if len(blocks) == 0:
        raise DataError(f"data.files.{split}: fewer than data.max_length={cfg.data.max_length} tokens in the split")
    return _table(blocks, blocks)


def read_documents(cfg: Config) -> tuple[dict[str, list], list[str], dict[str, str]]:
    """Every split's documents (or records): data.files, with validation and test carved out of
    train's documents (seeded) where they have no file; with lm.format prompt_continuation, each
    split's documents are then cut into (passage, prompt, response) records (after carving, so an
    article's records stay in one split). Returns (split -> items, notes, split -> source)."""
    d = cfg.data
    raw = {split: read_split(cfg, split) for split in d.files}
    notes = []
    missing = [s for s in ("validation", "test") if s not in raw]
    if missing:  # whole documents carved out of train
        docs = raw["train"]
        sizes = [(s, carved_size(getattr(d, f"{s}_fraction"), len(docs))) for s in missing]
        if sum(n for _, n in sizes) >= len(docs):
            raise DataError(f"data.files.train: {len(docs)} documents are too few to carve {', '.join(missing)} out of")
        parts, rest = carve(len(docs), sizes, cfg.seed)
        for s, index in parts.items():
            raw[s] = [docs[i] for i in index]
        raw["train"] = [docs[i] for i in rest]
        notes.append(f"{' and '.join(f'{s} ({n})' for s, n in sizes)} documents carved out of train (seed {cfg.seed})")
    if cfg.lm.format == "prompt_continuation":
        for split, docs in raw.items():
            raw[split] = continuation_records(docs, cfg.lm.prompt_words, cfg.lm.response_words)
            if not raw[split]:
                raise DataError(f"data.files.{split if split in d.files else 'train'}: no paragraph of the {split} documents has "
                                f"lm.prompt_words + lm.response_words = {cfg.lm.prompt_words + cfg.lm.response_words} words")
    train_file = Path(d.files["train"]).name
    sources = {split: Path(d.files[split]).name if split in d.files else f"carved out of {train_file} (seed {cfg.seed})"
               for split in raw}
    return raw, notes, sources


def load_lm_task(cfg: Config, tokenizer) -> LMData:
    """Read, check, carve, tokenise and subsample every split on the driver (no Ray needed)."""
    d = cfg.data
    raw, notes, sources = read_documents(cfg)
    splits, available = {}, {}
    for i, split in enumerate(("train", "validation", "test")):
        table = tokenize_split(cfg, tokenizer, split, raw[split])
        available[split] = table.num_rows
        table = subsample(table, d.max_train_examples if split == "train" else d.max_eval_examples, cfg.seed + 1 + i)
        if split == "train":  # a seeded global shuffle, as classification tasks get
            table = shuffled(table, cfg.seed)
        splits[split] = table.set_column(0, "id", pa.array(np.arange(table.num_rows), pa.int64()))
    data = LMData(splits, len(tokenizer), notes, {split: len(items) for split, items in raw.items()}, available, sources)
    for split in ("validation", "test"):
        data.split_bytes(split, tokenizer)
    return data


# ----------------------------------------------------------------------------- Ray Data


def padding_rows(template: pa.Table, extra: int) -> pa.Table:
    """`extra` rows shaped like the template's first row: id -1, labels all -100, zeros elsewhere."""
    first = template.slice(0, 1).to_pylist()[0]
    row = {k: (PAD_ID if k == "id" else [IGNORE] * len(v) if k == "labels" else
               [type(v[0])(0)] * len(v) if isinstance(v, list) else "" if isinstance(v, str) else 0)
           for k, v in first.items()}
    return pa.Table.from_pylist([row] * extra, schema=template.schema)


def pad_table(table: pa.Table, num_workers: int) -> pa.Table:
    """Append padding rows so every worker gets as many rows (and batches) as the others."""
    extra = padded_rows(table.num_rows, num_workers)
    return pa.concat_tables([table, padding_rows(table, extra)]) if extra else table


def lm_to_ray(table: pa.Table, num_workers: int, blocks: int | None = None):
    import ray.data

    table = pad_table(table, num_workers)
    return ray.data.from_arrow(table, override_num_blocks=blocks or max(1, min(64, table.num_rows // 64)))


class LMCollate(ArrowBatchCollateFn):
    """Arrow rows -> tensors padded to the batch's longest row: input_ids, attention_mask, labels
    (-100 on padding), ids, and for cached rows the teacher's top-k (B, L-1, k) and rest (B, L-1)."""

    def __init__(self, pad_token_id: int):
        super().__init__()
        self.pad_token_id = pad_token_id

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        ids = padded(batch.column("input_ids"), self.pad_token_id, np.int64)
        rows, width = ids.shape
        out = {"input_ids": torch.from_numpy(ids),
               "attention_mask": torch.from_numpy(attention_mask(batch.column("input_ids"), width)),
               "labels": torch.from_numpy(padded(batch.column("labels"), IGNORE, np.int64, width)),
               "ids": torch.from_numpy(batch.column("id").to_numpy().astype(np.int64))}
        if "t_ids" in batch.column_names:
            k = int(batch.column("k").to_numpy().max())  # padding rows (id -1) carry k = 0
            shape = (rows, width - 1, k)
            out["t_ids"] = torch.from_numpy(padded(batch.column("t_ids"), 0, np.int64, width - 1, k).reshape(shape))
            logp = padded(batch.column("t_logp"), -np.inf, np.float32, width - 1, k).reshape(shape)
            out["t_probs"] = torch.from_numpy(np.exp(logp))
            out["t_rest"] = torch.from_numpy(padded(batch.column("t_rest"), 0.0, np.float32, width - 1))
        return out
