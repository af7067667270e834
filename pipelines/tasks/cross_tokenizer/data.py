"""The same text, tokenised by the teacher and by the student: paired blocks for cross-tokenizer LM
distillation and for a tokenizer-agnostic score (bits per byte).

Each document is cut where the teacher's tokens cut it (every `max_length` teacher tokens, by the
tokens' character offsets), so the blocks partition the document's text: block i is
`text[start_i:start_(i+1)]`. Both tokenizers then tokenise exactly that string (no special tokens)
after one start token of their own (BOS, else CLS, else EOS), so every token of the block's text is
predicted on both sides, from the same context. Re-tokenising a substring can differ from the
document's tokens at the cut (a merge across it): a side longer than its max length is truncated and
counted, never silently dropped, and each side's `*_bytes` are the UTF-8 bytes its kept tokens cover:
summed NLL / ln 2 / those bytes is bits per byte, comparable whatever the tokenizers.

Prompt/response rows (lm.format prompt_response or prompt_continuation, records as causal_lm reads
them): each side is its start token, the prompt and the response tokenised apart by its own
tokenizer (no special tokens), then its end token (EOS, else SEP), at most the side's max length
after the start token (the response is cut, the end token first). `{side}_response_start` is the
position of the first response token: the rows predicting it and what follows (the end token
included) are the side's scored rows, in the loss and in every metric; `*_bytes` are the UTF-8 bytes
of the response the side's kept response tokens cover. Packed blocks have `*_response_start` 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from ray.data.collate_fn import ArrowBatchCollateFn

from ...config import Config
from ..causal_lm.data import IGNORE, PROMPT_FORMATS, read_documents, record_where
from ..common import (
    PAD_ID,
    DataError,
    attention_mask,
    padded,
    padded_rows,
    shuffled,
    subsample,
)

SIDES = ("t", "s")  # column prefixes: teacher, student


@dataclass
class PairedBlocks:
    table: pa.Table  # id, text, text_bytes, t_input_ids, t_bytes, s_input_ids, s_bytes
    truncated: dict  # side ("teacher", "student") -> blocks cut to that side's max length


@dataclass
class CrossData:
    """Checked paired blocks per split and what they came from (what Prepared.data holds)."""

    splits: dict[str, pa.Table]
    teacher_vocab: int
    student_vocab: int
    notes: list[str] = field(default_factory=list)
    documents: dict[str, int] = field(default_factory=dict)  # split -> documents read
    available: dict[str, int] = field(default_factory=dict)  # split -> blocks before data.max_*_examples
    sources: dict[str, str] = field(default_factory=dict)
    truncated: dict[str, dict] = field(default_factory=dict)  # split -> PairedBlocks.truncated
    end_tokens: dict[str, int | None] = field(default_factory=dict)  # side -> the token a response ends with
    caches: dict = field(default_factory=dict)  # the teacher's ranked caches found or built for these blocks (cache.py)

    def sizes(self) -> dict[str, int]:
        return {k: v.num_rows for k, v in self.splits.items()}

    def tokens(self, split: str, side: str) -> int:
        """Predicted (scored) tokens of one side ("t" or "s") in a split: from each row's response start on."""
        table = self.splits[split]
        lengths = np.diff(table.column(f"{side}_input_ids").combine_chunks().offsets.to_numpy())
        return int((lengths - table.column(f"{side}_response_start").to_numpy()).sum())

    def text_bytes(self, split: str, side: str) -> int:
        return int(self.splits[split].column(f"{side}_bytes").to_numpy().sum())


def start_token(tokenizer, key: str) -> int:
    """The id each block starts from: BOS, else CLS, else EOS (a context token every model has seen)."""
    for name in ("bos_token_id", "cls_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise DataError(f"{key}: the tokenizer has no BOS, CLS or EOS token to start a block with")


def end_token(tokenizer, key: str) -> int:
    """The id a response ends with: EOS, else SEP (what a WordPiece tokenizer closes a text with)."""
    for name in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise DataError(f"{key}: the tokenizer has no EOS or SEP token to end a response with")


def block_spans(offsets: list[tuple[int, int]], text_length: int, max_length: int, min_tokens: int = 2) -> list[tuple[int, int]]:
    """Character spans [start, end) of consecutive blocks of `max_length` tokens that partition the
    text from its first token on; a last block of fewer than `min_tokens` tokens joins no block and is
    dropped (too short to be worth a row). offsets: the tokens' (start, end) character offsets."""
    starts = [offsets[i][0] for i in range(0, len(offsets), max_length)]
    spans = [(a, b) for a, b in zip(starts, starts[1:] + [text_length])]
    if spans and len(offsets) % max_length and len(offsets) % max_length < min_tokens:
        spans.pop()
    return spans


def _side(tok, texts: list[str], max_length: int, start: int) -> tuple[list, list[int], int]:
    """(ids with the start token first, bytes each row's kept tokens cover, rows truncated)."""
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    rows, covered, cut = [], [], 0
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) > max_length:
            cut += 1
            text = text[:offsets[max_length - 1][1]]
        rows.append([start] + ids[:max_length])
        covered.append(len(text.encode("utf-8")))
    return rows, covered, cut


def paired_blocks(documents: list[str], teacher_tok, student_tok, max_length: int, student_max_length: int,
                  where: str = "data") -> PairedBlocks:
    """Blocks of every document (see the module docstring); `where` names the source in errors."""
    for key, tok in (("teacher.path", teacher_tok), ("student.tokenizer", student_tok)):
        if not getattr(tok, "is_fast", False):
            raise DataError(f"{key}: a fast tokenizer (with character offsets) is needed to cut blocks, "
                            f"got {type(tok).__name__}")
    texts = []
    enc = teacher_tok(documents, add_special_tokens=False, return_offsets_mapping=True)
    for doc, offsets in zip(documents, enc["offset_mapping"]):
        texts += [doc[a:b] for a, b in block_spans(offsets, len(doc), max_length)]
    if not texts:
        raise DataError(f"{where}: no document is long enough for a block (2 teacher tokens or more)")
    t_ids, t_bytes, t_cut = _side(teacher_tok, texts, max_length, start_token(teacher_tok, "teacher.path"))
    s_ids, s_bytes, s_cut = _side(student_tok, texts, student_max_length, start_token(student_tok, "student.tokenizer"))
    empty = next((i for i, s in enumerate(s_ids) if len(s) < 2), None)
    if empty is not None:
        raise DataError(f"{where}: block {empty} ({texts[empty][:40]!r}) has no student token (the student's "
                        "tokenizer drops all of it): nothing to predict on the student side")
    table = pa.table({
        "id": pa.array(range(len(texts)), pa.int64()),
        "text": pa.array(texts, pa.string()),
        "text_bytes": pa.array([len(t.encode("utf-8")) for t in texts], pa.int64()),
        "t_input_ids": pa.array(t_ids, pa.list_(pa.int32())), "t_bytes": pa.array(t_bytes, pa.int64()),
        "s_input_ids": pa.array(s_ids, pa.list_(pa.int32())), "s_bytes": pa.array(s_bytes, pa.int64()),
        "t_response_start": pa.array([1] * len(texts), pa.int64()), "s_response_start": pa.array([1] * len(texts), pa.int64()),
    })
    return PairedBlocks(table, {"teacher": t_cut, "student": s_cut})


def _prompt_side(tok, prompts: list[str], responses: list[str], max_length: int, start: int, end: int, key: str,
                 side: str, wheres: list[str]) -> tuple[list, list[int], list[int], int]:
    """(ids, response start positions, response bytes the kept tokens cover, rows cut) of one side."""
    p_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    enc = tok(responses, add_special_tokens=False, return_offsets_mapping=True)
    rows, starts, covered, cut = [], [], [], 0
    for where, prompt, response, r_ids, offsets in zip(wheres, p_ids, responses, enc["input_ids"], enc["offset_mapping"]):
        room = max_length - len(prompt)  # tokens after the start token and the prompt
        if room < 2:
            raise DataError(f"{where}: the prompt has {len(prompt)} {side} tokens, no room for a response within "
                            f"{key}={max_length}")
        kept = (r_ids + [end])[:room]
        n = min(len(r_ids), room)  # response tokens kept (the end token aside)
        if n == 0:
            raise DataError(f"{where}: the response ({response[:40]!r}) has no {side} token after truncation to "
                            f"{key}={max_length} (the {side}'s tokenizer drops all of it)")
        cut += n < len(r_ids)
        rows.append([start] + prompt + kept)
        starts.append(1 + len(prompt))
        covered.append(len((response if n == len(r_ids) else response[:offsets[n - 1][1]]).encode("utf-8")))
    return rows, starts, covered, cut


def prompt_pairs(records: list[tuple], teacher_tok, student_tok, max_length: int, student_max_length: int,
                 wheres: list[str]) -> PairedBlocks:
    """Rows of (number, prompt, response) records (module docstring); `wheres` names each record in errors."""
    prompts, responses = [r[1] for r in records], [r[2] for r in records]
    sides = {}
    for side, key, tok, cap in (("t", "data.max_length", teacher_tok, max_length),
                                ("s", "lm.student_max_length", student_tok, student_max_length)):
        if not getattr(tok, "is_fast", False):
            raise DataError(f"{'teacher.path' if side == 't' else 'student.tokenizer'}: a fast tokenizer (with character "
                            f"offsets) is needed to count response bytes, got {type(tok).__name__}")
        start = start_token(tok, "teacher.path" if side == "t" else "student.tokenizer")
        end = end_token(tok, "teacher.path" if side == "t" else "student.tokenizer")
        sides[side] = _prompt_side(tok, prompts, responses, cap, start, end, key,
                                   "teacher" if side == "t" else "student", wheres)
    columns = {"id": pa.array(range(len(records)), pa.int64()),
               "text": pa.array([p + r for p, r in zip(prompts, responses)], pa.string()),
               "text_bytes": pa.array([len(r.encode("utf-8")) for r in responses], pa.int64()),
               "response": pa.array(responses, pa.string())}
    for side, (ids, starts, covered, _) in sides.items():
        columns.update({f"{side}_input_ids": pa.array(ids, pa.list_(pa.int32())), f"{side}_bytes": pa.array(covered, pa.int64()),
                        f"{side}_response_start": pa.array(starts, pa.int64())})
    return PairedBlocks(pa.table(columns), {"teacher": sides["t"][3], "student": sides["s"][3]})


def student_max_length(cfg: Config) -> int:
    return cfg.lm.student_max_length or 2 * cfg.data.max_length


def load_cross_task(cfg: Config, teacher_tok, student_tok) -> CrossData:
    """Read, carve, pair and subsample every split on the driver (no Ray needed)."""
    d = cfg.data
    raw, notes, sources = read_documents(cfg)
    splits, available, truncated = {}, {}, {}
    for i, split in enumerate(("train", "validation", "test")):
        if cfg.lm.format in PROMPT_FORMATS:
            wheres = [record_where(cfg, split, number) for number, _, _ in raw[split]]
            blocks = prompt_pairs(raw[split], teacher_tok, student_tok, d.max_length, student_max_length(cfg), wheres)
        else:
            where = f"data.files.{split}" if split in d.files else f"data.files.train ({split} carved out of it)"
            blocks = paired_blocks(raw[split], teacher_tok, student_tok, d.max_length, student_max_length(cfg), where)
        table, truncated[split] = blocks.table, blocks.truncated
        available[split] = table.num_rows
        table = subsample(table, d.max_train_examples if split == "train" else d.max_eval_examples, cfg.seed + 1 + i)
        if split == "train":
            table = shuffled(table, cfg.seed)
        splits[split] = table.set_column(0, "id", pa.array(np.arange(table.num_rows), pa.int64()))
    cut = {side: sum(t[side] for t in truncated.values()) for side in ("teacher", "student")}
    notes += [f"{n} block(s) cut to the {side}'s max length ({'data.max_length' if side == 'teacher' else 'lm.student_max_length'})"
              for side, n in cut.items() if n]
    ends = {"t": end_token(teacher_tok, "teacher.path"), "s": end_token(student_tok, "student.tokenizer")}
    return CrossData(splits, len(teacher_tok), len(student_tok), notes, {s: len(v) for s, v in raw.items()},
                     available, sources, truncated, ends)


class PairCollate(ArrowBatchCollateFn):
    """Arrow rows -> each side's input_ids and attention_mask ("t_", "s_"), padded to the batch's
    longest row of that side with id 0 (a valid id of any vocabulary, masked out); each side's labels
    (its ids from `*_response_start` on, where the rows have that column; -100 before it and on
    padding); ids; each side's bytes. Padding rows (id -1) get all-zero masks. Rows of the teacher's
    ranked cache (cache.py) add its columns per teacher row: ranked_columns."""

    def __call__(self, batch: pa.Table) -> dict:
        import torch

        row_ids = batch.column("id").to_numpy().astype(np.int64)
        real = (row_ids != PAD_ID)[:, None]
        out = {"ids": torch.from_numpy(row_ids)}
        for side in SIDES:
            ids = padded(batch.column(f"{side}_input_ids"), 0, np.int64)
            mask = attention_mask(batch.column(f"{side}_input_ids"), ids.shape[1]) * real
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
            out[f"{side}_bytes"] = torch.from_numpy(batch.column(f"{side}_bytes").to_numpy().astype(np.int64) * real[:, 0])
            name = f"{side}_response_start"
            start = batch.column(name).to_numpy().astype(np.int64) if name in batch.column_names else np.zeros(len(row_ids), np.int64)
            scored = out[f"{side}_attention_mask"].bool() & (torch.arange(ids.shape[1])[None, :] >= torch.from_numpy(start)[:, None])
            out[f"{side}_labels"] = torch.where(scored, out[f"{side}_input_ids"], IGNORE)
        if "t_top" in batch.column_names:
            out.update(ranked_columns(batch, out["t_input_ids"].shape[1] - 1))
        return out


def ranked_columns(batch: pa.Table, rows: int) -> dict:
    """The cached teacher of each block as tensors: t_top (B, rows, w) and t_lse (B, rows, m), zeros
    past a block's rows (row t predicts teacher token t + 1); t_vocab (B,); t_temperatures (B, m)."""
    import torch

    temps = np.asarray(batch.column("t_temperatures").to_pylist(), np.float64)
    lse = padded(batch.column("t_lse"), 0.0, np.float32, rows, temps.shape[1])
    # w from the first block: w floats a teacher row in t_top against m in t_lse
    width = len(batch.column("t_top")[0]) * temps.shape[1] // max(len(batch.column("t_lse")[0]), 1)
    top = padded(batch.column("t_top"), 0.0, np.float32, rows, width)
    return {"t_top": torch.from_numpy(top.reshape(len(temps), rows, width)),
            "t_lse": torch.from_numpy(lse.reshape(len(temps), rows, temps.shape[1])),
            "t_vocab": torch.from_numpy(batch.column("t_vocab").to_numpy().astype(np.int64)),
            "t_temperatures": torch.from_numpy(temps)}


def pad_pairs(table: pa.Table, num_workers: int) -> pa.Table:
    """Append copies of the first row with id -1 and no bytes (PairCollate masks them out) so every
    worker gets as many rows as the others."""
    extra = padded_rows(table.num_rows, num_workers)
    if not extra:
        return table
    pad = table.take([0] * extra)
    pad = pad.set_column(0, "id", pa.array([PAD_ID] * extra, pa.int64()))
    for name in ("text_bytes", "t_bytes", "s_bytes"):
        pad = pad.set_column(pad.schema.get_field_index(name), name, pa.array([0] * extra, pa.int64()))
    return pa.concat_tables([table, pad])


def pairs_to_ray(table: pa.Table, num_workers: int):
    import ray.data

    table = pad_pairs(table, num_workers)
    return ray.data.from_arrow(table, override_num_blocks=max(1, min(64, table.num_rows // 64)))
