"""Forward+backward benchmark of the batch-wise SinKD loss (issue 2; GPU sizes of issue 5).

Setting (the paper's): p = softmax(z / T) with T=2, L1 cost, eps=0.1, 20 row/column normalisations,
loss sum(P * C); student logits require grad, teacher logits are fixed; fp32.
Implementations:
  official       the reference formulation written out here (cdist, exp(-C/eps), K/K.sum(1), K/K.sum(0))
  sinkd-dense    sinkd.sinkhorn_loss, paper preset, L1 cost through autograd of torch.cdist
  sinkd-chunked  sinkd.sinkhorn_loss, paper preset, the memory-bounded ChunkedL1 backward
  sinkd-implicit sinkd-chunked with grad="implicit" (no stored iterations; one solve in the backward)
  sinkd-envelope sinkd-chunked with grad="envelope" (reports the regularised value, so its loss differs)
  pot            POT's ot.sinkhorn2 on the torch backend (uniform 1/N marginals, scaled by N so that
                 its value is the official one's, whose plan has row and column sums of 1)

    python benchmarks/loss_bench.py                        # CPU grid, or the issue-5 grid when CUDA is present
    python benchmarks/loss_bench.py --device cuda          # 256x32000, 512x32000, 256x151936, 1024x151936
    python benchmarks/loss_bench.py --sizes 128x8000,512x32000 --impls official,sinkd-chunked
    python benchmarks/loss_bench.py --grad-check 64x500      # issue 13: each grad mode vs finite differences

Memory: on CUDA the peak of torch.cuda.max_memory_allocated above what the inputs hold; on CPU each
(impl, size) cell runs in a fresh subprocess and reports its peak-RSS growth over a baseline taken
after imports and input creation (VmHWM reset through /proc/self/clear_refs; ru_maxrss where no /proc).
Contention: on CPU each cell also records the share of the machine's CPU time that other processes
used meanwhile; 10 points above the share of cores left free (--threads) its status says "contended",
the cell is run again (--retries), and times still marked so are not to be trusted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: sinkd lives at the repository root
import sinkd  # noqa: E402

EPS, ITERS, TEMP = 0.1, 20, 2.0
CPU_SIZES = [(n, v) for n in (64, 128, 256) for v in (2, 1000, 8000)]
CUDA_SIZES = [(256, 32000), (512, 32000), (256, 151936), (1024, 151936)]
DENSE_IMPLS = ("official", "sinkd-dense", "pot")  # autograd through torch.cdist


def official(zs, zt):
    """The SinKD reference code, verbatim in spirit: the oracle for values and the baseline for speed."""
    ps, pt = torch.softmax(zs / TEMP, dim=-1), torch.softmax(zt / TEMP, dim=-1)
    C = torch.cdist(ps, pt, p=1)
    K = torch.exp(-C / EPS)
    for _ in range(ITERS):
        K = K / K.sum(1, keepdim=True)
        K = K / K.sum(0, keepdim=True)
    return (K * C).sum()


def sinkd_loss(l1_impl, **options):
    config = sinkd.SinkhornConfig.paper(l1_impl=l1_impl, **options)
    return lambda zs, zt: sinkd.sinkhorn_loss(zs, zt, config)


def pot(zs, zt):
    """POT's plain Sinkhorn-Knopp with autograd through its iterations (stopThr=0: always 20).
    Its plan has mass 1 (marginals 1/N); times N it is the official plan of mass N. POT updates the
    column scaling first, the reference the rows first: before convergence the values differ slightly."""
    import ot

    ps, pt = torch.softmax(zs / TEMP, dim=-1), torch.softmax(zt / TEMP, dim=-1)
    C = torch.cdist(ps, pt, p=1)
    n = C.shape[0]
    a = torch.full((n,), 1.0 / n, dtype=C.dtype, device=C.device)
    return ot.sinkhorn2(a, a, C, reg=EPS, numItermax=ITERS, stopThr=0.0) * n


IMPLS = {"official": official, "sinkd-dense": sinkd_loss("dense"), "sinkd-chunked": sinkd_loss("chunked"), "pot": pot,
         "sinkd-implicit": sinkd_loss("chunked", grad="implicit"), "sinkd-envelope": sinkd_loss("chunked", grad="envelope")}


def grad_check(n, v, seed=0, h=1e-6):
    """float64, paper preset: for each grad mode, at 20 iterations and converged (tol 1e-13), the
    relative L2 gap of its logit gradient to unrolled autograd at the same iterations, and the gap
    between its directional derivative along a random direction and the central finite difference
    of the loss that mode reports (converged)."""
    gen = torch.Generator().manual_seed(seed)
    zs, zt = (2 * torch.randn(2, n, v, generator=gen, dtype=torch.float64)).unbind(0)
    direction = torch.randn(n, v, generator=gen, dtype=torch.float64)
    rows = []
    for label, solver in (("20 iterations", {}), ("converged", {"max_iter": 100_000, "tol": 1e-13})):
        grads = {}
        for grad in ("unrolled", "implicit", "envelope"):
            cfg = sinkd.SinkhornConfig.paper(grad=grad, **solver)
            z = zs.clone().requires_grad_()
            loss = sinkd.sinkhorn_loss(z, zt, cfg)
            (grads[grad],) = torch.autograd.grad(loss, z)
            fd = (sinkd.sinkhorn_loss(zs + h * direction, zt, cfg) - sinkd.sinkhorn_loss(zs - h * direction, zt, cfg)) / (2 * h)
            rows.append({"iterations": label, "grad": grad, "loss": float(loss),
                         "rel_gap_to_unrolled": float((grads[grad] - grads["unrolled"]).norm() / grads["unrolled"].norm()),
                         "rel_gap_directional_fd": float(abs((grads[grad] * direction).sum() - fd) / abs(fd))})
        # The measure: envelope's gradient against the gradient of <P, C> (unrolled = implicit here).
        rows[-1]["rel_gap_envelope_vs_d_transport"] = float((grads["envelope"] - grads["implicit"]).norm() / grads["implicit"].norm())
    return rows


def cost_gradient_gaps(seeds=range(5), shape=(7, 5), eps=0.1):
    """The issue's reproducer: C = rand(7, 5) float64, sinkhorn(C, 0.1, max_iter=300, grad=g).cost; the
    relative L2 gap of each mode's dC gradient to unrolled autograd, per seed."""
    out = []
    for seed in seeds:
        cost = torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()
        g = {m: torch.autograd.grad(sinkd.sinkhorn(cost, eps, max_iter=300, grad=m).cost, cost)[0] for m in ("unrolled", "implicit", "envelope")}
        out.append({"seed": seed, **{f"rel_gap_{m}": float((g[m] - g["unrolled"]).norm() / g["unrolled"].norm()) for m in ("implicit", "envelope")}})
    return out


def make_inputs(n, v, device, seed=0):
    """Same seed -> same logits in the parent and in each CPU subprocess, so values can be compared."""
    gen = torch.Generator().manual_seed(seed + 1000 * n + v)
    zs = torch.randn(n, v, generator=gen).to(device).requires_grad_()
    zt = torch.randn(n, v, generator=gen).to(device)
    return zs, zt


def dense_need_bytes(n, v, device):
    """What autograd through cdist(p=1) needs. CUDA's _cdist_backward allocates one (N, N, V) buffer
    and sums it; the CPU kernel accumulates straight into the (N, V) gradient (no blow-up)."""
    if device == "cuda":
        return n * n * v * 4 + 8 * n * v * 4
    return 8 * n * v * 4 + 64 * n * n * 4


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def proc_status_bytes(field):
    status = Path("/proc/self/status").read_text().split("\n") if Path("/proc/self/status").exists() else []
    return next((int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":")), None)


def peak_rss_bytes():
    """VmHWM, not ru_maxrss: after fork+exec, ru_maxrss also keeps the parent's (larger) RSS
    inherited by the forked copy, and /proc/self/clear_refs does not reset that part."""
    hwm = proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_file_bytes():
    """File-backed resident pages (shared libraries): the kernel may evict them under memory pressure
    from other processes and fault them back in during the run; that is not the loss's memory."""
    return proc_status_bytes("RssFile") or 0


def rss_baseline_bytes():
    """Reset the peak RSS (Linux: 5 > /proc/self/clear_refs) and return the current RSS. Without the
    reset the baseline would be the import-time high-water mark, which hides a small loss's memory."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def time_fwd_bwd(loss_fn, zs, zt, device, warmup, repeats):
    """(ms of each forward+backward after `warmup` untimed ones, the last loss)."""
    times = []
    for i in range(warmup + repeats):
        zs.grad = None
        sync(device)
        start = time.perf_counter()
        loss = loss_fn(zs, zt)
        loss.backward()
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times, loss


def measure_cell(impl, n, v, device, warmup, repeats):
    """Median forward+backward time and peak memory of one (impl, size) in this process.
    The baseline is taken after imports, a tiny warm-up and input creation: only the loss's own memory counts."""
    if impl == "pot":
        import ot  # noqa: F401  (imported before the baseline: its modules are not the loss's memory)
    IMPLS[impl](*make_inputs(4, 8, device)).backward()  # one-off lazy initialisation (thread pools, CUDA
    zs, zt = make_inputs(n, v, device)                   # context, kernels) is not the loss's memory
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, file_base = rss_baseline_bytes(), rss_file_bytes()
    times, loss = time_fwd_bwd(IMPLS[impl], zs, zt, device, warmup, repeats)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes() - max(0, rss_file_bytes() - file_base)
    return {"status": "ok", "ms": statistics.median(times), "ms_min": min(times), "ms_all": times,
            "peak_mib": (peak - base) / 2**20, "loss": float(loss.detach())}


def cpu_seconds():
    """(busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process and its children)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return busy / os.sysconf("SC_CLK_TCK"), sum(r.ru_utime + r.ru_stime for r in own)


def run_cell(impl, n, v, device, args):
    """One cell: in-process on CUDA (OOM is catchable); on CPU in a fresh subprocess (clean peak RSS),
    run again up to --retries times while other processes compete for the cores."""
    if device == "cuda":
        try:
            result = measure_cell(impl, n, v, device, args.warmup, args.repeats)
        except torch.cuda.OutOfMemoryError:
            result = {"status": "OOM"}
        torch.cuda.empty_cache()  # outside the except block: the traceback no longer pins the graph
        return result
    best = None
    for _ in range(1 + args.retries):
        result = run_cpu_subprocess(impl, n, v, args)
        if best is None or result.get("other_cpu_share", 1.0) < best.get("other_cpu_share", 1.0):
            best = result
        if not best["status"].startswith("contended"):
            break
    return best


def run_cpu_subprocess(impl, n, v, args):
    """One CPU cell in a child process; the machine's busy time minus our own tells contention."""
    cmd = [sys.executable, __file__, "--cell", f"{impl}:{n}x{v}", "--device", "cpu",
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(torch.get_num_threads())]
    cpus = len(os.sched_getaffinity(0))
    (busy0, own0), start = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (busy1, own1), wall = cpu_seconds(), time.perf_counter() - start
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * cpus)
    if proc.returncode < 0:  # killed by a signal: on Linux, the OOM killer's SIGKILL
        return {"status": f"OOM (signal {-proc.returncode})"}
    if proc.returncode != 0:
        return {"status": "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["other_cpu_share"] = other
    if other > max(0, cpus - torch.get_num_threads()) / cpus + 0.10:  # more than the cores we leave free
        result["status"] = f"contended ({other:.0%} of CPU used by other processes)"
    return result


def reference_loss(n, v, device):
    """The official value by a forward pass alone (O(N^2) memory), so every row has a reference
    even where the official forward+backward is skipped or runs out of memory."""
    zs, zt = make_inputs(n, v, device)
    with torch.no_grad():
        return float(official(zs, zt))


def machine_info(device):
    """What a reader needs to compare figures across machines."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    try:
        import ot
        pot_version = ot.__version__
    except ImportError:
        pot_version = None
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info = {"device": device, "cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "pot": pot_version,
            "sinkd": sinkd.__version__, "git": git.stdout.strip() or None, "loadavg_at_start": os.getloadavg()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def memory_measure(device):
    if device == "cuda":
        return "peak torch.cuda.max_memory_allocated above the inputs, same process"
    return ("peak RSS (VmHWM, reset via /proc/self/clear_refs after imports and inputs) minus the RSS then "
            "and minus re-faulted library pages, one fresh process per cell")


def format_table(rows, info, command):
    """Markdown: a header naming machine and memory measure, then one line per (size, impl)."""
    where = f"{info['gpu']} ({info['gpu_mem_gib']} GiB), CUDA {info['cuda']}" if info["device"] == "cuda" else info["cpu"]
    lines = [
        f"Machine: {where}; CPU {info['cpu']}, {info['cpus']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), POT {info['pot']}, git {info['git']}",
        f"Command: `{command}`",
        f"Memory: {memory_measure(info['device'])}. fp32, L1 cost, eps {EPS}, {ITERS} iterations, T {TEMP:g}.",
        "",
        "| N | V | impl | ms fwd+bwd (median) | peak MiB | loss | rel. diff vs official | status |",
        "|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ok = "ms" in r
        cells = [r["n"], r["v"], r["impl"], f"{r['ms']:.1f}" if ok else "-", f"{r['peak_mib']:.0f}" if ok else "-",
                 f"{r['loss']:.6g}" if ok else "-", f"{r['rel_diff']:.1e}" if ok else "-", r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def parse_size(text):
    n, v = text.lower().split("x")
    return int(n), int(v)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")], help="NxV,... (default: by device)")
    ap.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, help="timed runs per cell (default 3 on CPU, 5 on CUDA)")
    ap.add_argument("--max-dense-gb", type=float,
                    help="skip cdist-autograd impls needing more (default 8 on CPU, the GPU's memory on CUDA)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    ap.add_argument("--retries", type=int, default=2, help="CPU: extra runs of a cell that other processes slowed")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/loss_bench_<device>.json)")
    ap.add_argument("--grad-check", type=parse_size, help="NxV: gradient accuracy of each grad mode (float64), then exit")
    ap.add_argument("--cell", help=argparse.SUPPRESS)  # internal: IMPL:NxV, one CPU cell in a subprocess
    args = ap.parse_args(argv)
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        ap.error(f"--impls: unknown {unknown}; valid: {', '.join(IMPLS)}")
    return args


def skip_reason(impl, n, v, device, cap_gb, have_pot):
    """Why a cell is not run, or None: POT missing, or a cdist-autograd impl over the memory cap."""
    if impl == "pot" and not have_pot:
        return "skipped (POT not installed)"
    need = dense_need_bytes(n, v, device) / 1e9
    if impl in DENSE_IMPLS and need > cap_gb:
        return f"skipped (needs {need:.1f} GB > --max-dense-gb {cap_gb:g})"
    return None


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("loss_bench: --device cuda but torch.cuda.is_available() is False")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    args.repeats = args.repeats or (5 if device == "cuda" else 3)
    if args.grad_check:
        command = "python benchmarks/loss_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        rows = grad_check(*args.grad_check)
        costs = cost_gradient_gaps()
        for r in costs:
            print(f"cost rand(7, 5) seed {r['seed']}: dC gap to unrolled: implicit {r['rel_gap_implicit']:.1e}, envelope {r['rel_gap_envelope']:.1%}")
        print("| iterations | grad | loss | rel. gap to unrolled | rel. gap directional FD |\n|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['iterations']} | {r['grad']} | {r['loss']:.6f} | {r['rel_gap_to_unrolled']:.2e} | {r['rel_gap_directional_fd']:.2e} |")
        out = args.out or ROOT / "benchmarks" / "results" / "loss_bench_grad_check.json"
        out.write_text(json.dumps({"machine": machine_info("cpu"), "command": command, "size": args.grad_check, "rows": rows,
                                   "issue_reproducer_cost_gradients": costs}, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
        return
    if args.cell:  # child: measure one cell, print one JSON line
        impl, size = args.cell.split(":")
        print(json.dumps(measure_cell(impl, *parse_size(size), device, args.warmup, args.repeats)))
        return
    sizes = args.sizes or (CUDA_SIZES if device == "cuda" else CPU_SIZES)
    info = machine_info(device)
    cap_gb = args.max_dense_gb if args.max_dense_gb is not None else (info["gpu_mem_gib"] * 2**30 / 1e9 if device == "cuda" else 8.0)
    command = "python benchmarks/loss_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    for n, v in sizes:
        ref = reference_loss(n, v, device)
        for impl in args.impls:
            row = {"impl": impl, "n": n, "v": v, "reference_loss": ref}
            reason = skip_reason(impl, n, v, device, cap_gb, info["pot"] is not None)
            row.update({"status": reason} if reason else run_cell(impl, n, v, device, args))
            if "loss" in row:
                row["rel_diff"] = abs(row["loss"] - ref) / abs(ref) if ref else abs(row["loss"])
            rows.append(row)
            print(f"{impl:>14} {n}x{v}: {row['status']} {row.get('ms', float('nan')):.1f} ms", file=sys.stderr, flush=True)
    print(format_table(rows, info, command))
    out = args.out or ROOT / "benchmarks" / "results" / f"loss_bench_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"eps": EPS, "iterations": ITERS, "temperature": TEMP, "dtype": "float32", "warmup": args.warmup,
                "repeats": args.repeats, "max_dense_gb": cap_gb, "memory_measure": memory_measure(device)}
    out.write_text(json.dumps({"machine": info, "command": command, "settings": settings, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
