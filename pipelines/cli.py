"""The `sinkd` command: train, eval, export. With no CONFIG each runs the embedded default job.

    sinkd train [CONFIG.yaml] [--set key=value ...]
    sinkd eval [CONFIG.yaml] [--model DIR ...] [--split test|validation]
    sinkd export [CONFIG.yaml] [--stage NAME] [--out DIR]
    sinkd tune CONFIG.yaml SPACE.yaml [--set key=value ...]
    sinkd submit [--address URL] [--runtime-env FILE] [--follow] train|tune ARGS...

User errors (config, data rows, files) print one line naming the key, file or row, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkd", description="Knowledge distillation with the batch-wise Sinkhorn objective.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("config", nargs="?", help="job YAML (default: the embedded default job)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")

    t = sub.add_parser("train", help="fine-tune the teacher if needed, distil the students, score them")
    common(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument("--check", action="store_true", help="validate config and data, then stop")
    e = sub.add_parser("eval", help="score models on a split of the config's task")
    common(e)
    e.add_argument("--model", action="append", default=[], help="model directory (default: the run's models)")
    e.add_argument("--split", default="test", choices=["test", "validation", "train"])
    x = sub.add_parser("export", help="a stage's latest checkpoint -> Hugging Face model directory")
    common(x)
    x.add_argument("--stage", help="stage name (default: the config's name)")
    x.add_argument("--out", help="output directory (default: RUN_DIR/models/STAGE)")
    u = sub.add_parser("tune", help="Ray Tune over distillation runs (search space from tune_spaces/*.yaml)")
    u.add_argument("config", help="job YAML: the base of every trial")
    u.add_argument("space", help="search space YAML, e.g. tune_spaces/sinkd_classification.yaml")
    u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the base job (repeatable)")
    from .submit import add_parser

    add_parser(sub)
    return p


def _quiet() -> None:
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset execution plans: not for users
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    warnings.filterwarnings("ignore", message=r".*TRANSFORMERS_CACHE.*")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet()
    from .config import ConfigError, load_config
    from .tune_space import SpaceError

    try:
        if args.command == "submit":
            from .submit import run

            return run(args)
        cfg = load_config(args.config, args.overrides)
        raw = _raw(args.config, args.overrides)
        if args.command == "train":
            return _train(cfg, raw, args)
        if args.command == "eval":
            return _eval(cfg, args)
        if args.command == "tune":
            return _tune(cfg, raw, args)
        return _export(cfg, args)
    except (ConfigError, SpaceError) as e:
        print(f"sinkd: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"sinkd: error: {e}", file=sys.stderr)
        return 2


def _raw(path, overrides) -> dict:
    """The user's config as written (pkg:// paths kept), with overrides applied: saved in the run dir."""
    import yaml

    from .config import DEFAULT_CONFIG, apply_override

    raw = yaml.safe_load(Path(path or DEFAULT_CONFIG).read_text()) or {}
    for item in overrides:
        apply_override(raw, item)
    return raw


def _train(cfg, raw, args) -> int:
    from .job import plan_job, run_job

    plan = plan_job(cfg)  # data and run-dir checks, before anything is written
    if args.check:
        print(f"ok: config and data valid ({plan.task.sizes()}); stages: "
              f"{'teacher fine-tuning, ' if plan.finetune else ''}{', '.join(plan.students)}")
        return 0
    results = run_job(cfg, raw, show_progress=not args.no_progress, plan=plan)
    print()
    print(Path(results["run_dir"], "summary.txt").read_text(), end="")
    return 0


def _tune(cfg, raw, args) -> int:
    from .tune import TuneInterrupted, run_tune
    from .tune_space import load_space

    try:
        out = run_tune(cfg, raw, load_space(args.space))
    except TuneInterrupted as e:
        print(f"sinkd: {e}", file=sys.stderr)
        return 130
    print()
    print(out["table"])
    print(f"best config: {out['best_config']}  (rerun: sinkd train {out['best_config']})")
    print(f"plot: {out['plot']}")
    return 0


def _eval(cfg, args) -> int:
    """Scores of each model (--model, else every model under RUN_DIR/models) on a split."""
    from .job import eval_pool, ray_session

    models = args.model or sorted(str(p) for p in (Path(cfg.run_dir) / "models").glob("*") if (p / "config.json").is_file())
    if not models:
        print(f"sinkd: error: no models in {Path(cfg.run_dir) / 'models'}; pass --model DIR", file=sys.stderr)
        return 2
    bad = [m for m in models if not (Path(m) / "config.json").is_file()]
    if bad:
        print(f"sinkd: error: --model {bad[0]}: not a Hugging Face model directory", file=sys.stderr)
        return 2
    if cfg.task_type == "causal_lm":  # perplexity and top-1 agreement with the teacher on token blocks
        from .causal_lm import METRICS, evaluate_lm, plan_parts

        task, teacher_dir = plan_parts(cfg)
        names = METRICS

        def score(model):
            return evaluate_lm(model, cfg, task, teacher_dir, args.split, **eval_pool(cfg))
    else:
        from .data import load_task
        from .evaluate import evaluate_model, metric_names

        task = load_task(cfg)
        names = metric_names(task.task, task.num_labels)

        def score(model):
            return evaluate_model(model, task.splits[args.split], names, cfg.data.max_length,
                                  cfg.train.eval_batch_size, **eval_pool(cfg))
    with ray_session(cfg):
        scores = {model: score(model) for model in models}
    width, col = max(len(m) for m in scores), max(16, max(len(args.split) + 1 + len(n) for n in names))
    print(f"{'model':<{width}}  " + "  ".join(f"{args.split + ' ' + n:>{col}}" for n in names))
    for model, s in scores.items():
        print(f"{model:<{width}}  " + "  ".join(f"{s[n]:>{col}.4f}" for n in names))
    print(json.dumps(scores))
    return 0


def _export(cfg, args) -> int:
    from .config import storage_root
    from .export import checkpoint_uri, export_checkpoint, stage_checkpoint

    stage = args.stage or cfg.name
    checkpoint = stage_checkpoint(f"{storage_root(cfg).rstrip('/')}/{stage}")  # RUN_DIR/ray or ray.storage_path
    out = export_checkpoint(checkpoint, args.out or Path(cfg.run_dir) / "models" / stage)
    print(f"exported {checkpoint_uri(checkpoint)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
