"""`sinkd eval`: score exported models on a split of the config's task (Ray Data batch inference)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError, stage_model_dir
from ..tasks import get_task
from ..tasks.common import eval_pool
from .session import ray_session


def run_models(cfg: Config) -> list[str]:
    """Every exported model of the run (RUN_DIR/models/*)."""
    return sorted(str(p) for p in stage_model_dir(cfg, "").glob("*") if (p / "config.json").is_file())


def evaluate_models(cfg: Config, models: list[str], split: str = "test") -> tuple[list[str], dict]:
    """(metric names, {model: {metric: score}}); model directories are checked before any data is read."""
    if not models:
        raise ConfigError(f"no models in {stage_model_dir(cfg, '')}; pass --model DIR")
    bad = [m for m in models if not (Path(m) / "config.json").is_file()]
    if bad:
        raise ConfigError(f"--model {bad[0]}: not a Hugging Face model directory")
    task = get_task(cfg.task_type)
    prepared = task.prepare(cfg)
    with ray_session(cfg):
        scores = {model: task.evaluate(model, cfg, prepared, split, **eval_pool(cfg)) for model in models}
    return prepared.metrics, scores


def format_scores(split: str, names: list[str], scores: dict) -> str:
    width, col = max(len(m) for m in scores), max(16, max(len(split) + 1 + len(n) for n in names))
    lines = [f"{'model':<{width}}  " + "  ".join(f"{split + ' ' + n:>{col}}" for n in names)]
    lines += [f"{model:<{width}}  " + "  ".join(f"{s[n]:>{col}.4f}" for n in names) for model, s in scores.items()]
    return "\n".join(lines)
