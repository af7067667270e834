"""Helpers shared by the pipeline tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import set_key


def tiny_job(run_dir, teacher, data, **over) -> dict:
    """A small job config as a raw mapping (what a YAML file would hold)."""
    raw = {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {"files": dict(data), "text_columns": ["sentence"], "label_column": "label", "task": "sst2",
                 "max_length": 32, "max_train_examples": 96, "max_eval_examples": 40},
        "teacher": {"path": str(teacher), "finetune": "never"},
        "student": {"init": "teacher_layers", "layers": [0, 2]},
        "objective": {"alpha": 1.0, "beta": 1.0, "temperature": 2.0, "sinkhorn": {"eps": 0.1, "max_iter": 20}},
        "train": {"epochs": 2, "batch_size": 8, "grad_accum": 2, "lr": 1e-3, "zero_stage": 2,
                  "checkpoint_every_steps": 2, "keep_checkpoints": 10},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "max_failures": 1},
    }
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


def snapshot(path: Path) -> dict:
    """Every file under path with its size and mtime: to prove a failed command changed nothing."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}
