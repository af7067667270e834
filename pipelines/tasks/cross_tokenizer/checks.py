"""Config checks of a cross-tokenizer pair, before Ray starts: two different tokenizers, each with
character offsets, each no larger than its own model's embedding."""

from __future__ import annotations

from pathlib import Path

from ...config import ConfigError, model_config
from ..common import load_tokenizer, tokenizer_identity


def check_tokenizer_pair(teacher: str | Path, student: str | Path) -> None:
    """One-line ConfigErrors naming teacher.path / student.path."""
    for key, path in (("teacher.path", teacher), ("student.path", student)):
        tok = load_tokenizer(str(path))
        if not tok.is_fast:
            raise ConfigError(f"{key}: {path} has no fast tokenizer (tokenizer.json): cross-tokenizer blocks "
                              "are cut by character offsets")
        rows = model_config(path).get("vocab_size")
        if rows is not None and len(tok) > rows:
            raise ConfigError(f"{key}: its tokenizer has {len(tok):,} tokens but the model's embedding has {rows:,} "
                              "rows (config.json vocab_size): ids past the embedding cannot be looked up")
    if tokenizer_identity(str(teacher)) == tokenizer_identity(str(student)):
        raise ConfigError(f"student.path: its tokenizer is the teacher's ({len(load_tokenizer(str(student))):,} tokens); "
                          "use task_type: causal_lm, which distils token by token")
