"""Up-front checks of a causal-LM job (task_type: causal_lm) and its `lm:` section.

Decoder-only distillation reads a text corpus (packed fixed-length blocks) or prompt/response
records (loss on the response only), and may train from a teacher logit cache instead of a live
teacher. Everything here is checked before data or Ray: files and their formats, the teacher
(a Hugging Face directory or a GGUF file), the student, and that both share one tokenizer.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ...config import Config, ConfigError, data_file_paths, model_config, model_dir, resolve_path
from ..common import check_same_tokenizer, check_student_keys

PROMPT_FORMATS = ("prompt_response", "prompt_continuation")  # rows of a prompt and a response: loss on the response
LM_FORMATS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".bz2": "wiki_xml", ".xml": "wiki_xml"}


def lm_file_format(cfg: Config, path: Path) -> str | None:
    if cfg.lm.file_format:
        return cfg.lm.file_format
    return LM_FORMATS.get(path.suffix.lower())


def check_causal_lm(cfg: Config) -> None:
    """Data files and lm options (cheap: no data read, no model loaded)."""
    d, lm = cfg.data, cfg.lm
    if not d.files or "train" not in d.files or d.name or d.load_from_disk:
        raise ConfigError("data.files: task_type causal_lm reads files (txt, jsonl or a Wikipedia XML .bz2); set data.files.train")
    for split, path in data_file_paths(d.files).items():
        fmt = lm_file_format(cfg, path)
        if fmt is None:
            raise ConfigError(f"data.files.{split}: cannot tell the format of {path.name}; set lm.file_format (txt, jsonl, wiki_xml)")
        if lm.format == "prompt_response" and fmt != "jsonl":
            raise ConfigError(f"data.files.{split}: lm.format prompt_response needs jsonl records, got {fmt} ({path.name})")
    if cfg.teacher.cache_logits is True:
        raise ConfigError("teacher.cache_logits: classification only; a causal LM caches its teacher's top-k with lm.cache.enabled")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length: a causal-LM block needs >= 8 tokens, got {d.max_length}")
    if lm.max_documents is not None and lm.max_documents < 1:
        raise ConfigError(f"lm.max_documents: must be > 0, got {lm.max_documents}")
    for name in ("prompt_words", "response_words", "max_new_tokens"):
        value = getattr(lm, name)
        if value is not None and value < 1:
            raise ConfigError(f"lm.{name}: must be > 0, got {value}")
    if lm.min_document_chars < 1:
        raise ConfigError(f"lm.min_document_chars: must be > 0, got {lm.min_document_chars}")
    c = lm.cache
    for name in ("topk", "batch_size", "concurrency"):
        if getattr(c, name) < 1:
            raise ConfigError(f"lm.cache.{name}: must be > 0, got {getattr(c, name)}")
    if c.num_cpus < 0 or c.num_gpus < 0:
        raise ConfigError("lm.cache.num_cpus / lm.cache.num_gpus: must be >= 0")
    if c.num_gpus > 0 and not cfg.scaling.use_gpu:
        raise ConfigError("lm.cache.num_gpus: the teacher runs on GPUs only with scaling.use_gpu: true")
    if not c.dir:
        raise ConfigError("lm.cache.dir: must not be empty")
    if cfg.teacher.finetune == "always":
        raise ConfigError("teacher.finetune: a causal-LM teacher is used as given (use auto or never)")
    if cfg.baselines:
        for name, over in cfg.baselines.items():
            if "sinkhorn" in over and isinstance(over["sinkhorn"], dict) and over["sinkhorn"].get("mode") == "sample":
                raise ConfigError(f"baselines.{name}.sinkhorn.mode: 'sample' is O(V^2) per token; use 'batch' for language models")
    sink = (cfg.objective or {}).get("sinkhorn") or {}
    if isinstance(sink, dict) and sink.get("mode") == "sample":
        raise ConfigError("objective.sinkhorn.mode: 'sample' is O(V^2) per token; use 'batch' for language models")
    if c.enabled and isinstance(sink, dict) and sink.get("cost", "l1") != "l1":
        raise ConfigError(f"objective.sinkhorn.cost: the logit cache (lm.cache.enabled) needs cost 'l1', got {sink.get('cost')!r}")


# ----------------------------------------------------------------------------- teacher / student


def teacher_source(cfg: Config) -> tuple[Path, str | None]:
    """(directory, gguf file name or None): `teacher.path` may be a directory or a .gguf file."""
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: required")
    path = resolve_path(cfg.teacher.path, "teacher.path")
    gguf = cfg.teacher.gguf_file
    if path.suffix.lower() == ".gguf":
        if gguf and gguf != path.name:
            raise ConfigError(f"teacher.gguf_file: {gguf} contradicts teacher.path {path.name}")
        path, gguf = path.parent, path.name
    if gguf:
        if not (path / gguf).is_file():
            raise ConfigError(f"teacher.path: GGUF file not found: {path / gguf}")
        return path, gguf
    if not (path / "config.json").is_file():
        what = "directory not found" if not path.exists() else "no config.json in"
        raise ConfigError(f"teacher.path: {what} {path} (expected a Hugging Face model directory or a .gguf file)")
    return path, None


def _gguf_header(path: Path) -> tuple[int, int, int | None]:
    """(decoder layers, vocabulary size, context length) from GGUF metadata; read once per file version (Tune
    validates the config once per sampled value)."""
    stat = path.stat()
    return _gguf_header_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _gguf_header_cached(path: str, size: int, mtime: int) -> tuple[int, int, int | None]:
    from gguf import GGUFReader

    fields = GGUFReader(path).fields  # memory-mapped; no weights dequantised
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    context = fields.get(f"{arch}.context_length")  # optional metadata: None when a file lacks it
    return (int(fields[f"{arch}.block_count"].parts[-1][0]), len(fields["tokenizer.ggml.tokens"].data),
            int(context.parts[-1][0]) if context is not None else None)


def teacher_layer_count(directory: Path, gguf: str | None) -> int:
    return _gguf_header(directory / gguf)[0] if gguf else _config_int(directory, "num_hidden_layers")


def teacher_vocab_size(directory: Path, gguf: str | None) -> int:
    return _gguf_header(directory / gguf)[1] if gguf else _config_int(directory, "vocab_size")


def teacher_context_length(directory: Path, gguf: str | None) -> int | None:
    return _gguf_header(directory / gguf)[2] if gguf else model_config(directory).get("max_position_embeddings")


def _config_int(directory: Path, key: str) -> int:
    value = model_config(directory).get(key)
    if not isinstance(value, int):
        raise ConfigError(f"teacher.path: {directory / 'config.json'} has no integer {key} (got {value!r})")
    return value


def check_decoder_teacher(directory: Path, gguf: str | None) -> None:
    """A teacher directory must hold a decoder-only causal LM (a GGUF file always does)."""
    if gguf is None:
        conf = model_config(directory)
        if conf.get("is_encoder_decoder") or not any(a.endswith("ForCausalLM") for a in conf.get("architectures") or ["ForCausalLM"]):
            raise ConfigError(f"teacher.path: {directory} is not a decoder-only causal LM ({conf.get('architectures')})")


def check_teacher_layers(cfg: Config, directory: Path, gguf: str | None) -> None:
    """student.layers (init teacher_layers): distinct indices of the teacher's layers."""
    layers, chosen = teacher_layer_count(directory, gguf), cfg.student.layers
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= i < layers for i in chosen):
        raise ConfigError(f"student.layers: must be distinct indices of the teacher's {layers} layers, got {chosen}")


def check_lm_models(cfg: Config) -> None:
    """Teacher (HF directory or GGUF) and student: a causal LM each, one shared tokenizer."""
    if cfg.lm.cache.temperatures is not None:
        raise ConfigError("lm.cache.temperatures: task_type cross_tokenizer only (a causal_lm cache keeps the "
                          "temperature-1 log-probabilities); leave it out")
    directory, gguf = teacher_source(cfg)
    check_decoder_teacher(directory, gguf)
    s = cfg.student
    if s.init == "teacher_layers":
        check_teacher_layers(cfg, directory, gguf)
    elif s.init == "config":
        if "vocab_size" in s.config:
            t_vocab = teacher_vocab_size(directory, gguf)
            if s.config["vocab_size"] != t_vocab:
                raise ConfigError(f"student.config.vocab_size: {s.config['vocab_size']} differs from the teacher's {t_vocab}; "
                                  "teacher and student must share a tokenizer")
    elif s.init == "pretrained":
        student = model_dir(s.path, "student.path")
        s_conf = model_config(student)
        t_vocab = teacher_vocab_size(directory, gguf)
        if s_conf.get("vocab_size") != t_vocab:
            raise ConfigError(f"student.path: vocabulary size {s_conf.get('vocab_size')} differs from the teacher's {t_vocab}; "
                              "teacher and student must share a tokenizer")
        check_same_tokenizer(directory, student, teacher_gguf=gguf, require_student_tokenizer=True)
    check_student_keys(cfg)
    check_online_teacher(cfg, teacher_layer_count(directory, gguf))
    check_sgo(cfg, model_context(cfg, directory, gguf) if cfg.lm.sgo.mode else None)


def model_context(cfg: Config, directory: Path, gguf: str | None) -> int | None:
    """Positions both models hold: the smaller of those the teacher's and the student's configs
    state (None when neither does)."""
    s = cfg.student
    student = model_config(model_dir(s.path, "student.path")).get("max_position_embeddings") \
        if s.init == "pretrained" else s.config.get("max_position_embeddings")
    return min((c for c in (teacher_context_length(directory, gguf), student) if isinstance(c, int)), default=None)


def check_online_teacher(cfg: Config, teacher_layers: int) -> None:
    """teacher.online (OKD modules): a live teacher, a layer it has, sizes and weights that train."""
    o = cfg.teacher.online
    if o.kind is None:
        if o != type(o)():
            raise ConfigError("teacher.online: its settings are used only with teacher.online.kind: residual_adapter")
        return
    if cfg.lm.cache.enabled:
        raise ConfigError("teacher.online: the adapted teacher changes every step, so its logits cannot be cached; "
                          "set lm.cache.enabled: false")
    if o.layer is not None and not 0 <= o.layer < teacher_layers:
        raise ConfigError(f"teacher.online.layer: the teacher has {teacher_layers} layers (0-{teacher_layers - 1}), got {o.layer}")
    if o.rank < 1:
        raise ConfigError(f"teacher.online.rank: must be >= 1, got {o.rank}")
    if not o.lr > 0 or not o.temperature > 0:
        raise ConfigError(f"teacher.online.lr / temperature: must be > 0, got {o.lr} / {o.temperature}")
    if o.ce_weight < 0 or o.student_weight < 0 or o.ce_weight + o.student_weight == 0:
        raise ConfigError("teacher.online.ce_weight / student_weight: must be >= 0 and not both 0 (nothing would train the module)")


def check_sgo(cfg: Config, context: int | None) -> None:
    """lm.sgo (student-generated batches): prompts to continue, a live teacher to score them, a
    fraction, sampling settings and a length the models can hold."""
    g = cfg.lm.sgo
    if g.mode is None:
        if g != type(g)():
            raise ConfigError("lm.sgo: its settings are used only with lm.sgo.mode: mixed or replay")
        return
    if cfg.lm.format not in PROMPT_FORMATS:
        raise ConfigError("lm.sgo.mode: the student continues prompts; use lm.format prompt_continuation or prompt_response")
    if cfg.lm.cache.enabled:
        raise ConfigError("lm.sgo.mode: student-generated batches are scored by a live teacher; set lm.cache.enabled: false")
    if not 0 <= g.fraction <= 1:
        raise ConfigError(f"lm.sgo.fraction: must be in [0, 1], got {g.fraction}")
    if g.replay_capacity < 1:
        raise ConfigError(f"lm.sgo.replay_capacity: must be > 0, got {g.replay_capacity}")
    if g.max_new_tokens < 1:
        raise ConfigError(f"lm.sgo.max_new_tokens: must be > 0, got {g.max_new_tokens}")
    if context is not None and cfg.data.max_length + g.max_new_tokens > context:
        raise ConfigError(f"lm.sgo.max_new_tokens: prompts of up to data.max_length={cfg.data.max_length} tokens + "
                          f"{g.max_new_tokens} new tokens exceed the model context of {context} tokens")
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError(f"lm.sgo.temperature / top_p / top_k: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; "
                          f"got {g.temperature} / {g.top_p} / {g.top_k}")
