"""Throughput of the pipeline vs the same training loop without Ray, on the same data.

    python benchmarks/pipeline_bench.py [CONFIG.yaml] [--set key=value ...] [--examples 512] [--workers 1 2] [--floor FITS]

Both sides distil the config's student from its teacher with its objective, batch size and
sequence length, over the same first N training rows, one epoch:
- bare: one process, plain PyTorch (torch.optim.AdamW), tokenising each batch with dynamic padding,
  using every CPU the pipeline would use;
- pipeline: Ray Data -> TorchTrainer -> DeepSpeed, for each worker count; `loop` is the epoch
  loop (as the worker measures it), `steady` the same after the first optimizer step (without the
  data pipeline's start-up), `fit` includes worker start-up and DeepSpeed init; `startup` is the
seconds from the fit() call to the worker's entry, its setup (models, DeepSpeed), its first batch
and its first optimizer step.
Prints a table and the JSON object (examples/s, seconds); --out also writes the JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch


def bare_loop(cfg, task, teacher_dir: str, threads: int) -> dict:
    from sinkd import DistillationObjective

    from pipelines.config import objective_config
    from pipelines.tasks.classification.models import Classifier, build_student, build_teacher, model_kind
    from pipelines.tasks.common import load_tokenizer

    torch.set_num_threads(threads)
    kind = model_kind(teacher_dir)
    torch.manual_seed(cfg.seed)
    student = Classifier(build_student(cfg, teacher_dir, kind, task.num_labels, task.label_names), kind).train()
    teacher = Classifier(build_teacher(teacher_dir, kind, task.num_labels, task.label_names), kind)
    objective = DistillationObjective(objective_config(cfg.objective))
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    tok = load_tokenizer(teacher_dir)
    rows = task.splits["train"].to_pylist()
    bs = cfg.train.batch_size * cfg.scaling.num_workers  # the pipeline's global batch
    start = time.perf_counter()
    for i in range(0, len(rows), bs):
        batch = rows[i:i + bs]
        enc = tok([r["text_a"] for r in batch], [r["text_b"] for r in batch] if task.pair else None, truncation=True,
                  max_length=cfg.data.max_length, padding=True, return_tensors="pt")
        inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        labels = torch.tensor([r["label"] for r in batch])
        with torch.no_grad():
            t_logits = teacher(**inputs)
        loss = objective(student(**inputs), t_logits, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - start
    return {"examples": len(rows), "threads": threads, "seconds": round(elapsed, 2),
            "examples_per_s": round(len(rows) / elapsed, 2)}


def pipeline_run(cfg, prepared) -> dict:
    from pipelines.tasks import Stage
    from pipelines.train.fit import fit_stage

    start = time.perf_counter()
    stage = Stage("bench", prepared.teacher_dir, dict(cfg.objective), cfg.train)
    result = fit_stage(cfg, prepared, stage, show_progress=False)
    fit_s = time.perf_counter() - start
    n = prepared.data.splits["train"].num_rows
    return {"examples": n, "workers": cfg.scaling.num_workers, "cpus_per_worker": cfg.scaling.cpus_per_worker,
            "zero_stage": cfg.train.zero_stage, "loop_examples_per_s": round(result.metrics["train_examples_per_s"], 2),
            "steady_examples_per_s": round(result.metrics["train_steady_examples_per_s"], 2),
            "fit_seconds": round(fit_s, 2), "fit_examples_per_s": round(n / fit_s, 2),
            "startup_s": {k[len("startup_"):-len("_s")]: v for k, v in result.metrics.items() if k.startswith("startup_")}}


def table(out: dict) -> str:
    rows = [("bare PyTorch loop", f"{out['bare']['examples_per_s']:.1f}", "1.00", "", "", "", "")]
    for r in out["pipeline"]:
        s = r["startup_s"]
        name = f"pipeline, {r['workers']} worker(s) x {r['cpus_per_worker']:g} CPU"
        rows += [(f"{name}: steady", f"{r['steady_examples_per_s']:.1f}", f"{r['steady_vs_bare']:.2f}",
                  *(f"{s.get(k, float('nan')):.1f}" for k in ("entered", "setup", "first_batch", "first_step"))),
                 (f"{name}: epoch loop", f"{r['loop_examples_per_s']:.1f}", f"{r['loop_vs_bare']:.2f}", "", "", "", ""),
                 (f"{name}: whole fit ({r['fit_seconds']:.0f} s)", f"{r['fit_examples_per_s']:.1f}",
                  f"{r['fit_examples_per_s'] / out['bare']['examples_per_s']:.2f}", "", "", "", "")]
    head = ("run", "examples/s", "vs bare", "entered s", "setup s", "first batch s", "first step s")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def ray_train_floor(fits: int, cpus: int) -> list[float]:
    """Seconds from TorchTrainer.fit() to the entry of an empty train function (one worker of `cpus`
    CPUs): Ray Train's own start-up, the floor under every stage's. (The function writes the time to
    a file: Ray Train keeps metrics only with a checkpoint.)"""
    import tempfile
    from pathlib import Path

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def entered(config):
        Path(config["file"]).write_text(str(time.time() - config["called"]))

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(fits):
            file = f"{tmp}/entered_{i}"
            TorchTrainer(entered, train_loop_config={"called": time.time(), "file": file},
                         scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                         run_config=RunConfig(name=f"floor-{i}", storage_path=f"{tmp}/storage")).fit()
            out.append(round(float(Path(file).read_text()), 2))
    return out


def main(argv: list[str] | None = None) -> dict:
    import ray

    from pipelines.recipes.session import init_local_ray
    from pipelines.tasks import Prepared, get_task, load_checked_config

    p = argparse.ArgumentParser(prog="python benchmarks/pipeline_bench.py", description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for each side (bare threads; workers share them)")
    p.add_argument("--floor", type=int, default=0, metavar="FITS",
                   help="also time FITS empty TorchTrainer fits (Ray Train's start-up floor)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    base = load_checked_config(args.config, args.overrides + ["train.epochs=1", "train.checkpoint_every_steps=null",
                                                      f"data.max_train_examples={args.examples}"])
    loaded = get_task(base.task_type).prepare(base)
    task, teacher_dir = loaded.data, base.teacher.path  # throughput does not depend on the teacher being task-tuned
    prepared = Prepared(task, teacher_dir, False, loaded.metrics, loaded.description)
    out = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__, "config": args.config or "default",
           "examples": task.splits["train"].num_rows, "max_length": base.data.max_length,
           "batch_size_global": base.train.batch_size * base.scaling.num_workers,
           "bare": bare_loop(base, task, teacher_dir, args.cpus), "pipeline": []}
    init_local_ray(num_cpus=args.cpus + 1, object_store_memory=512 * 2**20)
    try:
        if args.floor:
            out["ray_train_floor_entered_s"] = ray_train_floor(args.floor, args.cpus)
        for workers in args.workers:
            cfg = copy.deepcopy(base)
            cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = workers, args.cpus / workers
            cfg.train.batch_size = base.train.batch_size * base.scaling.num_workers // workers  # same global batch
            cfg.run_dir = os.path.join(base.run_dir, f"bench-{workers}w-{int(time.time())}")
            out["pipeline"].append(pipeline_run(cfg, prepared))
    finally:
        ray.shutdown()
    for row in out["pipeline"]:
        row["loop_vs_bare"] = round(row["loop_examples_per_s"] / out["bare"]["examples_per_s"], 3)
        row["steady_vs_bare"] = round(row["steady_examples_per_s"] / out["bare"]["examples_per_s"], 3)
    text = json.dumps(out, indent=1)
    print(table(out))
    if args.floor:
        print(f"Ray Train floor (fit() -> an empty train function): {out['ray_train_floor_entered_s']} s")
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
