"""Why the Sinkhorn term does (or does not) change a classification student: its size and its
gradient next to KD's and CE's, the plan's entropy, and how both move with the batch size.

    python benchmarks/sinkhorn_diagnostics.py benchmarks/studies/sst2.yaml \
        --teacher runs/study_sst2/models/teacher --student trained=runs/study_sst2/compare/.../models/sinkd

For the teacher and each student state (``start``: the student as its stage begins, teacher layers
copied; any NAME=DIR given), on random batches of the training rows and for each batch size B, with
each objective of `sinkd compare` (its weights as the comparison trains them):

- ``term``: each weighted term's value (ce_weight * CE, alpha * KD, beta * Sinkhorn);
- ``|grad|``: the Frobenius norm of that term's gradient in the student's logits (per batch);
- ``cos(kd, sinkhorn)``: the cosine between the KD and the Sinkhorn gradients (1: the same direction);
- ``plan``: KL(P || a b^T) / log B of the Sinkhorn plan, P normalised to total mass 1 (0: the
  independent coupling, every teacher row spread evenly over all student rows; 1: a one-to-one
  matching), and its mass on the diagonal (each student row on its own teacher row; 1/B uniform);
- ``C/eps``: the mean ground cost in units of eps (a kernel exp(-C/eps) near 1 everywhere means a
  near-uniform plan).

Prints one table and writes JSON (``--out``). CPU: about a minute per state for 512 rows, 3
objectives, 3 batch sizes and 8 batches on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.recipes.compare import available_objectives  # noqa: E402
from pipelines.tasks import load_checked_config  # noqa: E402
from pipelines.tasks.classification.data import load_task  # noqa: E402
from pipelines.tasks.classification.models import Classifier, build_student, load_pretrained  # noqa: E402
from pipelines.tasks.common import load_tokenizer  # noqa: E402
from sinkd import DistillationObjective, ObjectiveConfig, cost_matrix, sinkhorn  # noqa: E402


@torch.no_grad()
def logits_of(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    classifier = Classifier(model, "encoder").eval()
    out = []
    for i in range(0, len(texts), 64):
        enc = tokenizer(texts[i:i + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out.append(classifier(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids")))
    return torch.cat(out).double()


def term_gradients(config: ObjectiveConfig, z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor) -> dict:
    """Each weighted term alone: value and gradient in the student's logits."""
    weights = {"ce": config.ce_weight, "kd": config.alpha, "sinkhorn": config.beta}
    out = {}
    for term, w in weights.items():
        if w == 0:
            continue
        alone = ObjectiveConfig.from_dict({**config.to_dict(), "ce_weight": 0.0, "alpha": 0.0, "beta": 0.0, {
            "ce": "ce_weight", "kd": "alpha", "sinkhorn": "beta"}[term]: w})
        z = z_s.clone().requires_grad_(True)
        loss = DistillationObjective(alone)(z, z_t, labels=labels).loss
        (grad,) = torch.autograd.grad(loss, z)
        out[term] = {"value": float(loss.detach()), "grad": grad}
    return out


def plan_stats(config: ObjectiveConfig, z_s: torch.Tensor, z_t: torch.Tensor) -> dict:
    s = config.sinkhorn
    p_s, p_t = torch.softmax(z_s / s.temperature, -1), torch.softmax(z_t / s.temperature, -1)
    cost = cost_matrix(p_s, p_t, s.cost)
    n = cost.shape[0]
    plan = sinkhorn(cost, s.eps, max_iter=s.max_iter).plan
    plan = plan / plan.sum()
    ind = torch.full_like(plan, 1.0 / n**2)
    kl = float((plan * (plan.clamp_min(1e-300).log() - ind.log())).sum())
    return {"plan_kl_norm": kl / math.log(n), "plan_diag": float(plan.diagonal().sum()),
            "cost_over_eps": float(cost.mean() / s.eps)}


def diagnose(cfg_objective: dict, z_s: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, batch: int,
             batches: int, rng: np.random.Generator) -> dict:
    config = ObjectiveConfig.from_dict(cfg_objective)
    rows = []
    for _ in range(batches):
        idx = torch.as_tensor(rng.choice(len(labels), size=batch, replace=False))
        terms = term_gradients(config, z_s[idx], z_t[idx], labels[idx])
        row = {f"{t}_value": v["value"] for t, v in terms.items()}
        row.update({f"{t}_grad": float(v["grad"].norm()) for t, v in terms.items()})
        if "kd" in terms and "sinkhorn" in terms:
            row["cos_kd_sinkhorn"] = float(torch.nn.functional.cosine_similarity(
                terms["kd"]["grad"].flatten(), terms["sinkhorn"]["grad"].flatten(), dim=0))
        if config.beta > 0:
            row.update(plan_stats(config, z_s[idx], z_t[idx]))
        rows.append(row)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--teacher", required=True, help="the fine-tuned teacher's directory")
    ap.add_argument("--student", action="append", default=[], help="NAME=DIR of a trained student (repeatable)")
    ap.add_argument("--objectives", nargs="+", default=["kd", "sinkd", "sinkd_paper"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32, 128])
    ap.add_argument("--rows", type=int, default=512, help="training rows the batches are drawn from")
    ap.add_argument("--batches", type=int, default=8, help="random batches averaged per cell")
    ap.add_argument("--out", default="benchmarks/results/sinkhorn_diagnostics.json")
    args = ap.parse_args(argv)

    cfg = load_checked_config(args.config)
    objectives = available_objectives(cfg)
    unknown = [o for o in args.objectives if o not in objectives]
    if unknown:
        ap.error(f"--objectives: unknown objective {unknown[0]!r}; valid: {', '.join(objectives)}")
    data = load_task(cfg)
    train = data.splits["train"].slice(0, args.rows)
    texts, labels = train.column("text_a").to_pylist(), torch.tensor(train.column("label").to_numpy())
    tokenizer = load_tokenizer(args.teacher)
    started = time.time()
    teacher = load_pretrained(args.teacher, "encoder", data.num_labels, data.label_names)
    z_t = logits_of(teacher, tokenizer, texts, cfg.data.max_length)
    torch.manual_seed(cfg.seed)
    states = {"start": build_student(cfg, args.teacher, "encoder", data.num_labels, data.label_names)}
    for item in args.student:
        name, _, path = item.partition("=")
        states[name] = load_pretrained(path, "encoder", data.num_labels, data.label_names)
    results = []
    print(f"{'state':<10} {'objective':<12} {'B':>4} {'ce':>8} {'kd':>8} {'sinkhorn':>9} {'|g ce|':>8} {'|g kd|':>8} "
          f"{'|g sink|':>9} {'cos':>6} {'plan KL/logB':>12} {'diag':>6} {'C/eps':>6}")
    for state, model in states.items():
        z_s = logits_of(model, tokenizer, texts, cfg.data.max_length)
        acc = float((z_s.argmax(-1) == labels).double().mean())
        for name in args.objectives:
            for b in args.batch_sizes:
                r = diagnose(objectives[name], z_s, z_t, labels, b, args.batches, np.random.default_rng(0))
                results.append({"state": state, "train_accuracy": acc, "objective": name, "batch": b, **r})
                f = lambda k, w=8, d=4: f"{r[k]:>{w}.{d}f}" if k in r else f"{'-':>{w}}"  # noqa: E731
                print(f"{state:<10} {name:<12} {b:>4} {f('ce_value')} {f('kd_value')} {f('sinkhorn_value', 9)} "
                      f"{f('ce_grad')} {f('kd_grad')} {f('sinkhorn_grad', 9)} {f('cos_kd_sinkhorn', 6, 2)} "
                      f"{f('plan_kl_norm', 12, 3)} {f('plan_diag', 6, 3)} {f('cost_over_eps', 6, 2)}")
    teacher_acc = float((z_t.argmax(-1) == labels).double().mean())
    out = {"config": args.config, "teacher": args.teacher, "rows": len(labels), "batches": args.batches,
           "teacher_train_accuracy": teacher_acc, "wall_s": round(time.time() - started, 1), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"teacher train accuracy on these rows {teacher_acc:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
