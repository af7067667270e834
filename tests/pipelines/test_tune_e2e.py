"""`sinkd tune` end to end, as a user runs it: four tiny trials under ASHA, the run interrupted with
Ctrl-C (SIGINT) after the first report and resumed by rerunning the same command, then the best
configuration rerun with `sinkd train`.

The grid puts two sane learning rates before two that make Adam diverge (1.0 and 3.0), and trials
run one after another, so when a diverging trial reaches ASHA's first rung the rung already holds a
lower training loss: ASHA must stop it there. (The metric is the epoch's training loss; on a tiny
random model a useful and a useless learning rate give the same loss to 2 decimals, a diverging one
does not.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import tiny_job

pytestmark = pytest.mark.slow  # `sinkd tune` subprocesses, each with its own local Ray

MAX_T = 2
SPACE = {
    "metric": "train_loss",
    "mode": "min",
    "num_samples": 1,
    "max_concurrent_trials": 1,
    "trial_resources": {"cpu": 0.01},
    "search": {"algorithm": "random", "seed": 0},
    "scheduler": {"type": "asha", "time_attr": "training_iteration", "grace_period": 1, "max_t": MAX_T,
                  "reduction_factor": 2},
    "space": {"train.lr": {"grid": [1.0e-3, 3.0e-4, 1.0, 3.0]}, "objective.sinkhorn.eps": {"choice": [0.1, 0.5]}},
}


def _sinkd(*args) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-4000:]}") from None
    return out


def _reported_trials(experiment: Path) -> set[str]:
    return {p.parent.name for p in experiment.glob("*/result.json") if p.stat().st_size > 0}


def test_tune_asha_interrupt_resume_and_best_rerun(tmp_path, tiny_bert, sst2_small):
    run_dir = tmp_path / "tune_run"
    job = tiny_job(run_dir, tiny_bert, sst2_small, **{
        "data.max_train_examples": 32, "data.max_eval_examples": 16, "data.max_length": 16,
        "train.epochs": MAX_T, "train.grad_accum": 1, "train.zero_stage": 0, "train.warmup_ratio": 0.0,
        "train.schedule": "constant", "train.checkpoint_every_steps": None, "train.keep_checkpoints": 1,
        # The least the config accepts: 1 worker CPU + 1 for Ray Data's tokenising tasks; `sinkd tune` adds
        # the trial driver's share on top (without it the tasks would find 0.99 CPU and wait forever).
        "scaling.num_workers": 1, "ray.num_cpus": 2})
    config, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(job))
    space.write_text(yaml.safe_dump(SPACE))
    experiment = run_dir / "tune"

    # 1. Ctrl-C once the first trial has reported: exit 130, no best config, state kept for a resume.
    proc = _sinkd("tune", config, space)
    deadline = time.monotonic() + 600
    while not _reported_trials(experiment) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    before = _reported_trials(experiment)
    if proc.poll() is not None or not before:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("no trial report before the run ended or 600 s passed:\n" + _finish(proc, 30)[-4000:])
    proc.send_signal(signal.SIGINT)
    out = _finish(proc, 180)
    assert proc.returncode == 130, out[-4000:]
    assert "rerun the same command to resume" in out, out[-4000:]
    assert not (run_dir / "best.yaml").exists()

    # 2. The same command resumes: the trials already started keep their ids, four in all.
    proc = _sinkd("tune", config, space)
    out = _finish(proc, 600)
    assert proc.returncode == 0, out[-4000:]
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 4, trials
    assert before <= {t["trial"] for t in trials}, (before, [t["trial"] for t in trials])
    assert all(t["status"] == "OK" for t in trials), trials
    lr_iters = {t["params"]["train.lr"]: t["iterations"] for t in trials}
    stopped = [lr for lr, its in lr_iters.items() if its < MAX_T]
    assert stopped, f"ASHA stopped no trial: {lr_iters}"
    assert lr_iters[1.0e-3] == MAX_T, lr_iters  # the first trial meets an empty rung: never stopped
    assert lr_iters[1.0] < MAX_T and lr_iters[3.0] < MAX_T, lr_iters  # the diverging ones stop at rung 1
    assert (run_dir / "tune.png").stat().st_size > 10_000
    assert "* best" in out and "train_loss" in out

    # 3. best.yaml is a ready-to-run job config with the best trial's values.
    best_file = run_dir / "best.yaml"
    best = yaml.safe_load(best_file.read_text())
    best_trial = min(trials, key=lambda t: t["train_loss"])
    assert best["train"]["lr"] == best_trial["params"]["train.lr"]
    assert best["objective"]["sinkhorn"]["eps"] == best_trial["params"]["objective.sinkhorn.eps"]
    proc = _sinkd("train", best_file, "--set", "train.epochs=1")
    out = _finish(proc, 300)
    assert proc.returncode == 0, out[-4000:]
    results = json.loads((Path(best["run_dir"]) / "results.json").read_text())
    assert set(results["models"]) == {"teacher", best.get("name", "sinkd")}, results["models"]
    assert all("accuracy" in m["test"] for m in results["models"].values()), results["models"]
