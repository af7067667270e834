"""The distillation job: teacher fine-tuning (if needed) -> one TorchTrainer run per student objective
-> export -> test-split scores of teacher and students -> results.json and a one-screen summary.

Everything that can be checked is checked before the run directory is touched. A rerun with the same
config resumes: finished stages are reused, an interrupted one restarts from its latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, TrainConfig, _build
from .data import Task, load_task
from .models import TASK_FILE, is_task_tuned, model_kind

TEACHER = "teacher"


@dataclasses.dataclass
class Plan:
    """What the job will do, decided on the driver before any work."""

    cfg: Config
    task: Task
    teacher_dir: str  # the teacher distillation uses (after fine-tuning if that is planned)
    finetune: bool
    students: dict  # name -> objective mapping


def plan_job(cfg: Config) -> Plan:
    """Load and check the data and decide the stages; raises ConfigError/DataError, writes nothing
    (a causal LM's GGUF teacher is dequantised once into lm.cache.dir/teachers: a cache, not the run)."""
    if cfg.task_type == "causal_lm":
        from .causal_lm import plan_parts

        task, teacher_dir = plan_parts(cfg)
        students = {cfg.name: dict(cfg.objective)}
        students.update({name: {**cfg.objective, **over} for name, over in cfg.baselines.items()})
        plan = Plan(cfg, task, teacher_dir, False, students)
        _check_fingerprints(plan)
        return plan
    task = load_task(cfg)
    if model_kind(cfg.teacher.path) == "seq2seq":
        from .data import load_tokenizer
        from .models import label_token_ids

        try:
            label_token_ids(load_tokenizer(cfg.teacher.path), cfg.data.label_words or task.label_names or [])
        except (ValueError, IndexError) as e:
            raise ConfigError(str(e) if str(e).startswith("data.") else f"data.label_words: {e}") from None
    mode = cfg.teacher.finetune
    finetune = mode == "always" or (mode == "auto" and not is_task_tuned(cfg.teacher.path, task.num_labels))
    teacher_dir = str(Path(cfg.run_dir) / "models" / TEACHER) if finetune else cfg.teacher.path
    students = {cfg.name: dict(cfg.objective)}
    students.update({name: {**cfg.objective, **over} for name, over in cfg.baselines.items()})
    plan = Plan(cfg, task, teacher_dir, finetune, students)
    _check_fingerprints(plan)
    return plan


def _stage_fingerprint(plan: Plan, name: str) -> dict:
    cfg = plan.cfg
    common = {"data": dataclasses.asdict(cfg.data), "seed": cfg.seed, "num_workers": cfg.scaling.num_workers}
    if cfg.task_type == "causal_lm":
        common["lm"] = dataclasses.asdict(cfg.lm)
    if name == TEACHER:
        return {**common, "model": cfg.teacher.path, "train": _teacher_train(cfg).__dict__}
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


def _teacher_train(cfg: Config) -> TrainConfig:
    return _build(TrainConfig, {**dataclasses.asdict(cfg.train), **cfg.teacher.train}, "teacher.train")


def prepare_run_dir(cfg: Config, raw: dict) -> None:
    """Create the run directory and record the config; an earlier, different config is kept aside."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(raw, sort_keys=False)
    target = run_dir / "config.yaml"
    if target.is_file() and target.read_text() != text:
        target.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    target.write_text(text)


def init_local_ray(**kwargs) -> None:
    """`ray.init(address="local")` with the new cluster's own address in RAY_ADDRESS for its processes.

    Code inside a Ray cluster that calls the state API without an address (Ray Train V2's
    PlacementGroupCleaner among it) finds its cluster by scanning the machine and fails when two Ray
    instances run there; the placement group of every Tune trial that ASHA stops then leaks, until the
    next trial's data tasks find no CPU and wait forever. The GCS port is chosen here, so the raylet
    and workers (started by ray.init, with this environment) know their cluster; the driver's own
    environment is restored afterwards.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    saved = {key: os.environ.get(key) for key in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        ray.init(address="local", **kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def eval_pool(cfg) -> dict:
    """Evaluation actors shaped like the training workers (one per worker, its CPUs each), so that
    each fits wherever a worker did; one asking for all the workers' CPUs might fit on no node."""
    return {"cpus": max(1.0, cfg.scaling.cpus_per_worker), "actors": cfg.scaling.num_workers}


@contextlib.contextmanager
def ray_session(cfg: Config, extra_cpus: int = 0):
    """Join the running Ray (tests, notebooks), a cluster (ray.address), or start a local one;
    extra_cpus: logical CPUs a local one gets on top (Tune's trial drivers, which only wait)."""
    import ray

    import logging

    import ray.data  # noqa: F401  (Ray Data sets its loggers' levels on import; ours come after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset execution plans: not for users
    if ray.is_initialized():
        yield
        return
    kwargs = {"address": cfg.ray.address, "log_to_driver": True}
    if cfg.ray.address is None and os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = os.environ["RAY_ADDRESS"]  # a `ray job submit` entrypoint: join its cluster
    if kwargs["address"] is None:
        # A fresh local instance, even when a `ray start` node runs on this machine (a plain
        # ray.init() would silently join the latest one).
        kwargs.pop("address")
        init_local_ray(num_cpus=(cfg.ray.num_cpus or (os.cpu_count() or 1) + 1) + extra_cpus,
                       object_store_memory=cfg.ray.object_store_memory_mb * 2**20 if cfg.ray.object_store_memory_mb else None,
                       **kwargs)
    else:
        ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _run_stage(plan: Plan, stage, show_progress: bool) -> dict:
    """Train and export one stage, or reuse it when an earlier run finished it with the same settings."""
    from .export import export_checkpoint
    from .train import fit_stage

    cfg = plan.cfg
    out = Path(cfg.run_dir) / "models" / stage.name
    info = {"path": str(out)}
    fp = _fingerprint_file(cfg, stage.name)
    if (out / TASK_FILE).is_file() and fp.is_file():
        return {**info, "reused": True}
    fp.parent.mkdir(parents=True, exist_ok=True)
    fp.write_text(json.dumps(_stage_fingerprint(plan, stage.name), indent=1))
    tick = time.time()
    result = fit_stage(cfg, plan.task, stage, show_progress=show_progress)
    export_checkpoint(result.checkpoint, out)  # through Ray's Checkpoint: remote storage too
    return {**info, "train_s": round(time.time() - tick, 1), "examples_per_s": result.metrics.get("train_examples_per_s"),
            "val": {k[4:]: v for k, v in result.metrics.items() if k.startswith("val_")}}


def prepare_teacher(plan: Plan, show_progress: bool = True) -> str:
    """The task-tuned teacher's directory: fine-tuned here (CE only) if the plan says so. Needs Ray."""
    from .train import Stage

    if plan.finetune:
        _run_stage(plan, Stage(TEACHER, plan.cfg.teacher.path, None, _teacher_train(plan.cfg)), show_progress)
    if plan.cfg.task_type == "causal_lm" and plan.cfg.lm.cache.enabled:  # once, before any trial
        from .logit_cache import ensure_cache

        ensure_cache(plan.cfg, plan.task, plan.teacher_dir)
    return plan.teacher_dir


def run_job(cfg: Config, raw: dict, show_progress: bool = True, plan: Plan | None = None) -> dict:
    """The whole job; returns the results written to run_dir/results.json."""
    from .evaluate import evaluate_model, metric_names
    from .train import Stage

    plan = plan or plan_job(cfg)
    prepare_run_dir(cfg, raw)
    run_dir, task = Path(cfg.run_dir), plan.task
    results = {"run_dir": str(run_dir), "data": task.sizes(), "num_labels": task.num_labels,
               "metrics": metric_names(task.task, task.num_labels), "notes": task.notes, "models": {}}
    if cfg.task_type == "causal_lm":
        from .causal_lm import METRICS

        results["metrics"] = METRICS
    started = time.time()
    with ray_session(cfg):
        models = results["models"]
        if plan.finetune:
            models[TEACHER] = _run_stage(plan, Stage(TEACHER, cfg.teacher.path, None, _teacher_train(cfg)), show_progress)
        else:
            models[TEACHER] = {"path": plan.teacher_dir, "given": True}
        for name, objective in plan.students.items():
            models[name] = _run_stage(plan, Stage(name, plan.teacher_dir, objective, cfg.train), show_progress)
        pool = eval_pool(cfg)
        for info in models.values():
            if cfg.task_type == "causal_lm":
                from .causal_lm import evaluate_lm

                info["test"] = evaluate_lm(info["path"], cfg, task, plan.teacher_dir, "test", **pool)
            else:
                info["test"] = evaluate_model(info["path"], task.splits["test"], results["metrics"], cfg.data.max_length,
                                              cfg.train.eval_batch_size, **pool)
            info["layers"], info["params"] = _size(info["path"])
    results["wall_s"] = round(time.time() - started, 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    (run_dir / "summary.txt").write_text(summary(results))
    return results


def _size(model_dir: str) -> tuple[int, int]:
    from safetensors import safe_open

    conf = json.loads((Path(model_dir) / "config.json").read_text())
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
             f"{results['num_labels']} labels"]
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
