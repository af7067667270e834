"""Up-front checks of a classification job: its data source and label settings, teacher and student."""

from __future__ import annotations

from ...config import Config, ConfigError, DataConfig, data_file_paths, model_config, model_dir, resolve_path
from ..common import check_no_online_teacher, check_same_tokenizer, check_student_keys
from .data import FILE_FORMATS, file_format


def check_classification(cfg: Config) -> None:
    """Cheap: the data source and labels, the models' configs and tokenizers (no data read)."""
    check_labels(cfg.data)
    check_data_source(cfg.data)
    check_models(cfg)


def check_labels(d: DataConfig) -> None:
    if not d.text_columns or len(d.text_columns) > 2:
        raise ConfigError(f"data.text_columns: one column, or two for sentence pairs; got {d.text_columns}")
    if d.label_names is not None:
        if len(d.label_names) < 2 or len(set(d.label_names)) != len(d.label_names):
            raise ConfigError(f"data.label_names: needs two or more distinct names, got {d.label_names}")
        if d.num_labels is not None and d.num_labels != len(d.label_names):
            raise ConfigError(f"data.num_labels: {d.num_labels} but data.label_names has {len(d.label_names)}")
    if d.num_labels is not None and d.num_labels < 2:
        raise ConfigError(f"data.num_labels: distillation needs >= 2 classes, got {d.num_labels} "
                          "(regression tasks such as stsb are evaluated but not distilled)")
    if d.label_words is not None and d.label_names is not None and len(d.label_words) != len(d.label_names):
        raise ConfigError("data.label_words: needs one word per entry of data.label_names")


def check_data_source(d: DataConfig) -> None:
    given = [k for k in ("name", "load_from_disk", "files") if getattr(d, k)]
    if len(given) != 1:
        raise ConfigError("data: set exactly one of data.name (hub), data.load_from_disk or data.files"
                          + (f"; got {', '.join(given)}" if given else ""))
    if d.config and not d.name:
        raise ConfigError("data.config: only valid together with data.name")
    if d.load_from_disk:
        path = resolve_path(d.load_from_disk, "data.load_from_disk")
        if not path.is_dir():
            raise ConfigError(f"data.load_from_disk: directory not found: {path}")
    if d.files:
        if "train" not in d.files:
            raise ConfigError("data.files: needs a 'train' file")
        for split, path in data_file_paths(d.files).items():
            fmt = file_format(d, path)
            if fmt not in FILE_FORMATS:
                raise ConfigError(f"data.files.{split}: cannot tell the format of {path.name}; set data.format")


def check_models(cfg: Config) -> None:
    teacher = model_dir(cfg.teacher.path, "teacher.path")
    t_conf = model_config(teacher)
    t_layers = t_conf.get("num_hidden_layers", t_conf.get("num_layers"))
    s = cfg.student
    if s.init == "teacher_layers":
        if not s.layers:
            raise ConfigError("student.layers: required with student.init: teacher_layers (e.g. [0, 2, 4])")
        if not isinstance(t_layers, int):
            raise ConfigError(f"teacher.path: {teacher / 'config.json'} gives no num_hidden_layers (or num_layers) to pick student.layers from")
        bad = [i for i in s.layers if not 0 <= i < t_layers]
        if bad or len(set(s.layers)) != len(s.layers):
            raise ConfigError(f"student.layers: must be distinct indices of the teacher's {t_layers} layers, got {s.layers}")
    elif s.init == "pretrained":
        student = model_dir(s.path, "student.path")
        s_conf = model_config(student)
        if s_conf.get("vocab_size") != t_conf.get("vocab_size"):
            raise ConfigError(f"student.path: vocabulary size {s_conf.get('vocab_size')} differs from the "
                              f"teacher's {t_conf.get('vocab_size')} ({teacher}); they must share a tokenizer")
        check_same_tokenizer(teacher, student)
    elif s.init == "config":
        vocab = s.config.get("vocab_size", t_conf.get("vocab_size"))
        if vocab != t_conf.get("vocab_size"):
            raise ConfigError(f"student.config.vocab_size: {vocab} differs from the teacher's {t_conf.get('vocab_size')}; "
                              "they must share a tokenizer")
    check_student_keys(cfg, fine_tunes_teacher=True)
    check_no_online_teacher(cfg)

