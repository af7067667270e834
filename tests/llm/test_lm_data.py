"""Causal-LM data on hand-made inputs: packing, response-only labels, readers, row errors, collate."""

from __future__ import annotations

import bz2
import json

import numpy as np
import pyarrow as pa
import pytest

from llm_helpers import byte_level_bytes

from pipelines.tasks import checked_config
from pipelines.tasks.common import DataError
from pipelines.tasks.causal_lm.data import IGNORE, LMCollate, pack_blocks, pad_table, prompt_response_row


def test_pack_blocks_joins_documents_with_eos_and_drops_the_partial_tail():
    blocks = pack_blocks([[5, 6, 7], [8], [9, 10, 11, 12]], block=4, eos_id=2)
    # stream: 5 6 7 2 | 8 2 9 10 | 11 12 2  (tail of 3 dropped)
    assert blocks.tolist() == [[5, 6, 7, 2], [8, 2, 9, 10]]
    assert pack_blocks([[1, 1]], block=4, eos_id=2).shape == (0, 4)


def test_prompt_response_labels_cover_the_response_and_eos_only():
    ids, labels = prompt_response_row([10, 11, 12], [20, 21], eos_id=2, max_length=16, where="x")
    assert ids == [10, 11, 12, 20, 21, 2]
    assert labels == [IGNORE, IGNORE, IGNORE, 20, 21, 2]
    ids, labels = prompt_response_row([10, 11], [20, 21, 22, 23], eos_id=2, max_length=4, where="x")
    assert ids == [10, 11, 20, 21] and labels == [IGNORE, IGNORE, 20, 21]  # the response is cut, the prompt never
    with pytest.raises(DataError, match=r"^f.jsonl line 3: the prompt has 3 tokens, no room for a response within data.max_length=4$"):
        prompt_response_row([1, 2, 3], [4], eos_id=2, max_length=4, where="f.jsonl line 3")


def test_collate_pads_rows_and_shapes_the_cached_teacher():
    table = pa.table({"id": pa.array([0, 1], pa.int64()),
                      "input_ids": pa.array([[5, 6, 7], [8, 9]], pa.list_(pa.int32())),
                      "labels": pa.array([[IGNORE, 6, 7], [8, 9]], pa.list_(pa.int32())),
                      "k": pa.array([2, 2], pa.int32()),
                      "t_logp": pa.array([np.log([0.5, 0.25, 0.6, 0.3]), np.log([0.9, 0.05])], pa.list_(pa.float32())),
                      "t_ids": pa.array([[3, 4, 1, 0], [7, 8]], pa.list_(pa.int32())),
                      "t_rest": pa.array([[0.25, 0.1], [0.05]], pa.list_(pa.float32()))})
    out = LMCollate(pad_token_id=2)(table)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 9, 2]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[IGNORE, 6, 7], [8, 9, IGNORE]]
    assert out["t_ids"].tolist() == [[[3, 4], [1, 0]], [[7, 8], [0, 0]]]
    np.testing.assert_allclose(out["t_probs"].numpy(), [[[0.5, 0.25], [0.6, 0.3]], [[0.9, 0.05], [0, 0]]], rtol=1e-6)
    np.testing.assert_allclose(out["t_rest"].numpy(), [[0.25, 0.1], [0.05, 0]], rtol=1e-6)


def test_padding_rows_carry_no_labels():
    table = pa.table({"id": pa.array([0, 1, 2], pa.int64()), "input_ids": pa.array([[5, 6]] * 3, pa.list_(pa.int32())),
                      "labels": pa.array([[5, 6]] * 3, pa.list_(pa.int32()))})
    padded = pad_table(table, 2)
    assert padded.num_rows == 4 and padded.slice(3).to_pylist() == [{"id": -1, "input_ids": [0, 0], "labels": [IGNORE, IGNORE]}]
    assert pad_table(table, 3).num_rows == 3


def lm_raw(tmp_path, files, **lm):
    return {"task_type": "causal_lm", "run_dir": str(tmp_path / "run"),
            "data": {"files": {k: str(v) for k, v in files.items()}, "max_length": 8},
            "lm": {"cache": {"dir": str(tmp_path / "cache")}, **lm},
            "student": {"init": "config", "config": {"num_hidden_layers": 1}}}


def test_prompt_response_task_from_jsonl_masks_prompts(tmp_path, tiny_llama):
    from pipelines.tasks.common import load_tokenizer
    from pipelines.tasks.causal_lm.data import load_lm_task

    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(12)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = lm_raw(tmp_path, {"train": path}, format="prompt_response")
    raw["data"]["max_length"] = 32
    raw["teacher"] = {"path": str(tiny_llama)}
    cfg = checked_config(raw)
    tok = load_tokenizer(str(tiny_llama))
    task = load_lm_task(cfg, tok)
    assert sum(task.sizes().values()) == 12
    for row in task.splits["train"].to_pylist():
        labelled = [t for t, y in zip(row["input_ids"], row["labels"]) if y != IGNORE]
        assert tok.decode(labelled).startswith("It is ") and labelled[-1] == tok.eos_token_id
        prompt = row["input_ids"][:row["labels"].index(labelled[0])]
        assert tok.decode(prompt).startswith("Question ")


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a"}', "line 2: no column 'response' (columns: prompt)"),
    ('{"prompt": "a", "response": ""}', "line 2: column 'response' must be a non-empty string"),
    ('not json', "line 2: invalid JSON"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, tiny_llama, line, message):
    from pipelines.tasks.common import load_tokenizer
    from pipelines.tasks.causal_lm.data import load_lm_task

    path = tmp_path / "qa.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n' + line + "\n")
    raw = lm_raw(tmp_path, {"train": path}, format="prompt_response")
    raw["teacher"] = {"path": str(tiny_llama)}
    with pytest.raises(DataError) as err:
        load_lm_task(checked_config(raw), load_tokenizer(str(tiny_llama)))
    assert str(err.value).startswith(str(path)) and message in str(err.value) and "\n" not in str(err.value)


def test_readers_txt_jsonl_and_wiki_xml(tmp_path, tiny_llama, wiki_path):
    from pipelines.tasks.causal_lm.data import read_split

    txt = tmp_path / "corpus.txt"
    txt.write_text("First paragraph\nstill first.\n\n\nSecond one.\n  \nThird.\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"body": "doc one"}\n\n{"body": "doc two"}\n')
    xml = tmp_path / "dump.xml.bz2"
    xml.write_bytes(bz2.compress(b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>A</title><ns>0</ns><revision><text>'''Alpha''' is [[Greek alphabet|a letter]].</text></revision></page>
<page><title>B</title><ns>0</ns><redirect title="A"/><revision><text>#REDIRECT [[A]]</text></revision></page>
<page><title>Talk:A</title><ns>1</ns><revision><text>chat</text></revision></page>
</mediawiki>"""))
    for files, lm, expected in (({"train": txt}, {}, ["First paragraph\nstill first.", "Second one.", "Third."]),
                                ({"train": jsonl}, {"text_column": "body"}, ["doc one", "doc two"]),
                                ({"train": xml}, {}, ["Alpha is a letter."])):
        raw = lm_raw(tmp_path, files, **lm)
        raw["teacher"] = {"path": str(tiny_llama)}
        assert read_split(checked_config(raw), "train") == expected
    raw = lm_raw(tmp_path, {"train": wiki_path}, max_documents=3)
    raw["teacher"] = {"path": str(tiny_llama)}
    docs = read_split(checked_config(raw), "train")
    assert len(docs) == 3 and docs[0].startswith("Anarchism is a political philosophy") and "'''" not in docs[0]


def test_packed_wiki_task_carves_whole_documents(tmp_path, tiny_llama, wiki_path):
    from pipelines.tasks.common import load_tokenizer
    from pipelines.tasks.causal_lm.data import load_lm_task

    raw = lm_raw(tmp_path, {"train": wiki_path}, max_documents=10)
    raw["teacher"] = {"path": str(tiny_llama)}
    raw["data"].update(max_length=64, max_train_examples=40, validation_fraction=0.2, test_fraction=0.1)
    task = load_lm_task(checked_config(raw), load_tokenizer(str(tiny_llama)))
    assert task.sizes()["train"] == 40 and task.notes == ["validation (2) and test (1) documents carved out of train (seed 0)"]
    for split, table in task.splits.items():
        ids = np.array(table.column("input_ids").to_pylist())
        assert ids.shape[1] == 64 and (np.array(table.column("labels").to_pylist()) == ids).all()
        assert table.column("id").to_pylist() == list(range(table.num_rows))
    train = {tuple(r) for r in task.splits["train"].column("input_ids").to_pylist()}
    assert not train & {tuple(r) for r in task.splits["test"].column("input_ids").to_pylist()}
    # Bits per byte's denominators of the evaluation splits, counted here on the driver (a trial on
    # another node has no tokenizer to count them with); train's on first use.
    from pipelines.tasks.causal_lm.data import label_bytes

    tok = load_tokenizer(str(tiny_llama))
    assert task.text_bytes == {s: int(label_bytes(tok, task.splits[s]).sum()) for s in ("validation", "test")}
    assert task.split_bytes("train", str(tiny_llama)) == int(label_bytes(tok, task.splits["train"]).sum()) > 0
    assert task.split_bytes("test", "/no/tokenizer/needed") == task.text_bytes["test"]


def test_label_bytes_count_the_utf8_of_the_predicted_text(tiny_llama):
    """Bits per byte divides by these: the predicted tokens' text (positions 1.., labels not -100), in
    UTF-8 bytes, multi-byte characters split across tokens included; EOS spells no bytes."""
    from pipelines.tasks.causal_lm.data import label_bytes
    from pipelines.tasks.common import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    text = "The café's crème brûlée — 東京 ✓ costs 5€."
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first = len(tok.decode(ids[:1]).encode("utf-8"))  # "The": never predicted
    prompt, response = tok("Q: où?", add_special_tokens=False)["input_ids"], tok(" Ça va.", add_special_tokens=False)["input_ids"]
    table = pa.table({"input_ids": pa.array([ids, prompt + response], pa.list_(pa.int32())),
                      "labels": pa.array([ids, [IGNORE] * len(prompt) + response], pa.list_(pa.int32()))})
    got = label_bytes(tok, table).tolist()
    assert got == [len(text.encode("utf-8")) - first, len(" Ça va.".encode("utf-8"))]
    assert got == [byte_level_bytes(tok, ids[1:]), byte_level_bytes(tok, response)]
    assert got[0] > len(tok.decode(ids[1:], skip_special_tokens=True))  # bytes, not characters
