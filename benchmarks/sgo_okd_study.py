"""KD, KD + SGO (GKD mixing), OKD and OKD + SinKD at the same optimizer steps, over seeds: one
`sinkd train pipelines/configs/smollm2_sgo.yaml` run per (variant, seed), each in its own run
directory (a finished run is read back, not rerun; the teacher's test scores of an earlier run of the
same seed are offered to the next, see share_teacher_scores). Prints a table (per run, then mean and spread
per variant) and writes JSON.

    python benchmarks/sgo_okd_study.py --out /tmp/sgo_study --seeds 0 1 [--set data.max_train_examples=240]

Seconds per step and tokens per second come from the student stage's training loop (Ray Train's
`train_examples_per_s`, start-up excluded): s/step = rows per optimizer step / rows per second;
labelled tokens/s = rows per second x the training split's scored tokens per row (reference + end
token; a student-generated row scores lm.sgo.max_new_tokens instead, so this is approximate with SGO).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "smollm2_sgo.yaml"
OKD = ["lm.sgo={}", "teacher.online.kind=residual_adapter"]
VARIANTS = {
    "kd": ["lm.sgo={}"],
    "kd+sgo": [],
    "okd": OKD,
    "okd+sinkd": [*OKD, "objective.beta=1.0"],
}


def run(variant: str, seed: int, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{variant}_s{seed}"
    results = run_dir / "results.json"
    if not results.exists():
        share_teacher_scores(run_dir, out.glob(f"*_s{seed}/scores/teacher.json"))
        sets = [f"run_dir={run_dir}", f"seed={seed}", *VARIANTS[variant], *extra]
        cmd = [sys.executable, "-m", "pipelines.cli", "train", str(CONFIG), *[a for s in sets for a in ("--set", s)]]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads(results.read_text())


def share_teacher_scores(run_dir: Path, earlier) -> None:
    """The teacher's test scores stored by an earlier run of the same seed, copied into a new run
    directory: the job reuses them only if their key (teacher files, test rows, metrics, lm settings)
    is its own, and otherwise scores the teacher again."""
    target = run_dir / "scores" / "teacher.json"
    for source in earlier:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())


def row(variant: str, seed: int, results: dict, extra: list[str]) -> dict:
    from pipelines.tasks import load_checked_config

    cfg = load_checked_config(CONFIG, [*VARIANTS[variant], *extra, f"seed={seed}"])
    student, teacher = results["models"]["sinkd"], results["models"]["teacher"]
    rows_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers
    data = json.loads((Path(results["run_dir"]) / "data_summary.json").read_text())
    train = data["splits"]["train"]
    mean_len = train["tokens"] / max(train["blocks"], 1)  # labelled tokens per row (the reference + end token)
    rate = student["examples_per_s"]
    return {"variant": variant, "seed": seed, "test_bpb": student["test"]["bits_per_byte"],
            "test_rouge_l": student["test"].get("rouge_l"), "test_perplexity": student["test"]["perplexity"],
            "teacher_bpb": teacher["test"]["bits_per_byte"], "teacher_rouge_l": teacher["test"].get("rouge_l"),
            "s_per_step": rows_per_step / rate, "labelled_tokens_per_s": rate * mean_len, "train_s": student["train_s"],
            "steps": results["data"]["train"] // rows_per_step}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--set", dest="extra", action="append", default=[], help="KEY=VALUE for every run")
    args = ap.parse_args(argv)
    rows = [row(v, s, run(v, s, args.out, args.extra), args.extra) for s in args.seeds for v in args.variants]
    print("| variant | seed | test BPB | test Rouge-L | test ppl | s/step | labelled tokens/s | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seed']} | {r['test_bpb']:.4f} | {r['test_rouge_l']:.4f} | {r['test_perplexity']:.2f} "
              f"| {r['s_per_step']:.2f} | {r['labelled_tokens_per_s']:.1f} | {r['train_s']:.0f} |")
    print("\n| variant | seeds | test BPB (mean ± sd) | test Rouge-L (mean ± sd) | s/step (mean) |")
    print("|---|---:|---:|---:|---:|")
    summary = {}
    for v in args.variants:
        mine = [r for r in rows if r["variant"] == v]
        summary[v] = {"bpb": [r["test_bpb"] for r in mine], "rouge_l": [r["test_rouge_l"] for r in mine]}
        print(f"| {v} | {len(mine)} | {spread(summary[v]['bpb'])} | {spread(summary[v]['rouge_l'])} "
              f"| {statistics.mean(r['s_per_step'] for r in mine):.2f} |")
    teacher = rows[0]
    print(f"\nteacher: test BPB {teacher['teacher_bpb']:.4f}, Rouge-L {teacher['teacher_rouge_l']:.4f}")
    (args.out / "sgo_okd_study.json").write_text(json.dumps({"rows": rows, "summary": summary, "extra": args.extra}, indent=1))


if __name__ == "__main__":
    main()
