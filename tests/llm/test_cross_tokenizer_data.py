"""Paired blocks for cross-tokenizer distillation with two real tokenizers (SmolLM2's byte-level BPE,
49,152 tokens, as the teacher; MiniLM's uncased WordPiece, 30,522, as the student) on real wiki text:
the blocks partition each document's text, both sides tokenise exactly each block's string, lengths
and truncations are as counted independently; the pair checks refuse what cannot work. No Ray."""

from __future__ import annotations

import pytest
from llm_helpers import MINILM

from pipelines.config import ConfigError
from pipelines.tasks.common import DataError
from pipelines.tasks.cross_tokenizer.checks import check_tokenizer_pair
from pipelines.tasks.cross_tokenizer.data import block_spans, paired_blocks


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer), AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def documents(wiki_path) -> list[str]:
    from pipelines.tasks.causal_lm.data import wiki_pages  # the reader the LM task uses

    return list(wiki_pages(wiki_path, 6, 400))


def test_blocks_partition_each_document_and_both_sides_tokenise_exactly_the_block(tokenizers, documents):
    teacher, student = tokenizers
    blocks = paired_blocks(documents, teacher, student, max_length=32, student_max_length=24)
    rows = blocks.table.to_pylist()
    assert [r["id"] for r in rows] == list(range(len(rows)))
    # The blocks, joined, are each document from its first token on (the short tail aside).
    joined, at = "".join(r["text"] for r in rows), 0
    for doc in documents:
        offsets = teacher(doc, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        start, n = offsets[0][0], len(offsets)
        end = len(doc) if n % 32 == 0 or n % 32 >= 2 else offsets[n - n % 32][0]
        assert joined[at:at + end - start] == doc[start:end]
        at += end - start
    assert at == len(joined)
    for r in rows:
        assert r["text_bytes"] == len(r["text"].encode("utf-8"))
        # Each side: its start token (SmolLM2's BOS <|im_start|> = 1, MiniLM's [CLS] = 101), then the block.
        for side, tok, start, cap in (("t", teacher, 1, 32), ("s", student, 101, 24)):
            enc = tok(r["text"], add_special_tokens=False, return_offsets_mapping=True)
            assert r[f"{side}_input_ids"] == [start] + enc["input_ids"][:cap]
            # Bytes the kept tokens cover: the whole text, or up to the end of the last token kept.
            covered = r["text"] if len(enc["input_ids"]) <= cap else r["text"][:enc["offset_mapping"][cap - 1][1]]
            assert r[f"{side}_bytes"] == len(covered.encode("utf-8"))
    assert any(r["s_bytes"] < r["text_bytes"] for r in rows)  # some student rows were cut (24 WordPiece tokens)
    # Blocks are cut every 32 teacher tokens of the document; a substring re-tokenises to about that.
    lengths = [len(r["t_input_ids"]) - 1 for r in rows]
    assert sum(n == 32 for n in lengths) >= 0.8 * len(rows)
    long_t = sum(len(teacher(r["text"], add_special_tokens=False)["input_ids"]) > 32 for r in rows)
    long_s = sum(len(student(r["text"], add_special_tokens=False)["input_ids"]) > 24 for r in rows)
    assert blocks.truncated == {"teacher": long_t, "student": long_s}
    assert {len(r["s_input_ids"]) for r in rows} != {len(r["t_input_ids"]) for r in rows}  # two real tokenizations


def test_block_spans_cut_every_max_length_tokens_and_drop_a_one_token_tail():
    offsets = [(0, 3), (4, 6), (6, 9), (10, 12), (13, 15)]
    assert block_spans(offsets, 15, 2) == [(0, 6), (6, 13)]  # the fifth token alone: nothing to predict
    assert block_spans(offsets, 17, 3) == [(0, 10), (10, 17)]  # a 2-token tail is kept, to the text's end
    assert block_spans(offsets, 15, 5) == [(0, 15)] and block_spans([], 0, 4) == []


def test_slow_tokenizers_and_texts_without_blocks_are_refused(tokenizers):
    class PythonTokenizer:  # transformers 5 loads every shipped tokenizer here fast; a python-backend one has no offsets
        is_fast = False

    teacher, student = tokenizers
    slow = PythonTokenizer()
    with pytest.raises(DataError, match=r"^student.tokenizer: a fast tokenizer \(with character offsets\) is needed to cut blocks, got PythonTokenizer$"):
        paired_blocks(["some text here"], teacher, slow, 8, 8)
    with pytest.raises(DataError, match=r"^data.files.train: no document is long enough for a block"):
        paired_blocks(["a"], teacher, student, 8, 8, where="data.files.train")


def test_the_pair_checks_name_the_key(tokenizers):
    teacher, student = tokenizers
    check_tokenizer_pair(teacher, student, 49152, None)  # BPE teacher, WordPiece student: fine
    with pytest.raises(ConfigError, match=r"^student.tokenizer: its tokenizer is the teacher's \(49,152 tokens\); use task_type: causal_lm"):
        check_tokenizer_pair(teacher, teacher)
    with pytest.raises(ConfigError, match=r"^student.path: its tokenizer has 30,522 tokens but the model's embedding has 30,000 rows"):
        check_tokenizer_pair(teacher, student, None, 30000, student_key="student.path")
    with pytest.raises(ConfigError, match=r"^teacher.path: its tokenizer has 49,152 tokens but the model's embedding has 100 rows"):
        check_tokenizer_pair(teacher, student, 100, None)
