"""Task loading: every source, every bad row named by file and row, splits, padding, collation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from pipelines.tasks import checked_config
from pipeline_helpers import tiny_job

from pipelines.tasks.classification.data import PadCollate, load_task, tokenize_batch, with_teacher_logits
from pipelines.tasks.common import PAD_ID, DataError, batches_per_shard, padded_rows, tokenizer_identity


def _cfg(tmp_path, tiny_bert, files, **data):
    raw = tiny_job(tmp_path / "run", tiny_bert, files)
    raw["data"].update({"max_train_examples": None, "max_eval_examples": None, "task": None, **data})
    return checked_config(raw)


def _tsv(path, rows, header="sentence\tlabel"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def _error(cfg) -> str:
    with pytest.raises(DataError) as info:
        load_task(cfg)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


GOOD = [f"a fine sentence number {i}\t{i % 2}" for i in range(20)]


@pytest.mark.parametrize("bad_row, expected", [
    ("a sentence with no label\t", "row 6 (line 7): missing label in column 'label'"),
    ("a sentence with a wild label\t7", "row 6 (line 7): unknown label '7' (expected an integer in 0..1)"),
    ("a sentence with a word label\tpositive", "row 6 (line 7): unknown label 'positive'"),
    ("   \t1", "row 6 (line 7): empty text in column 'sentence'"),
])
def test_bad_tsv_row_is_named(tmp_path, tiny_bert, bad_row, expected):
    rows = GOOD[:5] + [bad_row] + GOOD[5:]
    train = _tsv(tmp_path / "train.tsv", rows)
    msg = _error(_cfg(tmp_path, tiny_bert, {"train": train}, num_labels=2))
    assert msg.startswith(train) and expected in msg


def test_wrong_column_is_named(tmp_path, tiny_bert):
    train = _tsv(tmp_path / "train.tsv", GOOD)
    msg = _error(_cfg(tmp_path, tiny_bert, {"train": train}, text_columns=["sentense"]))
    assert msg == f"data.text_columns: column 'sentense' not found in {train} (columns: sentence, label)"
    msg = _error(_cfg(tmp_path, tiny_bert, {"train": train}, label_column="sentiment"))
    assert msg.startswith("data.label_column: column 'sentiment' not found in")


def test_ragged_csv_row_is_named(tmp_path, tiny_bert):
    path = tmp_path / "train.csv"
    path.write_text("text,label\nfine,0\nalso fine,1\ntoo,many,fields\n")
    msg = _error(_cfg(tmp_path, tiny_bert, {"train": str(path)}, text_columns=["text"]))
    assert msg.startswith(f"data.files.train: cannot read {path} as csv") and "line 4" in msg


def test_bad_label_in_test_split_is_named(tmp_path, tiny_bert):
    train = _tsv(tmp_path / "train.tsv", GOOD)
    test = _tsv(tmp_path / "test.tsv", GOOD[:3] + ["unseen class\t2"])
    msg = _error(_cfg(tmp_path, tiny_bert, {"train": train, "test": test}))
    assert msg.startswith(test) and "row 4 (line 5): unknown label '2' (expected an integer in 0..1)" in msg


def test_csv_with_label_names_and_encoding(tmp_path, tiny_bert):
    path = tmp_path / "tweets.csv"
    rows = ["sentiment,text", *[f"{['negative', 'neutral', 'positive'][i % 3]},caf\xe9 tweet {i}" for i in range(30)]]
    path.write_bytes("\n".join(rows).encode("latin-1"))
    cfg = _cfg(tmp_path, tiny_bert, {"train": str(path)}, text_columns=["text"], label_column="sentiment",
               label_names=["negative", "neutral", "positive"], encoding="latin-1")
    task = load_task(cfg)
    assert task.num_labels == 3 and task.label_names == ["negative", "neutral", "positive"]
    all_rows = {r["id"]: r for split in task.splits.values() for r in split.to_pylist()}
    assert sorted(all_rows) == list(range(30))  # carved splits: disjoint, nothing lost
    assert all(all_rows[i]["label"] == i % 3 and all_rows[i]["text_a"] == f"caf\xe9 tweet {i}" for i in all_rows)
    path.write_bytes("\n".join(rows[:4] + ["neutrall,typo label"] + rows[4:]).encode("latin-1"))
    assert "row 4 (line 5): unknown label 'neutrall' (expected one of negative, neutral, positive)" in _error(cfg)


def test_jsonl_and_parquet_rows_are_named(tmp_path, tiny_bert):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"sentence": f"s {i}", "label": i % 2}) for i in range(10)]
    lines[3] = json.dumps({"sentence": "no label here", "label": None})
    path.write_text("\n".join(lines) + "\n")
    assert "train.jsonl line 4: missing label" in _error(_cfg(tmp_path, tiny_bert, {"train": str(path)}))

    pq = tmp_path / "train.parquet"
    import pyarrow.parquet as pq_mod

    pq_mod.write_table(pa.table({"sentence": ["ok", "", "ok too", "fine"], "label": [0, 1, 0, 1]}), pq)
    assert "train.parquet row 2: empty text in column 'sentence'" in _error(_cfg(tmp_path, tiny_bert, {"train": str(pq)}))


def test_sentence_pairs_from_disk_dataset(tmp_path, tiny_bert):
    import datasets

    features = datasets.Features({"s1": datasets.Value("string"), "s2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["no", "yes"])})
    rows = {"s1": [f"first {i}" for i in range(12)], "s2": [f"second {i}" for i in range(12)], "label": [i % 2 for i in range(12)]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features),
                               "validation": datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features)})
    dd.save_to_disk(str(tmp_path / "pairs"))
    raw = tiny_job(tmp_path / "run", tiny_bert, {})
    raw["data"] = {"load_from_disk": str(tmp_path / "pairs"), "text_columns": ["s1", "s2"], "label_column": "label"}
    task = load_task(checked_config(raw))
    assert task.pair and task.label_names == ["no", "yes"]
    assert set(task.splits) == {"train", "validation", "test"}  # test falls back to validation
    out = tokenize_batch(task.splits["train"].slice(0, 2), str(tiny_bert), 32)
    types = out.column("token_type_ids").to_pylist()
    assert 0 in types[0] and 1 in types[0]  # the second sentence is marked as segment B


def test_hub_code_path_with_hidden_test_labels(tmp_path, tiny_bert, monkeypatch):
    """data.name/config go to datasets.load_dataset; GLUE-style hidden test labels (-1) fall back to validation."""
    import datasets

    calls = []
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config))
        make = lambda n, lab: datasets.Dataset.from_dict(  # noqa: E731
            {"sentence": [f"s{i}" for i in range(n)], "label": [lab(i) for i in range(n)]},
            features=datasets.Features({"sentence": datasets.Value("string"), "label": datasets.Value("int64")})
            if lab(0) == -1 else features)
        return datasets.DatasetDict({"train": make(20, lambda i: i % 2), "validation": make(6, lambda i: i % 2),
                                     "test": make(5, lambda i: -1)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = tiny_job(tmp_path / "run", tiny_bert, {})
    raw["data"] = {"name": "glue", "config": "sst2", "task": "sst2"}
    task = load_task(checked_config(raw))
    assert calls == [("glue", "sst2")]
    assert task.label_names == ["negative", "positive"] and task.sizes() == {"train": 20, "validation": 6, "test": 6}
    assert any("labels withheld" in n for n in task.notes)


def test_real_sst2_copy_loads(tmp_path, tiny_bert, sst2_small):
    task = load_task(_cfg(tmp_path, tiny_bert, sst2_small))
    assert task.num_labels == 2 and task.sizes()["test"] == 120
    assert task.sizes()["train"] + task.sizes()["validation"] == 400


def test_padding_and_collate():
    assert [padded_rows(n, 2) for n in (4, 5)] == [0, 1] and padded_rows(7, 4) == 1
    assert batches_per_shard(104, 2, 8) == 7
    table = pa.table({"id": [3, PAD_ID], "label": [1, 0],
                      "input_ids": pa.array([[101, 7, 8, 102], [101, 102]], pa.list_(pa.int32())),
                      "token_type_ids": pa.array([[0, 0, 1, 1], [0, 0]], pa.list_(pa.int8()))})
    out = PadCollate(pad_token_id=0)(table)
    assert out["input_ids"].tolist() == [[101, 7, 8, 102], [101, 102, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0]]
    assert out["ids"].tolist() == [3, PAD_ID] and out["labels"].tolist() == [1, 0]
    np.testing.assert_array_equal(PadCollate(0)(table.slice(1))["input_ids"].numpy(), [[101, 102]])


def test_label_sorted_file_is_shuffled_once_for_training(tmp_path, tiny_bert):
    """Files sorted by label would give one-class batches and one-class worker shards."""
    rows = [f"negative sentence {i}\t0" for i in range(50)] + [f"positive sentence {i}\t1" for i in range(50)]
    task = load_task(_cfg(tmp_path, tiny_bert, {"train": _tsv(tmp_path / "train.tsv", rows)}))
    labels = task.splits["train"]["label"].to_pylist()
    assert 0 in labels[:10] and 1 in labels[:10]
    half = len(labels) // 2
    assert 0.25 < sum(labels[:half]) / half < 0.75  # each worker's half of an equal split mixes the classes
    assert load_task(_cfg(tmp_path, tiny_bert, {"train": str(tmp_path / "train.tsv")})).splits["train"].equals(task.splits["train"])


def test_notes_and_summary_give_the_rows_actually_used(tmp_path, tiny_bert):
    """Carved splits capped by data.max_eval_examples: the note and the data summary say how many rows
    were used out of how many carved, and a class that looks like a typo is flagged."""
    from pipelines.tasks.classification.summary import summarize

    rows = [f"sentence {i}\t{i % 2}" for i in range(199)] + ["odd one\t5"]
    cfg = _cfg(tmp_path, tiny_bert, {"train": _tsv(tmp_path / "train.tsv", rows)}, max_eval_examples=7)
    task = load_task(cfg)
    assert task.sizes()["validation"] == task.sizes()["test"] == 7
    assert task.notes == ["validation 7 of 20 and test 7 of 20 rows carved out of train (seed 0)"]
    summary = summarize(task, str(tiny_bert), cfg.data.max_length)
    assert summary["splits"]["validation"] | {"labels": None, "tokens": None, "truncated": None} == {
        "rows": 7, "available": 20, "source": "carved out of train.tsv (seed 0)", "labels": None, "tokens": None,
        "truncated": None, "max_length": 32}
    train = summary["splits"]["train"]
    assert sum(train["labels"].values()) == task.sizes()["train"] and train["labels"]["2"] == 0
    assert any("class 5 has 1 row(s)" in w for w in summary["warnings"]), summary["warnings"]
    assert any(w.startswith("train: no row of class 2, 3, 4") for w in summary["warnings"]), summary["warnings"]


def test_tokenised_once_per_tokenizer_and_padded_to_the_worker_count(tmp_path, tiny_bert, sst2_small):
    """The teacher, its fine-tuned copy and the students share one tokenizer: a split is tokenised once
    whatever directory it is asked for from; to_ray pads with copies of the first row marked PAD_ID."""
    import shutil

    from pipelines.tasks.common import load_tokenizer

    load_tokenizer(str(tiny_bert))("a used tokenizer", truncation=True, max_length=8)  # its truncation is set
    tokenizer_identity.cache_clear()
    task = load_task(_cfg(tmp_path, tiny_bert, sst2_small))
    first = task.tokenized("validation", str(tiny_bert), 32)
    copy_dir = tmp_path / "teacher_copy"
    shutil.copytree(tiny_bert, copy_dir)
    assert task.tokenized("validation", str(copy_dir), 32) is first  # same tokenizer digest: no second pass
    assert tokenizer_identity(str(copy_dir)) == tokenizer_identity(str(tiny_bert))
    assert task.tokenized("validation", str(tiny_bert), 16) is not first  # another length is another table
    assert first["id"].to_pylist() == task.splits["validation"]["id"].to_pylist()
    assert first.equals(tokenize_batch(task.splits["validation"], str(tiny_bert), 32))


def test_teacher_logits_join_by_id_and_reach_the_batch():
    tokens = pa.table({"id": [5, 2, 9], "label": [0, 1, 1],
                       "input_ids": pa.array([[101, 7, 102], [101, 102], [101, 8, 9, 102]], pa.list_(pa.int32()))})
    ids, logits = np.array([9, 5, 2]), np.array([[0.9, -0.9], [0.5, -0.5], [0.2, -0.2]])  # another order
    joined = with_teacher_logits(tokens, ids, logits)
    out = PadCollate(0)(joined)
    np.testing.assert_allclose(out["teacher_logits"].numpy(), [[0.5, -0.5], [0.2, -0.2], [0.9, -0.9]], rtol=1e-6)
    assert str(out["teacher_logits"].dtype) == "torch.float32"
    with pytest.raises(ValueError, match="teacher logits missing for 1 row id"):
        with_teacher_logits(tokens, ids[:2], logits[:2])
