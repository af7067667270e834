"""`sinkd tune` from the command line, in a subprocess as a user runs it: a bad space is refused
before Ray starts or the run directory is created."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from pipeline_helpers import tiny_job

SPACE = {
    "metric": "val_loss",
    "mode": "min",
    "num_samples": 1,
    "max_concurrent_trials": 1,
    "trial_resources": {"cpu": 0.01},
    "search": {"algorithm": "random", "seed": 0},
    "scheduler": {"type": "asha", "time_attr": "training_iteration", "grace_period": 1, "max_t": 3, "reduction_factor": 2},
    "space": {"train.lr": {"grid": [3.0e-3, 1.0e-7, 2.0e-7, 1.0e-3]}, "objective.sinkhorn.eps": {"choice": [0.1]}},
}


def _sinkd(*args, **popen):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def test_invalid_space_fails_before_any_work(tmp_path, tiny_bert, sst2_small):
    config, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path / "run", tiny_bert, sst2_small)))
    space.write_text(yaml.safe_dump({**SPACE, "space": {"objective.sinkhorn.epsilon": {"choice": [0.1]}}}))
    proc = _sinkd("tune", config, space)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "space.objective.sinkhorn.epsilon" in out and "unknown key" in out, out
    assert not (tmp_path / "run").exists()


def test_a_metric_the_validation_does_not_report_fails_before_any_work(tmp_path, tiny_bert, sst2_small):
    """CoLA's validation reports MCC, not accuracy: an SST-2 space on a CoLA job is refused up front
    instead of failing after the teacher's fine-tuning and the first trial's epoch."""
    config, space = tmp_path / "job.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path / "run", tiny_bert, sst2_small, **{"data.task": "cola"})))
    space.write_text(yaml.safe_dump({**SPACE, "metric": "val_accuracy", "mode": "max"}))
    proc = _sinkd("tune", config, space)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "metric: 'val_accuracy' is not reported" in out and "val_matthews, val_loss, train_loss" in out, out
    assert not (tmp_path / "run").exists()
