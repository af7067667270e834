"""How far an OKD run's trained online block moved its teacher: test perplexity of the teacher with
and without the block (sinkd.online.ResidualAdapter from RUN_DIR/models/sinkd/online.pt), on the test
blocks of the run's config. Prints a table and writes JSON (--out).

    python benchmarks/online_teacher_bench.py /tmp/okd_runs/okd_s0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def teacher_perplexities(config: str, run_dir: str, seed: int, batch_size: int = 8) -> dict:
    from pipelines.tasks import get_task, load_checked_config
    from pipelines.tasks.causal_lm.data import IGNORE, LMCollate
    from pipelines.tasks.causal_lm.models import CausalLM, load_causal_lm
    from sinkd.online import ResidualAdapter

    cfg = load_checked_config(config, [f"seed={seed}"])
    o = cfg.teacher.online
    prepared = get_task("causal_lm").prepare(cfg)
    batch = LMCollate(0)(prepared.data.splits["test"])
    teacher = CausalLM(load_causal_lm(prepared.teacher_dir)).eval()
    state = torch.load(f"{run_dir}/models/sinkd/online.pt")
    block = ResidualAdapter(teacher.model.config.hidden_size, o.rank)
    block.load_state_dict(state)
    labels = batch["labels"][:, 1:]
    out = {"up_norm": float(state["up.weight"].norm())}
    for name, adapter in (("teacher", None), ("teacher_with_block", block)):
        nll, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(labels), batch_size):
                z = teacher(batch["input_ids"][i:i + batch_size], batch["attention_mask"][i:i + batch_size],
                            adapter=adapter, layer=-1 if o.layer is None else o.layer)[:, :-1]
                y = labels[i:i + batch_size]
                keep = y != IGNORE
                nll += F.cross_entropy(z[keep].float(), y[keep], reduction="sum").item()
                n += int(keep.sum())
        out[name] = math.exp(nll / n)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--config", default="pipelines/configs/smollm2_okd.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON file (default RUN_DIR/online_teacher_bench.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    r = teacher_perplexities(args.config, args.run_dir, args.seed)
    print("| teacher | test perplexity |\n|---|---:|")
    print(f"| without the block | {r['teacher']:.4f} |\n| with the trained block | {r['teacher_with_block']:.4f} |")
    print(f"up-projection norm (0 at step 0): {r['up_norm']:.4f}")
    with open(args.out or f"{args.run_dir}/online_teacher_bench.json", "w") as f:
        json.dump({**r, "run_dir": args.run_dir, "seed": args.seed}, f, indent=1)


if __name__ == "__main__":
    main()
