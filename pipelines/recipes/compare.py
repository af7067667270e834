"""`sinkd compare CONFIG`: objectives x seeds as Ray Tune trials on one teacher, scored on the test split.

One seed and one split cannot tell two objectives apart; a comparison over seeds can. Every trial
fits one student stage (the Tune trial of recipes/tune.py) from the same fine-tuned teacher (its
logits computed once when the task caches them), exports it and scores it on the test split. The
driver then writes RUN_DIR/compare/: compare.json (every trial), compare.md (mean, std, min, max per
objective and metric, and the paired difference to KD over seeds with a t interval and a paired
t-test) and compare.png. Rerunning the same command resumes an interrupted comparison; a finished
one is rebuilt from compare.json without Ray.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune import Callback

from ..config import Config, ConfigError, join_storage, stage_model_dir
from ..tasks import Prepared, get_task
from ..tasks.common import eval_pool
from .export import export_checkpoint
from .job import plan_job, prepare_run_dir, prepare_teacher
from .session import ray_session
from .storage import Claim, check_claim, storage_key, storage_owner, write_claim
from .tune import TuneInterrupted, experiment_storage, fit_trial, trial_inputs

FOLDER = "compare"  # RUN_DIR/compare: the outputs, with Tune's experiment in compare/trials
EXPERIMENT = f"{FOLDER}/trials"
REFERENCES = ("kd", "ce")  # the paired differences are taken against the first of these compared (cross jobs have no kd)
DIVERGENCE_OBJECTIVES = {"kd": "kl", "rkl": "rkl", "js": "js", "tvd": "tvd", "skew_kl": "skew_kl"}
CONFIDENCE = 0.95


# ----------------------------------------------------------------------------- objectives


def paper_objective(alpha: float = 0.9, beta: float = 0.8, temperature: float = 2.0) -> dict:
    """The official code's loss (github 2018cx/SinKD, loss.py + glue_train.py; SST-2 script: alpha 0.9,
    beta 0.8, T 2) in this objective's terms: (1 - alpha) CE + alpha * CE(p_t, p_s at T) + beta *
    0.001 * sum(P * C), C the L1 cost of p = softmax(z / 2), P from 20 plain row/column normalisations
    of exp(-C / 0.1), autograd through them. Its "KL" is a cross-entropy without T^2: the gradient of
    (alpha / T^2) * T^2 KL is the same (the two differ by the teacher's entropy, a constant)."""
    from sinkd import ObjectiveConfig, SinkhornConfig

    sinkhorn = SinkhornConfig.paper(grad="unrolled")  # its T=2 is hard-coded in the reference's Sinkhorn
    return ObjectiveConfig.paper(alpha=round(alpha / temperature**2, 12), beta=round(beta * 0.001, 12),
                                 ce_weight=round(1.0 - alpha, 12),
                                 temperature=temperature, divergence="kl", reduction="batchmean",
                                 sinkhorn=sinkhorn).to_dict()


def builtin_objectives(cfg: Config) -> dict:
    """name -> objective mapping of the objectives every job can compare. The divergences keep the
    job's CE weight, temperature and KD weight (1 when the job has none) and drop the Sinkhorn term."""
    base = dict(cfg.objective)
    kd_weight = base.get("alpha") or 1.0
    out = {"ce": {**base, "ce_weight": 1.0, "alpha": 0.0, "beta": 0.0}}
    for name, div in DIVERGENCE_OBJECTIVES.items():
        out[name] = {**base, "alpha": kd_weight, "beta": 0.0, "divergence": div}
    out["sinkd"] = base
    out["sinkd_paper"] = paper_objective()
    return out


def available_objectives(cfg: Config) -> dict:
    """The built-ins the job's task can train (a student with another vocabulary takes no token-level
    KL: task_type cross_tokenizer keeps `sinkd`, the job's own objective) and the job's baselines
    (merged over its objective, as the job trains them); a baseline named like a built-in replaces
    it: the job's own definition is what its user means."""
    task = get_task(cfg.task_type)
    out = {}
    for name, objective in builtin_objectives(cfg).items():
        try:
            task.objective(objective)
        except ConfigError:
            continue
        out[name] = objective
    out.update({name: {**cfg.objective, **over} for name, over in cfg.baselines.items()})
    return out


def default_names(cfg: Config) -> list[str]:
    """ce, kd, the job's objective and its baselines (those the task can train)."""
    known = available_objectives(cfg)
    return [n for n in dict.fromkeys(["ce", "kd", "sinkd", *cfg.baselines]) if n in known]


def resolve_objectives(cfg: Config, names: list[str] | None) -> dict:
    """The requested objectives (default: default_names), each checked; one-line ConfigErrors."""
    known = available_objectives(cfg)
    names = list(dict.fromkeys(names or default_names(cfg)))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--objectives: unknown objective {unknown[0]!r}; valid: {', '.join(known)}")
    chosen = {name: known[name] for name in names}
    task = get_task(cfg.task_type)
    for name, objective in chosen.items():
        task.objective(objective, prefix=f"--objectives {name}: objective")
    return chosen


def seed_list(cfg: Config, seeds: int) -> list[int]:
    """N seeds counted from the job's: the data and the teacher stay, the students' training varies."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds: must be an integer >= 1, got {seeds!r}")
    return [cfg.seed + i for i in range(seeds)]


# ----------------------------------------------------------------------------- statistics


def describe(values: list[float]) -> dict:
    """n, mean, sample std (ddof 1; None below 2 values), min, max (None without values)."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else None,
            "min": float(x.min()), "max": float(x.max())}


def paired_difference(values: list[float], reference: list[float], confidence: float = CONFIDENCE) -> dict:
    """values - reference paired by seed: mean difference, its t interval (n - 1 degrees of freedom)
    and the two-sided paired t-test's p (scipy.stats.ttest_rel). Below 2 pairs only the mean; with
    identical differences the interval is that point and p is undefined (None)."""
    import numpy as np
    from scipy import stats

    x, y = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need the same length, got {x.size} and {y.size}")
    d = x - y
    out = {"n": int(d.size), "mean": float(d.mean()) if d.size else None, "ci": None, "p": None}
    if d.size < 2:
        return out
    if np.allclose(d, d[0], rtol=1e-9, atol=1e-12):  # no spread (up to rounding): t is 0/0 or infinite
        return {**out, "ci": [out["mean"], out["mean"]]}
    test = stats.ttest_rel(x, y)
    ci = test.confidence_interval(confidence)
    return {**out, "ci": [float(ci.low), float(ci.high)], "p": float(test.pvalue)}


def reference_objective(names: list[str], chosen: str | None = None) -> str | None:
    """The objective the others are paired against: the chosen one (--reference), else KD, else CE
    alone (a cross-tokenizer job), else none."""
    if chosen is not None:
        return chosen
    return next((n for n in REFERENCES if n in names), None)


def check_reference(chosen: str | None, names: list[str]) -> None:
    if chosen is not None and chosen not in names:
        raise ConfigError(f"--reference: {chosen!r} is not among the compared objectives ({', '.join(names)})")


def summarize(trials: list[dict], names: list[str], metrics: list[str], chosen: str | None = None) -> dict:
    """metric -> objective -> describe(...) of its test scores, with `vs_reference`: the paired
    difference to reference_objective(names, chosen) over the seeds both finished (None for the
    reference itself, or without one)."""
    reference = reference_objective(names, chosen)
    scores = {n: {t["seed"]: t["test"] for t in trials if t["objective"] == n and t.get("test")} for n in names}
    out = {}
    for metric in metrics:
        rows = {}
        for name in names:
            by_seed = {s: v[metric] for s, v in scores[name].items() if v.get(metric) is not None}
            row = describe([by_seed[s] for s in sorted(by_seed)])
            ref = {s: v[metric] for s, v in scores.get(reference, {}).items() if v.get(metric) is not None}
            common = sorted(set(by_seed) & set(ref))
            row["vs_reference"] = (paired_difference([by_seed[s] for s in common], [ref[s] for s in common])
                                   if reference is not None and name != reference else None)
            rows[name] = row
        out[metric] = rows
    return out


# ----------------------------------------------------------------------------- tables


def _num(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def metric_table(metric: str, rows: dict, chosen: str | None = None) -> str:
    """One metric's markdown table: an objective a row, the paired difference to the reference
    (reference_objective) at the right."""
    reference = reference_objective(list(rows), chosen)
    head = ["objective", "seeds", "mean", "std", "min", "max", f"- {reference or 'kd'} (paired)", "95% CI", "p"]
    lines = [f"### test {metric}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        diff = r["vs_reference"]
        if diff is None:
            cells = ["reference" if name == reference else "n/a (no kd or ce: --reference NAME)", "", ""]
        else:
            ci = "n/a" if diff["ci"] is None else f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]"
            cells = ["n/a" if diff["mean"] is None else f"{diff['mean']:+.4f}", ci, _p(diff["p"])]
        lines.append("| " + " | ".join([name, str(r["n"]), _num(r["mean"]), _num(r["std"]), _num(r["min"]),
                                        _num(r["max"]), *cells]) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """compare.md: what was compared, one table per metric, how the numbers were computed."""
    trials, failed = report["trials"], [t for t in report["trials"] if t["status"] != "OK"]
    setting = (f"run directory `{report['run_dir']}`, teacher `{report['teacher']}`, seeds "
               f"{', '.join(map(str, report['seeds']))}; {report['data']}")
    lines = [f"# sinkd compare: {len(report['objectives'])} objectives x {len(report['seeds'])} seeds", "", setting, ""]
    lines += [f"- `{name}`: {line}" for name, line in report["described"].items()] + [""]
    chosen = report.get("reference")
    for metric in report["metrics"]:
        lines += [metric_table(metric, report["summary"][metric], chosen), ""]
    lines.append(f"Differences: objective - {reference_objective(list(report['objectives']), chosen) or 'kd'}, paired by seed over the seeds both finished; "
                 f"{CONFIDENCE:.0%} interval from the t distribution with n - 1 degrees of freedom; p of a "
                 "two-sided paired t-test (scipy.stats.ttest_rel); std is the sample std (n - 1). "
                 "n/a: fewer than 2 values or pairs (or no spread, for p).")
    if failed:
        lines += ["", f"{len(failed)} of {len(trials)} trials failed (rerun the same command to retry them):"]
        lines += [f"- {t['objective']} seed {t['seed']}: {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the trial


def compare_trial(params: dict, base: dict, prepared: Prepared, objectives: dict, teacher: str) -> None:
    """One objective at one seed: fit (fit_trial: its epochs are the trial's first results), export
    the final checkpoint, score it on the test split, and report the scores as the last result."""
    from ray import tune

    name = params["objective"]
    cfg, result = fit_trial({"name": name, "objective": objectives[name], "seed": params["seed"]},
                            base, prepared, experiment=EXPERIMENT, teacher=teacher)
    model_dir = export_checkpoint(result.checkpoint, stage_model_dir(cfg, name))
    scores = get_task(cfg.task_type).evaluate(str(model_dir), cfg, prepared, "test", **eval_pool(cfg))
    tune.report({"phase": "test", **{f"test_{k}": v for k, v in scores.items()}})


def trial_record(result, metrics: list[str]) -> dict:
    """What compare.json keeps of one Tune result: scores, the per-epoch validation history, error."""
    m = result.metrics or {}
    test = {k: m[f"test_{k}"] for k in metrics if f"test_{k}" in m}
    error = str(result.error).strip().splitlines()[-1][:300] if result.error else None
    if error is None and not test:
        error = "no test scores reported"
    return {"objective": result.config["objective"], "seed": result.config["seed"],
            "trial": Path(result.path).name if result.path else "?", "status": "ERROR" if error else "OK",
            "test": test or None, "history": history(result.metrics_dataframe), "time_s": m.get("time_total_s"),
            "error": error}


def history(frame) -> list[dict]:
    """Per epoch the validation metrics the trial reported (a resumed trial's repeats: the last)."""
    import pandas as pd

    if frame is None or "epoch" not in frame:
        return []
    cols = [c for c in frame.columns if c.startswith("val_")]
    epochs = frame[frame["epoch"].notna()].drop_duplicates("epoch", keep="last").sort_values("epoch")
    return [{"epoch": int(row["epoch"]), **{c: float(row[c]) for c in cols if pd.notna(row[c])}}
            for _, row in epochs.iterrows()]


# ----------------------------------------------------------------------------- the run


def request(cfg: Config, objectives: dict, seeds: list[int]) -> dict:
    """What a comparison's trials depend on: a rerun with another one is refused, never mixed in."""
    job = {k: v for k, v in cfg.to_dict().items() if k not in ("ray", "run_dir", "name", "baselines")}
    return json.loads(json.dumps({"objectives": objectives, "seeds": seeds, "job": job}, default=str))


def check_request(out_dir: Path, wanted: dict) -> None:
    """A compare folder of other objectives, seeds or job settings is refused, naming what changed."""
    path = out_dir / "request.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    changed = [k for k in ("objectives", "seeds") if old.get(k) != wanted[k]]
    changed += [f"job.{k}" for k in sorted(set(old.get("job", {})) | set(wanted["job"]))
                if old.get("job", {}).get(k) != wanted["job"].get(k)]
    if changed:
        raise ConfigError(f"run_dir: {out_dir} holds a comparison with other settings ({', '.join(changed[:4])} "
                          "changed); use a new run_dir")


def finished_report(out_dir: Path, wanted: dict) -> dict | None:
    """compare.json of this very comparison with every trial scored: nothing to run again."""
    path = out_dir / "compare.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    done = {(t["objective"], t["seed"]) for t in report.get("trials", []) if t["status"] == "OK"}
    wanted_pairs = {(n, s) for n in wanted["objectives"] for s in wanted["seeds"]}
    same = report.get("request") == wanted
    return report if same and done >= wanted_pairs else None


def concurrency(cfg: Config) -> int:
    """Trials that fit the cluster at once: each holds its workers plus one CPU for its Ray Data tasks
    (fewer leaves a trial's data tasks waiting behind the others' workers)."""
    import ray

    total = ray.cluster_resources()
    s = cfg.scaling
    fits = int(total.get("CPU", 1) // (s.num_workers * s.cpus_per_worker + 1))
    if s.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // (s.num_workers * s.gpus_per_worker)))
    return max(1, fits)


def run_trials(cfg: Config, prepared: Prepared, objectives: dict, seeds: list[int], storage: str) -> list:
    """The objective x seed grid as Tune trials (restored when the experiment exists); the results."""
    from ray import tune

    base, teacher = trial_inputs(cfg, prepared.teacher_dir)
    base["baselines"] = {}  # each trial is one stage named after its objective
    trainable = tune.with_resources(tune.with_parameters(
        compare_trial, base=base, prepared=prepared, objectives=objectives, teacher=teacher), {"CPU": 0.01})
    space = {"objective": tune.grid_search(list(objectives)), "seed": tune.grid_search(seeds)}
    path = join_storage(storage, EXPERIMENT)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=concurrency(cfg)),
                           run_config=tune.RunConfig(name=Path(EXPERIMENT).name, storage_path=join_storage(storage, FOLDER),
                                                     verbose=0, callbacks=[TrialLines()]))
    grid = tuner.fit()
    total = len(objectives) * len(seeds)
    finished = grid.num_terminated + grid.num_errors
    if finished < total:
        raise TuneInterrupted(f"comparison stopped after {finished} of {total} trials; rerun the same command "
                              f"to resume ({path})")
    return list(grid)


def run_compare(cfg: Config, names: list[str] | None = None, seeds: int = 3, reference: str | None = None) -> dict:
    """Check everything, prepare the teacher once, run (or resume) the trials, write the outputs.
    reference: the objective the paired differences are taken against (default kd, else ce); it
    changes the tables only, so a finished comparison rerun with another reference is rewritten in seconds."""
    objectives, seed_values = resolve_objectives(cfg, names), seed_list(cfg, seeds)
    check_reference(reference, list(objectives))
    plan = plan_job(cfg)  # data and run-dir checks, before anything is written
    out_dir = Path(cfg.run_dir).resolve() / FOLDER
    wanted = request(cfg, objectives, seed_values)
    check_request(out_dir, wanted)
    storage, trials_path = experiment_storage(cfg, EXPERIMENT)
    claim = Claim("the comparison's trials", storage_owner(cfg), wanted)
    check_claim(trials_path, claim, storage_key(cfg))  # Tuner.restore would resume another comparison
    done = finished_report(out_dir, wanted)
    if done is not None:  # a finished comparison reruns in seconds, without Ray
        return write_outputs({**done, "reference": reference}, out_dir)
    prepare_run_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "request.json").write_text(json.dumps(wanted, indent=1))
    write_claim(trials_path, claim, storage_key(cfg))
    with ray_session(cfg, extra_cpus=1):  # the trial drivers' 0.01 CPU each, which only wait
        prepare_teacher(plan)  # fine-tuning if planned, then the teacher's logits once
        results = run_trials(cfg, plan.prepared, objectives, seed_values, storage)
    report = build_report(cfg, plan, objectives, seed_values, results)
    report["request"] = wanted
    return write_outputs({**report, "reference": reference}, out_dir)


def build_report(cfg: Config, plan, objectives: dict, seeds: list[int], results: list) -> dict:
    """compare.json's content: the setting and every trial (objective order, then seed); write_outputs adds the statistics."""
    metrics, task = plan.prepared.metrics, get_task(cfg.task_type)
    order = {n: i for i, n in enumerate(objectives)}
    trials = sorted((trial_record(r, metrics) for r in results), key=lambda t: (order[t["objective"]], t["seed"]))
    sizes = plan.prepared.data.sizes()
    return {"run_dir": str(cfg.run_dir), "teacher": plan.teacher_dir, "metrics": metrics, "headline": metrics[0],
            "data": f"{sizes.get('train', 0)} train / {sizes.get('validation', 0)} validation / "
                    f"{sizes.get('test', 0)} test rows, {plan.prepared.description}",
            "seeds": seeds, "objectives": objectives, "trials": trials,
            "described": {name: task.objective(o).describe() for name, o in objectives.items()}}


def write_outputs(report: dict, out_dir: Path) -> dict:
    """compare.json, compare.md, compare.png; returns the paths, the table and the failed trials.
    The statistics are recomputed from the trials (a compare.json of an older version reads as new)."""
    chosen = report.get("reference")
    report["summary"] = summarize(report["trials"], list(report["objectives"]), report["metrics"], chosen)
    (out_dir / "compare.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out_dir / "compare.md").write_text(text)
    plot(report, out_dir / "compare.png")
    tables = "\n\n".join(metric_table(m, report["summary"][m], chosen) for m in report["metrics"])
    failed = [t for t in report["trials"] if t["status"] != "OK"]
    return {"dir": str(out_dir), "table": tables, "failed": failed, "report": report,
            "files": [str(out_dir / f"compare.{x}") for x in ("md", "json", "png")]}


def plot(report: dict, path: Path) -> None:
    """Left: the headline test metric per objective (mean, std error bars, each seed a dot); right:
    the headline validation metric per epoch, the mean over seeds of each objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, names = report["headline"], list(report["objectives"])
    rows = report["summary"][metric]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    means = [rows[n]["mean"] if rows[n]["mean"] is not None else math.nan for n in names]
    errors = [rows[n]["std"] or 0.0 for n in names]
    left.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.7)
    for i, name in enumerate(names):
        seeds = [t["test"][metric] for t in report["trials"] if t["objective"] == name and t.get("test")]
        left.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
    left.set_xticks(range(len(names)), names, rotation=30, ha="right")
    finite = [m for m in means if not math.isnan(m)]
    if finite:
        lo, hi = min(finite) - max(errors + [0.01]) * 3, max(finite) + max(errors + [0.01]) * 3
        left.set_ylim(max(lo, -1.0), hi)
    left.set_ylabel(f"test {metric}")
    left.set_title(f"test {metric}: mean +- std over {len(report['seeds'])} seed(s)")
    key = f"val_{metric}"
    for name in names:
        curves = [{h["epoch"]: h[key] for h in t["history"] if key in h} for t in report["trials"] if t["objective"] == name]
        epochs = sorted({e for c in curves for e in c})
        if epochs:
            mean = [sum(c[e] for c in curves if e in c) / sum(e in c for c in curves) for e in epochs]
            right.plot(epochs, mean, marker="o", label=name)
    right.set_xlabel("epoch")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel(key)
    right.set_title("validation per epoch (mean over seeds)")
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class TrialLines(Callback):
    """One terminal line per finished trial (Tune itself runs silent at verbose 0)."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("phase") == "test":
            scores = ", ".join(f"{k[5:]} {v:.4f}" for k, v in result.items()
                               if k.startswith("test_") and isinstance(v, (int, float)))
            print(f"compare: {trial.config['objective']} seed {trial.config['seed']}: test {scores}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"compare: {trial.config['objective']} seed {trial.config['seed']}: failed (see {trial.path})", flush=True)
