"""The `sinkd` command: train, eval, export. With no CONFIG each runs the embedded default job.

    sinkd train [CONFIG.yaml] [--set key=value ...]
    sinkd eval [CONFIG.yaml] [--model DIR ...] [--split test|validation]
    sinkd export [CONFIG.yaml] [--stage NAME] [--out DIR]
    sinkd tune CONFIG.yaml SPACE.yaml [--set key=value ...]
    sinkd compare [CONFIG.yaml] [--objectives NAME ...] [--seeds N] [--reference NAME] [--set key=value ...]
    sinkd report RUN_DIR
    sinkd submit [--address URL] [--runtime-env FILE] [--follow] train|tune ARGS...

User errors (config, data rows, files) print one line naming the key, file or row, and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkd", description="Knowledge distillation with the batch-wise Sinkhorn objective.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("config", nargs="?", help="job YAML (default: the embedded default job)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")
        verbose(sp)

    def verbose(sp):
        sp.add_argument("--verbose", "-v", action="store_true",
                        help="also show Ray's, DeepSpeed's and transformers' logs (always in RUN_DIR/logs)")

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
    x.add_argument("--out", help="output directory or storage URI, e.g. s3://BUCKET/models/sinkd (default: RUN_DIR/models/STAGE)")
    u = sub.add_parser("tune", help="Ray Tune over distillation runs (search space from tune_spaces/*.yaml)")
    u.add_argument("config", help="job YAML: the base of every trial")
    u.add_argument("space", help="search space YAML, e.g. tune_spaces/sinkd_classification.yaml")
    u.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of the base job (repeatable)")
    verbose(u)
    c = sub.add_parser("compare", help="objectives x seeds on one teacher: test scores, paired differences to KD")
    common(c)
    c.add_argument("--objectives", nargs="+", metavar="NAME",
                   help="ce, kd, rkl, js, tvd, skew_kl, sinkd (the job's objective), sinkd_paper (the official "
                        "code's setting) or a baseline of the job (default: ce, kd, sinkd and the baselines)")
    c.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per objective, counted from the job's seed (default 3)")
    c.add_argument("--reference", metavar="NAME", help="the compared objective the paired differences are taken "
                   "against (default kd, else ce)")
    r = sub.add_parser("report", help="RUN_DIR/report.md + report.png from a run directory (also a running one)")
    r.add_argument("run_dir", help="a run directory, e.g. runs/default")
    from .recipes.submit import add_parser

    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .recipes import logs

    logs.configure(verbose=getattr(args, "verbose", False))
    warnings.filterwarnings("ignore", message=r".*TRANSFORMERS_CACHE.*")
    from .config import ConfigError
    from .recipes.tune_space import SpaceError
    from .tasks import load_checked_config

    try:
        if args.command == "submit":
            from .recipes.submit import run

            return run(args)
        if args.command == "report":
            from .recipes.report import write_report

            print(f"report: {write_report(args.run_dir)}")
            return 0
        cfg = load_checked_config(args.config, args.overrides)  # one YAML parse; every check, before any work
        return {"train": _train, "eval": _eval, "tune": _tune, "compare": _compare,
                "export": _export}[args.command](cfg, args)
    except (ConfigError, SpaceError, FileNotFoundError) as e:
        print(f"sinkd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # StageInterrupted (a stage's Ctrl-C) says where; any other moment too
        from .train.fit import StageInterrupted

        said = str(e) if isinstance(e, StageInterrupted) else "interrupted; rerun the same command to resume"
        print(f"\nsinkd: {said}", file=sys.stderr)
        return 130


def _train(cfg, args) -> int:
    from .recipes.job import plan_job, run_job

    plan = plan_job(cfg)  # data and run-dir checks, before anything is written
    print("\n".join(plan.describe()), flush=True)
    if args.check:
        print("ok: config and data valid")
        return 0
    results = run_job(cfg, show_progress=not args.no_progress, plan=plan)
    print()
    print(Path(results["run_dir"], "summary.txt").read_text(), end="")
    return 0


def _tune(cfg, args) -> int:
    from .recipes.tune import TuneInterrupted, run_tune
    from .recipes.tune_space import load_space

    try:
        out = run_tune(cfg, load_space(args.space))
    except TuneInterrupted as e:
        print(f"sinkd: {e}", file=sys.stderr)
        return 130
    print()
    print(out["table"])
    print(f"best config: {out['best_config']}  (rerun: sinkd train {out['best_config']})")
    print(f"plot: {out['plot']}")
    return 0


def _compare(cfg, args) -> int:
    """Exit 0 when every trial was scored, 1 when some failed (the outputs say which), 130 on Ctrl-C."""
    from .recipes.compare import run_compare
    from .recipes.tune import TuneInterrupted

    try:
        out = run_compare(cfg, args.objectives, args.seeds, args.reference)
    except TuneInterrupted as e:
        print(f"sinkd: {e}", file=sys.stderr)
        return 130
    print()
    print(out["table"])
    print("\n" + "\n".join(f"{f.rsplit('.', 1)[-1]}: {f}" for f in out["files"]))
    for t in out["failed"]:
        print(f"sinkd: trial {t['objective']} seed {t['seed']} failed: {t['error']}", file=sys.stderr)
    return 1 if out["failed"] else 0


def _eval(cfg, args) -> int:
    """Scores of each model (--model, else every model under RUN_DIR/models) on a split."""
    from .recipes.evaluate import evaluate_models, format_scores, run_models

    names, scores = evaluate_models(cfg, args.model or run_models(cfg), args.split)
    print(format_scores(args.split, names, scores))
    print(json.dumps(scores))
    return 0


def _export(cfg, args) -> int:
    from .config import join_storage, stage_model_dir, storage_root
    from .recipes.export import checkpoint_uri, export_to, stage_checkpoint

    stage = args.stage or cfg.name
    checkpoint = stage_checkpoint(join_storage(storage_root(cfg), stage))  # RUN_DIR/ray or ray.storage_path
    out = export_to(checkpoint, args.out or stage_model_dir(cfg, stage))
    print(f"exported {checkpoint_uri(checkpoint)} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
