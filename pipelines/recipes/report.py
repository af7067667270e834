"""`sinkd report RUN_DIR`: how a run went, readable without TensorBoard.

Reads what any run directory holds, also a running or an interrupted one: the TensorBoard scalars
each stage's ProgressUI wrote (RUN_DIR/tb/<stage>), results.json and data_summary.json when present,
config.yaml. Writes RUN_DIR/report.png (per step: loss, CE, KD and Sinkhorn terms, learning rate,
throughput; per epoch: the validation metrics) and RUN_DIR/report.md (the tables, the picture, the
config). `sinkd train` writes both at the end of a job.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [("train/loss", "training loss (objective)"), ("train/ce", "CE term"), ("train/kd", "KD term"),
          ("train/sinkhorn", "Sinkhorn term"), ("train/lr", "learning rate"),
          ("train/examples_per_s", "throughput (examples/s)"), (None, "validation (headline metric)"),
          ("val/val_loss", "validation loss")]


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file in a stage's TensorBoard folder (last value
    per step wins: a resumed stage rewrites the steps after its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not (run_dir / "tb").is_dir() and not (run_dir / "results.json").is_file():
        raise FileNotFoundError(f"{run_dir}: not a sinkd run directory (no tb/ or results.json)")
    read = lambda name: json.loads((run_dir / name).read_text()) if (run_dir / name).is_file() else None  # noqa: E731
    stages = {}
    if (run_dir / "tb").is_dir():
        for tb in sorted((run_dir / "tb").iterdir(), key=lambda p: p.stat().st_mtime):
            if tb.is_dir():
                stages[tb.name] = read_scalars(tb)
    return {"run_dir": str(run_dir), "stages": stages, "results": read("results.json"),
            "data": read("data_summary.json"),
            "config": (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else None}


def headline(run: dict) -> str | None:
    metrics = (run["results"] or {}).get("metrics")
    if metrics:
        return f"val/val_{metrics[0]}"
    for scalars in run["stages"].values():
        for tag in scalars:
            if tag.startswith("val/val_") and tag not in ("val/val_loss", "val/val_examples", "val/val_tokens", "val/val_epoch"):
                return tag
    return None


def plot(run: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = headline(run)
    colors = {stage: f"C{i}" for i, stage in enumerate(run["stages"])}  # one colour per stage in every panel
    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    for ax, (tag, title) in zip(axes.flat, PANELS):
        tag = tag or head
        if tag and tag.startswith("val/"):
            title = title if tag == "val/val_loss" else f"validation {tag[len('val/val_'):]}"
        drawn = False
        for stage, scalars in run["stages"].items():
            points = scalars.get(tag or "", [])
            if not points:
                continue
            steps, values = zip(*points)
            if tag in ("train/kd", "train/sinkhorn") and not any(values):
                continue  # the term is off in this stage (its weight is 0)
            color = colors[stage]
            if tag.startswith("val/"):
                ax.plot(steps, values, marker="o", color=color, label=stage)
            elif tag in ("train/lr", "train/examples_per_s"):  # a schedule / a running rate: no smoothing
                ax.plot(steps, values, color=color, label=stage)
            else:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values), color=color, label=stage)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(f"sinkd run {Path(run['run_dir']).name}: faint = every step, solid = running mean; "
                 "validation points at the end of each epoch", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(values, weight: float = 0.9) -> list[float]:
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def model_row(info: dict, metrics: list[str]) -> dict:
    """One model's cells of the scores table (the terminal summary and report.md format them)."""
    train_s = "reused" if info.get("reused") else "given" if info.get("given") else f"{info.get('train_s', 0):.0f}"
    eps = info.get("examples_per_s")
    return {"layers": info.get("layers") or "?", "params_m": info.get("params", 0) / 1e6,
            "scores": [info.get("test", {}).get(m, float("nan")) for m in metrics], "train_s": train_s,
            "examples_per_s": "-" if eps is None else round(eps)}


def markdown(run: dict) -> str:
    lines = [f"# sinkd run `{run['run_dir']}`", ""]
    if run["data"]:
        lines += ["## Data", ""]
        for split, s in run["data"]["splits"].items():
            lines.append(f"- {split}: " + ", ".join(f"{k} {v}" for k, v in s.items()))
        lines += [f"- warning: {w}" for w in run["data"].get("warnings", [])] + [""]
    results = run["results"]
    if results:
        metrics = results["metrics"]
        lines += ["## Test scores", "", "| model | layers | params | " + " | ".join(f"test {m}" for m in metrics)
                  + " | train s | examples/s |", "|---" * (5 + len(metrics)) + "|"]
        for name, info in results["models"].items():
            row = model_row(info, metrics)
            scores = " | ".join(f"{v:.4f}" for v in row["scores"])
            lines.append(f"| {name} | {row['layers']} | {row['params_m']:.1f}M | {scores} | "
                         f"{row['train_s']} | {row['examples_per_s']} |")
        lines += [""] + [f"note: {n}" for n in results.get("notes", [])] + [""]
    else:
        lines += ["(no results.json yet: the run is in progress or was interrupted)", ""]
    lines += ["## Training", "", "![training curves](report.png)", "",
              f"| stage | steps | last loss | validation {(headline(run) or 'val/val_?')[len('val/val_'):]} per epoch |",
              "|---|---|---|---|"]
    for stage, scalars in run["stages"].items():
        loss = scalars.get("train/loss", [])
        head = headline(run)
        val = ", ".join(f"{v:.4f}" for _, v in scalars.get(head or "", []))
        lines.append(f"| {stage} | {loss[-1][0] if loss else 0} | {loss[-1][1]:.4f} | {val or '-'} |" if loss
                     else f"| {stage} | 0 | - | {val or '-'} |")
    if run["config"]:
        lines += ["", "## Config", "", "```yaml", run["config"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """RUN_DIR/report.md and report.png from whatever the run directory holds now."""
    run = load_run(run_dir)
    out = Path(run_dir) / "report.md"
    plot(run, Path(run_dir) / "report.png")
    out.write_text(markdown(run))
    return out
