"""The distillation job: teacher fine-tuning (if needed) -> one TorchTrainer run per student objective
-> export -> test-split scores of teacher and students -> results.json and a one-screen summary.

Everything that can be checked is checked before the run directory is touched. A rerun with the same
config resumes: finished stages are reused, an interrupted one restarts from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import yaml

from ..config import Config, ConfigError, model_config, stage_model_dir, teacher_train_config
from ..tasks import Prepared, Stage, get_task
from ..tasks.common import TASK_FILE
from ..tasks.protocol import TEACHER_STAGE as TEACHER
from ..train.fit import fit_stage
from .export import export_checkpoint
from .session import eval_pool, ray_session


@dataclasses.dataclass
class Plan:
    """What the job will do, decided on the driver before any work."""

    cfg: Config
    prepared: Prepared  # the task's checked data, the teacher to distil from, the fine-tuning decision
    students: dict  # name -> objective mapping

    @property
    def finetune(self) -> bool:
        return self.prepared.finetune

    @property
    def teacher_dir(self) -> str:
        return self.prepared.teacher_dir


def plan_job(cfg: Config) -> Plan:
    """Load and check the data and decide the stages; raises ConfigError/DataError, writes nothing
    to the run directory (a causal LM's GGUF teacher is dequantised once into lm.cache.dir: a cache)."""
    prepared = get_task(cfg.task_type).prepare(cfg)
    students = {cfg.name: dict(cfg.objective)}
    students.update({name: {**cfg.objective, **over} for name, over in cfg.baselines.items()})
    plan = Plan(cfg, prepared, students)
    _check_fingerprints(plan)
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


def _check_fingerprints(plan: Plan) -> None:
    """A run_dir holding a stage trained with other settings is refused, never silently mixed or lost."""
    names = ([TEACHER] if plan.finetune else []) + list(plan.students)
    for name in names:
        path = _fingerprint_file(plan.cfg, name)
        if not path.is_file():
            continue
        old, new = json.loads(path.read_text()), json.loads(json.dumps(_stage_fingerprint(plan, name)))
        if old != new:
            changed = _diff(old, new)
            raise ConfigError(f"run_dir: stage '{name}' in {plan.cfg.run_dir} was trained with other settings "
                              f"({', '.join(changed[:4])} changed); use a new run_dir")


def _diff(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix or "value"]


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


def _run_stage(plan: Plan, stage, show_progress: bool) -> dict:
    """Train and export one stage, or reuse it when an earlier run finished it with the same settings."""
    cfg = plan.cfg
    out = stage_model_dir(cfg, stage.name)
    info = {"path": str(out)}
    fp = _fingerprint_file(cfg, stage.name)
    if (out / TASK_FILE).is_file() and fp.is_file():
        return {**info, "reused": True}
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.write_text(json.dumps(_stage_fingerprint(plan, stage.name), indent=1))
    tick = time.time()
    result = fit_stage(cfg, plan.prepared, stage, show_progress=show_progress)
    export_checkpoint(result.checkpoint, out)  # through Ray's Checkpoint: remote storage too
    metrics = result.metrics
    return {**info, "train_s": round(time.time() - tick, 1), "examples_per_s": metrics.get("train_examples_per_s"),
            "val": {k[4:]: v for k, v in metrics.items() if k.startswith("val_")},
            **{k: metrics[k] for k in ("teacher_params", "teacher_params_on_rank") if k in metrics}}


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
    run_dir, prepared, task = Path(cfg.run_dir), plan.prepared, get_task(cfg.task_type)
    results = {"run_dir": str(run_dir), "data": prepared.data.sizes(), "description": prepared.description,
               "metrics": prepared.metrics, "notes": prepared.notes, "models": {}}
    started = time.time()
    with ray_session(cfg):
        models = results["models"]
        if plan.finetune:
            models[TEACHER] = _run_stage(plan, teacher_stage(cfg), show_progress)
        else:
            models[TEACHER] = {"path": plan.teacher_dir, "given": True}
        task.before_students(cfg, prepared)
        for name, objective in plan.students.items():
            models[name] = _run_stage(plan, Stage(name, plan.teacher_dir, objective, cfg.train), show_progress)
        pool = eval_pool(cfg)
        for info in models.values():
            info["test"] = task.evaluate(info["path"], cfg, prepared, "test", **pool)
            info["layers"], info["params"] = _size(info["path"])
    results["wall_s"] = round(time.time() - started, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "summary.txt").write_text(summary(results))
    return results


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
    header = f"{'model':<10} {'layers':>6} {'params':>8}  " + "  ".join(f"{'test ' + m:>14}" for m in metrics) + \
             f"  {'train s':>8} {'ex/s':>7}"
    lines += ["", header, "-" * len(header)]
    for name, info in results["models"].items():
        scores = "  ".join(f"{info.get('test', {}).get(m, float('nan')):>14.4f}" for m in metrics)
        train_s = "reused" if info.get("reused") else "given" if info.get("given") else f"{info.get('train_s', 0):.0f}"
        eps = info.get("examples_per_s")
        lines.append(f"{name:<10} {info.get('layers') or '?':>6} {info.get('params', 0) / 1e6:>7.1f}M  {scores}"
                     f"  {train_s:>8} {'-' if eps is None else round(eps):>7}")
    lines += ["", f"wall time: {results.get('wall_s', 0):.0f} s",
              f"models: {Path(results['run_dir']) / 'models'}",
              f"TensorBoard: tensorboard --logdir {Path(results['run_dir']) / 'tb'}"]
    lines += [f"note: {n}" for n in results.get("notes", [])]
    return "\n".join(lines) + "\n"
