"""`sinkd tune CONFIG SPACE`: Ray Tune over distillation runs (the Ray Train V2 pattern for Tune).

The teacher is fine-tuned once (if needed) before any trial; each trial is then a function that
applies its sampled values to the job config and fits one TorchTrainer, whose per-epoch reports
reach Tune through TuneReportCallback so that ASHA can stop weak trials early. A failed trial does
not stop the others; rerunning the same command resumes an interrupted tuning run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import yaml

from ..config import Config, ConfigError, join_storage, set_key
from ..tasks import Prepared, Stage, checked_config, get_task
from ..train.fit import fit_stage, shipped_inputs
from ..train.worker import TERMS
from .job import plan_job, prepare_run_dir, prepare_teacher
from .session import ray_session
from .storage import Claim, check_claim, storage_key, storage_owner, write_claim
from .tune_space import SpaceError, TuneSpace

EXPERIMENT = "tune"


class TuneInterrupted(RuntimeError):
    """The tuning run stopped early (Ctrl-C, a lost driver); its state is saved for a resume."""


def check_space_against_config(cfg: Config, space: TuneSpace) -> None:
    """Every space key must be a valid config key for every value it can take: sample each
    distribution (and every choice) into the config and check it, naming the space key on error."""
    for key, dist in space.space.items():
        values = list(dist.args) if dist.kind in ("choice", "grid") else list(dist.args[:1])
        for value in values:
            trial = copy.deepcopy(cfg.written)
            try:
                set_key(trial, key, value)
                checked_config(trial)
            except ConfigError as exc:
                raise SpaceError(f"space.{key}: {value!r} is not valid for the job config ({exc})") from None


def check_space_metric(cfg: Config, space: TuneSpace, prepared: Prepared) -> None:
    """The space's metric must be one every epoch reports: a validation score of the job's task (CoLA's
    is matthews, not accuracy) or a training term. Otherwise Tune would only find out after the
    teacher's fine-tuning and the first trial's epoch."""
    reported = ([f"val_{name}" for name in get_task(cfg.task_type).validation_metrics(cfg, prepared)]
                + [f"train_{term}" for term in TERMS])
    if space.metric not in reported:
        raise SpaceError(f"metric: {space.metric!r} is not reported by this job's epochs"
                         f" (they report {', '.join(reported)})")


def fit_trial(params: dict, base: dict, prepared: Prepared, experiment: str = EXPERIMENT, teacher: str | None = None):
    """One Tune trial's training (shared by `sinkd tune` and `sinkd compare`): the base config (checked
    on the driver, paths resolved) with the trial's dotted-key values, run_dir set to the trial's
    directory, one TorchTrainer fit whose epoch reports reach Tune. Rebuilding the config reads no file.
    experiment: the Tune experiment's path below the storage root, where shared storage keeps the
    trial's Train run. teacher: the teacher's reference from trial_inputs (default prepared.teacher_dir).
    Returns (the trial's Config, the ray.train.Result)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    raw = copy.deepcopy(base)
    for key, value in params.items():
        set_key(raw, key, value)
    raw["run_dir"] = tune.get_context().get_trial_dir()
    cfg = Config.from_dict(raw)
    if cfg.ray.storage_path:  # shared storage: the trial's Train run beside its Tune results, <storage>/<experiment>/<trial>/<stage>
        cfg.ray.storage_path = join_storage(cfg.ray.storage_path, experiment, Path(raw["run_dir"]).name)
    stage = Stage(cfg.name, teacher or prepared.teacher_dir, dict(cfg.objective), cfg.train)
    return cfg, fit_stage(cfg, prepared, stage, show_progress=False, callbacks=[TuneReportCallback()])


def _trial(params: dict, base: dict, prepared: Prepared, teacher: str) -> None:
    """A `sinkd tune` trial: the sampled values, one fit (its epochs are the trial's results)."""
    fit_trial(params, base, prepared, teacher=teacher)


def trial_inputs(cfg: Config, teacher_dir: str) -> tuple[dict, str]:
    """The trials' base config and teacher with every model folder as a reference a trial on any node
    can read (uploaded once to an object-store ray.storage_path: a trial may run where the driver's
    disk is not), on the driver, after the teacher is prepared."""
    shipped, stage = shipped_inputs(cfg, Stage(cfg.name, teacher_dir, None, cfg.train))
    return shipped.to_dict(), stage.model_path


def experiment_storage(cfg: Config, experiment: str) -> tuple[str, str]:
    """(Tune's storage_path, the experiment's folder): ray.storage_path (URI or dir) or RUN_DIR."""
    storage = cfg.ray.storage_path or str(Path(cfg.run_dir).resolve())
    return storage, join_storage(storage, experiment)


def tune_claim(cfg: Config, space: TuneSpace) -> Claim:
    """The marker of a Tune experiment: a rerun of the same request resumes it, another is refused
    (Tuner.restore would resume the other request's trials). Where it runs (ray.*, run_dir) and how
    many trials at once are not what it computes; the rest of the job is, as for `sinkd compare`."""
    job = {k: v for k, v in cfg.to_dict().items() if k not in ("ray", "run_dir", "name", "baselines")}
    search = {k: v for k, v in dataclasses.asdict(space).items() if k not in ("trial_resources", "max_concurrent_trials")}
    return Claim("the Tune experiment", storage_owner(cfg), {"space": search, "job": job})


def run_tune(cfg: Config, space: TuneSpace) -> dict:
    """Prepare the teacher, run (or resume) the trials, write the table, best config and plots."""
    from ray import tune

    check_space_against_config(cfg, space)
    plan = plan_job(cfg)
    check_space_metric(cfg, space, plan.prepared)
    storage, path = experiment_storage(cfg, EXPERIMENT)
    claim = tune_claim(cfg, space)
    check_claim(path, claim, storage_key(cfg))
    prepare_run_dir(cfg)
    write_claim(path, claim, storage_key(cfg))
    out_dir = Path(cfg.run_dir).resolve()
    # A trial driver's CPU share (0.01 by default) would leave Ray Data less than the whole CPU its
    # tasks need beside the training workers, and the first epoch would wait forever on a local Ray.
    driver_cpus = math.ceil(space.trial_resources.get("cpu", 0) * space.max_concurrent_trials)
    with ray_session(cfg, extra_cpus=driver_cpus):
        prepare_teacher(plan)
        base, teacher = trial_inputs(cfg, plan.teacher_dir)
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, prepared=plan.prepared, teacher=teacher),
            {k.upper() if k in ("cpu", "gpu") else k: v for k, v in space.trial_resources.items()},
        )
        if tune.Tuner.can_restore(path):
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True,
                                       param_space=space.param_space())
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space.param_space(),
                tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                            max_concurrent_trials=space.max_concurrent_trials,
                                            scheduler=space.make_scheduler(), search_alg=space.make_search_alg()),
                run_config=tune.RunConfig(name=EXPERIMENT, storage_path=storage, verbose=0),
            )
        grid = tuner.fit()
    finished = grid.num_terminated + grid.num_errors
    if finished < space.num_trials():
        raise TuneInterrupted(f"tuning stopped after {finished} of {space.num_trials()} trials; "
                              f"rerun the same command to resume ({out_dir / EXPERIMENT})")
    return write_outputs(grid, cfg.written, space, out_dir)


def write_outputs(grid, raw: dict, space: TuneSpace, out_dir: Path) -> dict:
    """trials.json + a terminal table, best.yaml (ready for `sinkd train`), tune.png."""
    keys = list(space.space)
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        trials.append({
            "trial": Path(result.path).name if result.path else "?",
            "status": "ERROR" if result.error else "OK",
            "iterations": metrics.get("training_iteration", 0),
            space.metric: metrics.get(space.metric),
            "params": {k: result.config.get(k) for k in keys},
            "history": _history(result, space.metric),
            "error": str(result.error).splitlines()[0] if result.error else None,
        })
    scored = [t for t in trials if t[space.metric] is not None]
    if not scored:
        raise RuntimeError(f"no trial reported {space.metric!r}; see {out_dir / EXPERIMENT}")
    best = (max if space.mode == "max" else min)(scored, key=lambda t: t[space.metric])
    best_raw = copy.deepcopy(raw)
    for key, value in best["params"].items():
        set_key(best_raw, key, value)
    best_raw["run_dir"] = str(Path(raw.get("run_dir", "runs/sinkd")) / "best")
    header = f"# Best of {len(trials)} trials by {space.metric} ({space.mode}) = {best[space.metric]:.4f}: {best['trial']}\n"
    (out_dir / "best.yaml").write_text(header + yaml.safe_dump(best_raw, sort_keys=False))
    (out_dir / "trials.json").write_text(json.dumps(trials, indent=1, default=str))
    _plot(trials, space, out_dir / "tune.png")
    table = format_table(trials, space, best)
    (out_dir / "tune_summary.txt").write_text(table + "\n")
    return {"trials": trials, "best": best, "table": table, "best_config": str(out_dir / "best.yaml"),
            "plot": str(out_dir / "tune.png")}


def _history(result, metric: str) -> list:
    df = result.metrics_dataframe
    if df is None or metric not in df or "training_iteration" not in df:
        return []
    return [[int(i), float(v)] for i, v in zip(df["training_iteration"], df[metric]) if v == v]


def format_table(trials: list, space: TuneSpace, best: dict) -> str:
    short = {k: k.split(".")[-1] if k.count(".") < 2 else ".".join(k.split(".")[-2:]) for k in space.space}
    cols = ["trial", "status", "iters", space.metric] + list(short.values())
    rows = []
    for t in trials:
        value = t[space.metric]
        rows.append([short_name(t["trial"]) + (" *" if t is best else ""), t["status"], str(t["iterations"]),
                     "-" if value is None else f"{value:.4f}"] + [_fmt(t["params"][k]) for k in short])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows] + ["* best"])


def short_name(trial: str) -> str:
    """`_trial_e518c_00001_1_objective_..._2026-11-23_14-57-30` -> `e518c_00001`: Tune's trial id."""
    match = re.search(r"[0-9a-f]{5}_\d{5}", trial)
    return match.group(0) if match else trial[-28:]


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(trials: list, space: TuneSpace, path: Path) -> None:
    """Left: the metric against eps (or the first numeric parameter) coloured by beta; right: the
    metric over training iterations per trial, where ASHA's early stops show as short lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in space.space if all(isinstance(t["params"][k], (int, float)) for t in trials)]
    x_key = next((k for k in numeric if k.endswith("sinkhorn.eps")), numeric[0] if numeric else None)
    c_key = next((k for k in numeric if k.endswith(".beta") and k != x_key), None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    scored = [t for t in trials if t[space.metric] is not None]
    if x_key:
        xs = [t["params"][x_key] for t in scored]
        color = {"c": [t["params"][c_key] for t in scored], "cmap": "viridis"} if c_key else {}
        points = left.scatter(xs, [t[space.metric] for t in scored], **color)
        if x_key.endswith("eps"):
            left.set_xscale("log")
        if c_key:
            fig.colorbar(points, ax=left, label=c_key)
        left.set_xlabel(x_key)
    left.set_ylabel(space.metric)
    left.set_title(f"{space.metric} per trial")
    for t in trials:
        if t["history"]:
            its, vals = zip(*t["history"])
            right.plot(its, vals, marker="o", label=short_name(t["trial"]))
    right.set_xlabel("training iteration (epoch)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel(space.metric)
    right.set_title("trials over time")
    if len(trials) <= 12:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
