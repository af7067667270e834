"""The distillation job: teacher fine-tuning (if needed) -> one TorchTrainer run per student objective
-> export -> test-split scores of teacher and students -> results.json and a one-screen summary.

Everything that can be checked is checked before the run directory is touched. A rerun with the same
config resumes: finished stages are reused, an interrupted one restarts from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import yaml

from ..config import (Config, ConfigError, join_storage, model_config, stage_model_dir, storage_root,
                      teacher_train_config)
from ..tasks import Prepared, Stage, get_task
from ..tasks.common import TASK_FILE, eval_pool
from ..tasks.protocol import TEACHER_STAGE as TEACHER
from ..train.fit import fit_stage
from .export import export_checkpoint
from .report import model_row, write_report
from .session import ray_session
from .storage import Claim, check_claim, diff_keys, probe_storage, storage_key, storage_owner, write_claim


@dataclasses.dataclass
class Plan:
    """What the job will do, decided on the driver before any work."""

    cfg: Config
    prepared: Prepared  # the task's checked data, the teacher to distil from, the fine-tuning decision
    students: dict  # name -> objective mapping
    data_summary: dict  # Task.summarize: rows, sources, balance, lengths, warnings

    def describe(self) -> list[str]:
        """The plan in a few lines: stages, data, workers, then the data summary."""
        cfg, s, t = self.cfg, self.cfg.scaling, self.cfg.train
        stages = ([f"teacher fine-tuning ({teacher_train_config(cfg).epochs} epoch(s))"] if self.finetune else []) \
            + [f"{', '.join(self.students)} ({t.epochs} epoch(s) each)"]
        sizes = self.prepared.data.sizes()
        workers = f"{s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU" + (f" + {s.gpus_per_worker:g} GPU" if s.use_gpu else "")
        lines = [f"plan: {'; '.join(stages)}",
                 f"data: {sizes.get('train', 0):,} train / {sizes.get('validation', 0):,} validation / "
                 f"{sizes.get('test', 0):,} test rows, {self.prepared.description}",
                 f"run: {workers}, ZeRO-{t.zero_stage}, {t.precision}; run directory {cfg.run_dir}",
                 *self.data_summary["lines"]]
        return lines + [f"warning: {w}" for w in self.data_summary["warnings"]]

    @property
    def finetune(self) -> bool:
        return self.prepared.finetune

    @property
    def teacher_dir(self) -> str:
        return self.prepared.teacher_dir


def plan_job(cfg: Config) -> Plan:
    """Load and check the data and decide the stages; raises ConfigError/DataError, writes nothing
    to the run directory (a causal LM's GGUF teacher is dequantised once into lm.cache.dir: a cache)."""
    task = get_task(cfg.task_type)
    prepared = task.prepare(cfg)
    plan = Plan(cfg, prepared, cfg.student_objectives(), task.summarize(cfg, prepared))
    _check_fingerprints(plan)
    check_storage(plan)
    return plan


def _stage_fingerprint(plan: Plan, name: str) -> dict:
    cfg = plan.cfg
    common = {"data": dataclasses.asdict(cfg.data), "seed": cfg.seed, "num_workers": cfg.scaling.num_workers,
              **get_task(cfg.task_type).fingerprint(cfg)}
    if name == TEACHER:
        return {**common, "model": cfg.teacher.path, "train": teacher_train_config(cfg).__dict__}
    return {**common, "teacher": plan.teacher_dir, "student": dataclasses.asdict(cfg.student),
            "objective": plan.students[name], "train": dataclasses.asdict(cfg.train)}


def _fingerprint_file(cfg: Config, name: str) -> Path:
    return Path(cfg.run_dir) / "stages" / f"{name}.json"


def _stage_names(plan: Plan) -> list[str]:
    return ([TEACHER] if plan.finetune else []) + list(plan.students)


def _check_fingerprints(plan: Plan) -> None:
    """A run_dir holding a stage trained with other settings is refused, never silently mixed or lost."""
    for name in _stage_names(plan):
        path = _fingerprint_file(plan.cfg, name)
        if not path.is_file():
            continue
        old, new = json.loads(path.read_text()), json.loads(json.dumps(_stage_fingerprint(plan, name)))
        if old != new:
            changed = diff_keys(old, new)
            raise ConfigError(f"run_dir: stage '{name}' in {plan.cfg.run_dir} was trained with other settings "
                              f"({', '.join(changed[:4])} changed); use a new run_dir")


def stage_storage(cfg: Config, name: str) -> str:
    """Where Ray Train persists a stage: <ray.storage_path or RUN_DIR/ray>/<stage>."""
    return join_storage(storage_root(cfg), name)


def stage_claim(plan: Plan, name: str) -> Claim:
    """The marker a stage's storage folder carries: this run_dir and the stage's fingerprint."""
    return Claim(f"stage '{name}'", storage_owner(plan.cfg), _stage_fingerprint(plan, name))


def check_storage(plan: Plan) -> None:
    """ray.storage_path can be written, and no stage this job will train would resume another run's
    checkpoints there (Ray resumes whatever it finds under <storage>/<stage>)."""
    cfg = plan.cfg
    if cfg.ray.storage_path:
        probe_storage(cfg.ray.storage_path)
    for name in _stage_names(plan):
        if not _stage_done(cfg, name):  # a stage reused from run_dir never reads the storage
            check_claim(stage_storage(cfg, name), stage_claim(plan, name), storage_key(cfg))


def prepare_run_dir(cfg: Config) -> None:
    """Create the run directory and record the config as written (pkg:// paths kept); an earlier,
    different config is kept aside."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.written, sort_keys=False)
    target = run_dir / "config.yaml"
    if target.is_file() and target.read_text() != text:
        target.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    target.write_text(text)


def _stage_done(cfg: Config, name: str) -> bool:
    """An earlier run trained and exported this stage with the same settings (the fingerprints of
    stages already on disk were compared in plan_job)."""
    return (stage_model_dir(cfg, name) / TASK_FILE).is_file() and _fingerprint_file(cfg, name).is_file()


def _run_stage(plan: Plan, stage, show_progress: bool) -> dict:
    """Train and export one stage, or reuse it when an earlier run finished it with the same settings."""
    cfg = plan.cfg
    out = stage_model_dir(cfg, stage.name)
    info = {"path": str(out)}
    fp = _fingerprint_file(cfg, stage.name)
    if _stage_done(cfg, stage.name):
        return {**info, "reused": True}
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.write_text(json.dumps(_stage_fingerprint(plan, stage.name), indent=1))
    write_claim(stage_storage(cfg, stage.name), stage_claim(plan, stage.name), storage_key(cfg))
    tick = time.time()
    result = fit_stage(cfg, plan.prepared, stage, show_progress=show_progress)
    export_checkpoint(result.checkpoint, out)  # through Ray's Checkpoint: remote storage too
    metrics = result.metrics
    return {**info, "train_s": round(time.time() - tick, 1), "examples_per_s": metrics.get("train_examples_per_s"),
            "val": {k[4:]: v for k, v in metrics.items() if k.startswith("val_")},
            **{k: metrics[k] for k in ("teacher_params", "teacher_params_on_rank") if k in metrics},
            "startup_s": {k[8:-2]: v for k, v in metrics.items() if k.startswith("startup_")}}


def teacher_stage(cfg: Config) -> Stage:
    """The teacher's CE fine-tuning on the task (train settings with teacher.train's overrides)."""
    return Stage(TEACHER, cfg.teacher.path, None, teacher_train_config(cfg))


def prepare_teacher(plan: Plan, show_progress: bool = True) -> str:
    """The teacher students distil from: fine-tuned here if the plan says so, and the task's shared
    work done once (e.g. a logit cache) before any student stage or Tune trial. Needs Ray."""
    if plan.finetune:
        _run_stage(plan, teacher_stage(plan.cfg), show_progress)
    get_task(plan.cfg.task_type).before_students(plan.cfg, plan.prepared)
    return plan.teacher_dir


def run_job(cfg: Config, show_progress: bool = True, plan: Plan | None = None) -> dict:
    """The whole job; returns the results written to run_dir/results.json."""
    plan = plan or plan_job(cfg)
    prepare_run_dir(cfg)
    (Path(cfg.run_dir) / "data_summary.json").write_text(json.dumps(
        {k: v for k, v in plan.data_summary.items() if k != "lines"}, indent=1))
    run_dir, prepared, task = Path(cfg.run_dir), plan.prepared, get_task(cfg.task_type)
    results = {"run_dir": str(run_dir), "data": prepared.data.sizes(), "description": prepared.description,
               "metrics": prepared.metrics, "notes": prepared.notes, "models": {}}
    started = time.time()
    stages = ([TEACHER] if plan.finetune else []) + list(plan.students)
    paths = {TEACHER: plan.teacher_dir, **{name: str(stage_model_dir(cfg, name)) for name in stages}}
    scores = {name: _stored_score(cfg, prepared, name, path) for name, path in paths.items()}
    nothing_to_do = all(_stage_done(cfg, name) for name in stages) and all(v is not None for v in scores.values())
    with contextlib.nullcontext() if nothing_to_do else ray_session(cfg):  # a finished job reruns in seconds
        models = results["models"]
        if plan.finetune:
            models[TEACHER] = _run_stage(plan, teacher_stage(cfg), show_progress)
        else:
            models[TEACHER] = {"path": plan.teacher_dir, "given": True}
        if not nothing_to_do:
            task.before_students(cfg, prepared)
        for name, objective in plan.students.items():
            models[name] = _run_stage(plan, Stage(name, plan.teacher_dir, objective, cfg.train), show_progress)
        pool = eval_pool(cfg)
        for name, info in models.items():
            if scores[name] is None or not info.get("reused", info.get("given")):
                scores[name] = task.evaluate(info["path"], cfg, prepared, "test", **pool)
                _store_score(cfg, prepared, name, info["path"], scores[name])
            info["test"] = scores[name]
            info["layers"], info["params"] = _size(info["path"])
    results["wall_s"] = round(time.time() - started, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "summary.txt").write_text(summary(results))
    write_report(run_dir)
    return results


def _score_key(cfg: Config, prepared: Prepared, model_dir: str) -> str:
    """What a model's test scores depend on: its files, the test rows, the metrics, the length cap."""
    import pyarrow as pa

    lm = {k: v for k, v in dataclasses.asdict(cfg.lm).items() if k != "sgo"}  # how students train, not how models score
    h = hashlib.sha256(json.dumps([prepared.metrics, cfg.data.max_length, cfg.train.eval_batch_size,
                                   prepared.teacher_dir, lm]).encode())
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            stat = f.stat()
            h.update(f"{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, prepared.data.splits["test"].schema) as writer:
        writer.write_table(prepared.data.splits["test"])
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def _score_file(cfg: Config, name: str) -> Path:
    return Path(cfg.run_dir) / "scores" / f"{name}.json"


def _stored_score(cfg: Config, prepared: Prepared, name: str, model_dir: str) -> dict | None:
    """The test scores an earlier run stored for this model, if the model and the test rows are unchanged."""
    path = _score_file(cfg, name)
    if not path.is_file() or not (Path(model_dir) / "config.json").is_file():
        return None
    stored = json.loads(path.read_text())
    return stored["test"] if stored.get("key") == _score_key(cfg, prepared, model_dir) else None


def _store_score(cfg: Config, prepared: Prepared, name: str, model_dir: str, scores: dict) -> None:
    path = _score_file(cfg, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": _score_key(cfg, prepared, model_dir), "test": scores}, indent=1))


def _size(model_dir: str) -> tuple[int, int]:
    from safetensors import safe_open

    conf = model_config(model_dir)
    layers = conf.get("num_hidden_layers", conf.get("num_layers"))
    params = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            params += sum(_numel(sf.get_slice(k).get_shape()) for k in sf.keys())
    return layers, params


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def summary(results: dict) -> str:
    """The one-screen table: every model's test scores, size and training time."""
    metrics = results["metrics"]
    data = results["data"]
    lines = [f"sinkd run: {results['run_dir']}",
             f"data: {data.get('train', 0)} train / {data.get('validation', 0)} validation / {data.get('test', 0)} test rows, "
             f"{results['description']}"]
    name_w = max([10, *map(len, results["models"])])  # columns as wide as their longest entry
    widths = [max(14, len(f"test {m}")) for m in metrics]
    header = f"{'model':<{name_w}} {'layers':>6} {'params':>8}  " + \
        "  ".join(f"{'test ' + m:>{w}}" for m, w in zip(metrics, widths)) + f"  {'train s':>8} {'ex/s':>7}"
    lines += ["", header, "-" * len(header)]
    for name, info in results["models"].items():
        row = model_row(info, metrics)
        scores = "  ".join(f"{v:>{w}.4f}" for v, w in zip(row["scores"], widths))
        lines.append(f"{name:<{name_w}} {row['layers']:>6} {row['params_m']:>7.1f}M  {scores}"
                     f"  {row['train_s']:>8} {row['examples_per_s']:>7}")
    lines += ["", *best_student_lines(results),
              "", f"wall time: {results.get('wall_s', 0):.0f} s",
              f"models: {Path(results['run_dir']) / 'models'}",
              f"report: {Path(results['run_dir']) / 'report.md'} (with report.png)",
              f"logs: {Path(results['run_dir']) / 'logs'}",
              f"TensorBoard: tensorboard --logdir {Path(results['run_dir']) / 'tb'}"]
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines) + "\n"


LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")  # the language-model scores; the rest: higher is better


def best_student_lines(results: dict) -> list[str]:
    """Which student scored best on the headline metric, by how much (margins: how much better, so
    positive for the best), where the teacher stands, and what one seed can say about it."""
    metric = results["metrics"][0]
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    students = {name: info["test"][metric] for name, info in results["models"].items()
                if name != TEACHER and info.get("test", {}).get(metric) is not None}
    if not students:
        return []
    ranked = sorted(students.items(), key=lambda kv: sign * kv[1], reverse=True)
    (best, score), others = ranked[0], ranked[1:]
    direction = ", lower is better" if sign < 0 else ""
    lines = [f"best student: {best} (test {metric} {score:.4f}{direction}"
             + "".join(f"; {sign * (score - s):+.4f} over {name}" for name, s in others) + ")"]
    teacher = results["models"].get(TEACHER, {}).get("test", {}).get(metric)
    if teacher is not None:
        lines.append(f"teacher: test {metric} {teacher:.4f} ({sign * (teacher - score):+.4f} over the best student)")
    if others:
        lines.append(f"1 seed: whether these differences are beyond seed noise is not tested; "
                     f"`sinkd compare {Path(results['run_dir']) / 'config.yaml'} --seeds 3` tests them")
    return lines
