"""What the data looks like before any training: rows and origin per split, label balance, token
lengths against data.max_length, and warnings (a class missing from a split, a class so rare in train
that it looks like a typo)."""

from __future__ import annotations

import numpy as np

from ..common import load_tokenizer
from .data import ClassificationData

LENGTH_SAMPLE = 10_000  # rows per split whose token lengths are measured


def summarize(data: ClassificationData, tokenizer_path: str, max_length: int) -> dict:
    tok = load_tokenizer(tokenizer_path)
    names = data.label_names or [str(i) for i in range(data.num_labels)]
    splits, warnings = {}, []
    for split, table in data.splits.items():
        counts = np.bincount(table["label"].to_numpy(), minlength=data.num_labels)
        sample = table.slice(0, LENGTH_SAMPLE)
        text_b = sample["text_b"].to_pylist() if "text_b" in sample.column_names else None
        lengths = np.array([len(ids) for ids in tok(sample["text_a"].to_pylist(), text_b)["input_ids"]])
        splits[split] = {
            "rows": table.num_rows, "available": data.available.get(split, table.num_rows),
            "source": data.sources.get(split), "labels": dict(zip(names, counts.tolist())),
            "tokens": {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)} | {"max": int(lengths.max())},
            "truncated": float((lengths > max_length).mean()), "max_length": max_length,
        }
        missing = [names[i] for i, c in enumerate(counts) if c == 0]
        if missing:
            warnings.append(f"{split}: no row of class {', '.join(missing)}")
    train = splits["train"]["labels"]
    typical = train and max(train.values())
    for name, count in train.items():
        if 0 < count <= max(1, typical // 100):  # e.g. one row labelled 7 among thousands of 0s and 1s
            warnings.append(f"train: class {name} has {count} row(s) against {typical} for the largest class; a typo?")
    return {"splits": splits, "warnings": warnings, "lines": _lines(splits)}


def _lines(splits: dict) -> list[str]:
    out = []
    for split, s in sorted(splits.items(), key=lambda kv: ("train", "validation", "test").index(kv[0])):
        rows = f"{s['rows']:,}" + (f" of {s['available']:,}" if s["available"] > s["rows"] else "")
        balance = " / ".join(f"{k} {v / max(s['rows'], 1):.0%}" for k, v in s["labels"].items())
        t = s["tokens"]
        out.append(f"  {split:<10} {rows:>14} rows  {balance}  tokens p50 {t['p50']} p90 {t['p90']} p99 {t['p99']}"
                   f" ({s['truncated']:.1%} > {s['max_length']})  from {s['source']}")
    return out
