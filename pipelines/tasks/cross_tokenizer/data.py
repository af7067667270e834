"""The same text, tokenised by the teacher and by the student: paired blocks for cross-tokenizer LM
distillation and for a tokenizer-agnostic score (bits per byte).

Each document is cut where the teacher's tokens cut it (every `max_length` teacher tokens, by the
tokens' character offsets), so the blocks partition the document's text: block i is
`text[start_i:start_(i+1)]`. Both tokenizers then tokenise exactly that string (no special tokens),
so the teacher's and the student's summed NLL over a block are losses on the same bytes, and their
sums over a split divided by its UTF-8 bytes are comparable bits per byte. Re-tokenising a substring
can differ from the document's tokens at the cut (a merge across it): a side longer than its
max length is truncated and counted, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from ..common import DataError


@dataclass
class PairedBlocks:
    table: pa.Table  # id, text, text_bytes, t_input_ids, s_input_ids
    truncated: dict  # side ("teacher", "student") -> blocks cut to that side's max length


def block_spans(offsets: list[tuple[int, int]], text_length: int, max_length: int, min_tokens: int = 2) -> list[tuple[int, int]]:
    """Character spans [start, end) of consecutive blocks of `max_length` tokens that partition the
    text from its first token on; a last block of fewer than `min_tokens` tokens joins no block and is
    dropped (nothing to predict in it). offsets: the tokens' (start, end) character offsets."""
    starts = [offsets[i][0] for i in range(0, len(offsets), max_length)]
    spans = [(a, b) for a, b in zip(starts, starts[1:] + [text_length])]
    if spans and len(offsets) % max_length and len(offsets) % max_length < min_tokens:
        spans.pop()
    return spans


def paired_blocks(documents: list[str], teacher_tok, student_tok, max_length: int, student_max_length: int,
                  where: str = "data") -> PairedBlocks:
    """Blocks of every document (see the module docstring); `where` names the source in errors."""
    for side, tok in (("teacher", teacher_tok), ("student", student_tok)):
        if not getattr(tok, "is_fast", False):
            raise DataError(f"{side}.path: a fast tokenizer (with character offsets) is needed to cut blocks, "
                            f"got {type(tok).__name__}")
    texts = []
    enc = teacher_tok(documents, add_special_tokens=False, return_offsets_mapping=True)
    for doc, offsets in zip(documents, enc["offset_mapping"]):
        texts += [doc[a:b] for a, b in block_spans(offsets, len(doc), max_length)]
    if not texts:
        raise DataError(f"{where}: no document is long enough for a block (2 teacher tokens or more)")
    teacher_ids = teacher_tok(texts, add_special_tokens=False)["input_ids"]
    student_ids = student_tok(texts, add_special_tokens=False)["input_ids"]
    truncated = {"teacher": sum(len(t) > max_length for t in teacher_ids),
                 "student": sum(len(s) > student_max_length for s in student_ids)}
    empty = next((i for i, s in enumerate(student_ids) if len(s) < 2), None)
    if empty is not None:
        raise DataError(f"{where}: block {empty} ({texts[empty][:40]!r}) is {len(student_ids[empty])} student "
                        "token(s): nothing to predict on the student side")
    table = pa.table({
        "id": pa.array(range(len(texts)), pa.int64()),
        "text": pa.array(texts, pa.string()),
        "text_bytes": pa.array([len(t.encode("utf-8")) for t in texts], pa.int64()),
        "t_input_ids": pa.array([t[:max_length] for t in teacher_ids], pa.list_(pa.int32())),
        "s_input_ids": pa.array([s[:student_max_length] for s in student_ids], pa.list_(pa.int32())),
    })
    return PairedBlocks(table, truncated)
