"""How fast a student cut out of SmolLM2-135M's layers recovers: test perplexity before training and
every 50 steps of a plain PyTorch loop distilling from the teacher's top-64 (no Ray, one process).

    python benchmarks/pruned_student_bench.py --zero-shot                  # every candidate, no training
    python benchmarks/pruned_student_bench.py --layers 0-9,20-29 --lr 1e-3 --steps 150

Data as `pipelines/configs/smollm2_wiki.yaml` with 400 articles (64-token blocks, the job's carving).
Training: AdamW (no weight decay), linear warm-up over 10% of the steps then cosine to 0, clipping 1.0,
batch 8 blocks, loss = KL(teacher top-64 + rest bucket || student), which is the cached-teacher KD of
the job without its CE term. The teacher's top-64 are computed once and kept in --cache-file.
Prints one line per evaluation and writes the curve as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

CANDIDATES = {  # name: layers kept of the teacher's 30
    "6 spread": "0,6,12,18,24,29", "15 alternating": "0,2,4,6,8,10,12,14,16,18,20,22,24,26,29",
    "20: 0-9,20-29": "0-9,20-29", "24: 0-11,18-29": "0-11,18-29", "27: 0-13,17-29": "0-13,17-29",
    "29: all but 15": "0-14,16-29", "24: all but 22-27": "0-21,28-29",
}


def parse_layers(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def load(articles: int):
    from pipelines.config import load_config
    from pipelines.config.paths import resolve_paths
    from pipelines.tasks.causal_lm.data import load_lm_task
    from pipelines.tasks.causal_lm.models import hf_teacher_dir, load_causal_lm
    from pipelines.tasks.common import load_tokenizer

    here = os.path.dirname(os.path.abspath(__file__))
    cfg = load_config(os.path.join(here, "..", "pipelines", "configs", "smollm2_wiki.yaml"),
                      [f"lm.max_documents={articles}", "data.max_train_examples=100000", "data.max_eval_examples=48"])
    resolve_paths(cfg)
    teacher_dir = hf_teacher_dir(cfg)
    data = load_lm_task(cfg, load_tokenizer(teacher_dir))
    blocks = {s: torch.tensor(t["input_ids"].to_pylist()) for s, t in data.splits.items()}
    return load_causal_lm(teacher_dir).eval(), blocks


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    was = model.training
    model.eval()
    nll = n = 0
    for i in range(0, len(blocks), 8):
        x = blocks[i:i + 8]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train(was)
    return math.exp(nll / n)


@torch.no_grad()
def teacher_topk(teacher, blocks: torch.Tensor, path: str, k: int = 64):
    """(probs, ids, rest mass) of the teacher at every position of `blocks`, cached in `path`."""
    if os.path.exists(path):
        cached = torch.load(path)
        if len(cached[0]) >= len(blocks):
            return tuple(c[:len(blocks)] for c in cached)
    probs, ids = [], []
    for i in range(0, len(blocks), 16):
        logp = teacher(input_ids=blocks[i:i + 16]).logits[:, :-1].float().log_softmax(-1)
        v, j = logp.topk(k, -1)
        probs.append(v.exp())
        ids.append(j)
    probs, ids = torch.cat(probs), torch.cat(ids)
    out = (probs, ids, (1 - probs.sum(-1)).clamp_min(0))
    torch.save(out, path)
    return out


def topk_kd(student_logits, probs, ids, rest):
    """KL(teacher || student) up to the teacher's entropy, over its top-k and one bucket for the rest."""
    logq = student_logits.log_softmax(-1)
    top = logq.gather(-1, ids)
    rest_q = torch.log1p(-top.exp().sum(-1).clamp_max(1 - 1e-6))
    return (-(probs * top).sum(-1) - rest * rest_q).mean()


def train(teacher, blocks, layers, lr, steps, cache_file, every=50):
    from pipelines.tasks.common import student_from_teacher_layers

    torch.manual_seed(0)
    n = steps * 8
    probs, ids, rest = teacher_topk(teacher, blocks["train"][:n], cache_file)
    student = student_from_teacher_layers(teacher, layers).train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, steps - warm)))))
    curve, tick = [{"step": 0, "test_perplexity": perplexity(student, blocks["test"])}], time.time()
    for step in range(steps):
        sl = slice(step * 8, step * 8 + 8)
        loss = topk_kd(student(input_ids=blocks["train"][sl]).logits[:, :-1].float(), probs[sl], ids[sl], rest[sl])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if (step + 1) % every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "seconds": round(time.time() - tick), "loss": round(loss.item(), 3),
                          "test_perplexity": perplexity(student, blocks["test"])})
            print(f"step {step + 1:>4}  {curve[-1]['seconds']:>5} s  kd {loss.item():.3f}  "
                  f"test perplexity {curve[-1]['test_perplexity']:.1f}", flush=True)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zero-shot", action="store_true", help="perplexity of every candidate, no training")
    ap.add_argument("--layers", default="0-9,20-29")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--articles", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-file", default="runs/pruned_student_top64.pt")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher, blocks = load(args.articles)
    report = {"teacher_test_perplexity": perplexity(teacher, blocks["test"]), "test_blocks": len(blocks["test"])}
    print(f"teacher (30 layers): test perplexity {report['teacher_test_perplexity']:.1f} on {len(blocks['test'])} blocks")
    from pipelines.tasks.common import student_from_teacher_layers

    if args.zero_shot:
        report["zero_shot"] = {}
        for name, spec in CANDIDATES.items():
            ppl = perplexity(student_from_teacher_layers(teacher, parse_layers(spec)), blocks["test"])
            report["zero_shot"][name] = ppl
            print(f"{name:<22} test perplexity {ppl:,.1f}", flush=True)
    else:
        os.makedirs(os.path.dirname(args.cache_file) or ".", exist_ok=True)
        report.update(vars(args), curve=train(teacher, blocks, parse_layers(args.layers), args.lr, args.steps, args.cache_file))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
