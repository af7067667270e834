"""Time per call of the cross-vocabulary losses (sinkd.cross_vocab): ULD and MultiLevelOT.

Random logits of the issue's shapes (teacher V_t = 49,152 like SmolLM2, student V_s = 30,522 like the
MiniLM WordPiece), B sequences of T tokens each, the last quarter of each sequence padding on both
sides (different real lengths per side). Forward + backward with respect to the student logits
(teacher detached), median of --repeats calls after one warm-up.

    python benchmarks/cross_vocab_bench.py                       # CPU, B=8, T=128
    python benchmarks/cross_vocab_bench.py --threads 1 --out benchmarks/results/cross_vocab_bench_cpu_1thread.json
    python benchmarks/cross_vocab_bench.py --device cuda --out benchmarks/results/cross_vocab_bench_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sinkd  # noqa: E402


def inputs(b, t, v_s, v_t, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    zs = torch.randn(b, t, v_s, generator=gen).to(device)
    zt = torch.randn(b, t, v_t, generator=gen).to(device) * 2
    ms = torch.ones(b, t, dtype=torch.bool, device=device)
    mt = torch.ones(b, t, dtype=torch.bool, device=device)
    ms[:, t - t // 4:] = False
    mt[:, t - t // 8:] = False
    return zs, zt, ms, mt


def timed(fn, device, repeats):
    times = []
    for i in range(repeats + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--student-vocab", type=int, default=30522)
    parser.add_argument("--teacher-vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (on a loaded CPU, 1 avoids OpenMP spin contention)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/cross_vocab_bench_cpu.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zs, zt, ms, mt = inputs(args.batch, args.tokens, args.student_vocab, args.teacher_vocab, args.device)
    cases = {
        "uld (k=None, full sort)": lambda x: sinkd.uld_loss(x, zt, ms, mt),
        "uld (k=50)": lambda x: sinkd.uld_loss(x, zt, ms, mt, k=50),
        "multilevel_ot (paper, unrolled)": lambda x: sinkd.multilevel_ot_loss(x, zt, ms, mt).total_kd,
        "multilevel_ot (implicit)": lambda x: sinkd.multilevel_ot_loss(x, zt, ms, mt, grad="implicit").total_kd,
    }
    rows = []
    for name, loss in cases.items():
        def call():
            x = zs.detach().requires_grad_()
            loss(x).backward()
        median, low, high = timed(call, args.device, args.repeats)
        rows.append({"loss": name, "median_s": median, "min_s": low, "max_s": high})
    print(f"B={args.batch} T={args.tokens} V_s={args.student_vocab} V_t={args.teacher_vocab} device={args.device} "
          f"threads={torch.get_num_threads()} (forward + backward, median of {args.repeats})")
    print(f"{'loss':<34}{'median s':>10}{'min s':>10}{'max s':>10}")
    for r in rows:
        print(f"{r['loss']:<34}{r['median_s']:>10.3f}{r['min_s']:>10.3f}{r['max_s']:>10.3f}")
    record = {"args": vars(args), "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
