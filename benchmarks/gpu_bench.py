"""Issue 5's whole table in one command: kernels' correctness, arithmetic floor, large-N loss, official
vs POT vs sinkd, largest N that fits, top-k error on real teacher logits.

    python benchmarks/gpu_bench.py --device cuda            # the GPU table (H100 sizes)
    python benchmarks/gpu_bench.py --device cpu --quick     # same code at small sizes; Triton kernels
                                                            # through its CPU interpreter
    python benchmarks/gpu_bench.py --device cuda --parts e,a,b   # a subset (each part alone fits 10 min)

Parts (run in this order; e first, and a failed check stops the run with exit status 1):
  e  correctness: Triton L1 cost, dC/dx, dC/dy (fp32 and bf16 inputs), the fused softmax-L1 cost and
     its gradients, and the split-bf16 tensor-core sqeuclidean/cosine costs vs float64 references on
     fresh random inputs (seed printed); fp32 <= 1e-4, bf16 inputs <= 1e-2 relative (max abs error
     over max abs reference).
  a  fp32 arithmetic floor (fp32 matmul TFLOP/s, TF32 off, measured here) and the L1 loss
     forward+backward at N x V (8192 x 151,936 on CUDA): time vs 1.5 x (5 N^2 V / floor), extra
     memory vs 4 N V bytes + O(N^2). Also the plain fp32 add rate (a Triton kernel of independent
     add chains), the other reading of "fp32 rate": an FMA counts two operations, an add one.
  b  256 x 32,000: official formulation vs POT vs sinkd, time and peak memory, speed-up and ratio.
  c  largest N at V=151,936 that fits, per implementation (OOM caught, memory freed between tries).
  d  top-k (k = 64, 256, 1024) time and error vs the full vocabulary on SmolLM2-135M logits.

Loss everywhere: p = softmax(z / 2), L1 cost, eps 0.1, 20 row/column normalisations with marginals
of 1 (the paper's), loss sum(P * C), gradient wrt the student logits, fp32 logits.
Implementations: official (benchmarks/loss_bench.py's copy of the reference formulation), pot
(ot.sinkhorn2 on the torch backend), sinkd (sinkd.sinkhorn_loss with SinkhornConfig.paper(grad="implicit"):
on CUDA the L1 cost is built from the logits inside the Triton kernels, no softmax output stored),
sinkd-unrolled (the same with the default unrolled Sinkhorn gradient, which keeps every iteration).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import loss_bench  # noqa: E402  (official formulation, POT wrapper, RSS helpers)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import sinkd  # noqa: E402
from sinkd.kernels import softmax_l1_cost  # noqa: E402

EPS, ITERS, TEMP = 0.1, 20, 2.0
FULL = {"a": (8192, 151_936), "b": (256, 32_000), "c_vocab": 151_936,
        "e": [(1, 1000, 777, 4099), (2, 257, 129, 32_000), (1, 64, 48, 3001)],
        "matmul": 8192, "add": (16, 32768), "repeats": 3, "topk": (2, 256)}
QUICK = {"a": (40, 400), "b": (32, 600), "c_vocab": 300, "e": [(1, 37, 29, 301), (2, 19, 23, 77)],
         "matmul": 512, "add": (2, 4), "repeats": 1, "topk": (1, 128)}


# ---------------------------------------------------------------- implementations
# l1_impl "triton" is what "auto" picks on CUDA; on the CPU it runs the same kernels through the interpreter.
PAPER = sinkd.SinkhornConfig.paper(eps=EPS, max_iter=ITERS, temperature=TEMP, l1_impl="triton")


def sinkd_implicit(zs, zt):
    return sinkd.sinkhorn_loss(zs, zt, PAPER, grad="implicit")


def sinkd_unrolled(zs, zt):
    return sinkd.sinkhorn_loss(zs, zt, PAPER)


IMPLS = {"official": loss_bench.official, "pot": loss_bench.pot, "sinkd": sinkd_implicit, "sinkd-unrolled": sinkd_unrolled}


# ---------------------------------------------------------------- measurement
class Meter:
    """Peak memory above a baseline: CUDA allocator statistics, or peak RSS on CPU (loss_bench's way)."""

    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self.file_base = loss_bench.rss_baseline_bytes(), loss_bench.rss_file_bytes()

    def peak_bytes(self):
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return loss_bench.peak_rss_bytes() - max(0, loss_bench.rss_file_bytes() - self.file_base) - self.base


sync = loss_bench.sync


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def make_inputs(n, v, device, seed=0):
    """Standard normal logits drawn on the device itself (CPU draws of 2 x 1.2G numbers would take
    longer than the loss at N=8192, V=152k); the same seed gives the same logits on that device."""
    gen = torch.Generator(device=device).manual_seed(seed + 1000 * n + v)
    zs = torch.randn(n, v, generator=gen, device=device).requires_grad_()
    zt = torch.randn(n, v, generator=gen, device=device)
    return zs, zt


def reference_loss(n, v, device):
    """The official value from a forward pass alone (O(N^2) memory) on the same inputs."""
    zs, zt = make_inputs(n, v, device)
    with torch.no_grad():
        return float(loss_bench.official(zs, zt))


def run_loss(impl, n, v, device, repeats, warmup=1):
    """Median forward+backward ms and peak extra bytes (over the inputs) of one implementation."""
    zs, zt = make_inputs(n, v, device)
    meter = Meter(device)
    meter.start()
    times, loss = loss_bench.time_fwd_bwd(IMPLS[impl], zs, zt, device, warmup, repeats)
    out = {"ms": statistics.median(times), "ms_all": times, "peak_extra_bytes": meter.peak_bytes(), "loss": float(loss.detach())}
    del zs, zt, loss
    return out


def try_loss(impl, n, v, device, mem_cap):
    """One forward+backward; 'ok', 'OOM' (allocator, or over mem_cap bytes on CPU) with its peak."""
    try:
        result = run_loss(impl, n, v, device, repeats=1, warmup=0)
        status = "ok" if mem_cap is None or result["peak_extra_bytes"] <= mem_cap else "OOM (over --mem-cap)"
    except torch.cuda.OutOfMemoryError:
        result, status = {}, "OOM"
    except RuntimeError as err:  # POT / cuBLAS can surface allocation failures as plain RuntimeErrors
        if "out of memory" not in str(err).lower():
            raise
        result, status = {}, "OOM"
    free(device)  # outside the except blocks: the traceback no longer pins the graph
    return status, result


# ---------------------------------------------------------------- part e: correctness
def rel(got, ref):
    ref = ref.double()
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def l1_reference(x, y, w):
    """float64 cost and both gradients of sum(W * C), rows in chunks (never the whole N x M x V at once)."""
    x64, y64, w64 = x.double(), y.double(), w.double()
    cost = torch.cdist(x64, y64, p=1)
    gx, gy = torch.zeros_like(x64), torch.zeros_like(y64)
    budget = 1 << 25
    step = max(1, budget // max(y.shape[1] * x.shape[2], 1))
    for b in range(x.shape[0]):
        for i0 in range(0, x.shape[1], step):
            sign = torch.sign(x64[b, i0 : i0 + step, None, :] - y64[b, None, :, :])
            gx[b, i0 : i0 + step] = torch.einsum("ij,ijv->iv", w64[b, i0 : i0 + step], sign)
            gy[b] -= torch.einsum("ij,ijv->jv", w64[b, i0 : i0 + step], sign)
            del sign
    return cost, gx, gy


def part_e(sizes, device, seed):
    """Fresh random inputs; every check's relative error and tolerance; ok False if any is off."""
    from sinkd.kernels import l1

    gen = torch.Generator().manual_seed(seed)
    checks = []

    def check(name, got, ref, tol):
        err = rel(got, ref)
        checks.append({"check": name, "rel_err": err, "tol": tol, "ok": bool(err <= tol)})

    for batch, n, m, d in sizes:
        x = torch.rand(batch, n, d, generator=gen).to(device)
        y = torch.rand(batch, m, d, generator=gen).to(device)
        w = torch.rand(batch, n, m, generator=gen).to(device)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2)):
            xd, yd = x.to(dtype), y.to(dtype)
            ref_c, ref_gx, ref_gy = l1_reference(xd, yd, w)  # float64 of exactly the kernel's inputs
            tag = f"{batch}x{n}x{m}x{d} {str(dtype).split('.')[-1]}"
            check(f"l1 cost {tag}", l1.l1_cost(xd, yd), ref_c, tol)
            check(f"l1 dC/dx {tag}", l1.l1_grad(xd, yd, w, "x"), ref_gx, tol)
            check(f"l1 dC/dy {tag}", l1.l1_grad(xd, yd, w, "y"), ref_gy, tol)
            del ref_gx, ref_gy
        # fused softmax-L1 from logits vs float64 autograd of cdist(softmax, softmax)
        zs = (3 * torch.randn(batch, n, d, generator=gen)).to(device)
        zt = (3 * torch.randn(batch, m, d, generator=gen)).to(device)
        zs64, zt64 = zs.double().requires_grad_(), zt.double().requires_grad_()
        ref = torch.cdist(torch.softmax(zs64 / TEMP, -1), torch.softmax(zt64 / TEMP, -1), p=1)
        if n * m * d <= 1 << 26:  # float64 autograd through cdist is N x M x V on CUDA: small sizes only
            ref_gs, ref_gt = torch.autograd.grad((ref * w.double()).sum(), (zs64, zt64))
            s, t = zs.clone().requires_grad_(), zt.clone().requires_grad_()
            cost = softmax_l1_cost(s, t, TEMP)
            cost.backward(w)
            check(f"softmax-l1 cost {batch}x{n}x{m}x{d} float32", cost, ref.detach(), 1e-4)
            check(f"softmax-l1 dC/dzs {batch}x{n}x{m}x{d} float32", s.grad, ref_gs, 1e-4)
            check(f"softmax-l1 dC/dzt {batch}x{n}x{m}x{d} float32", t.grad, ref_gt, 1e-4)
        else:
            check(f"softmax-l1 cost {batch}x{n}x{m}x{d} float32", softmax_l1_cost(zs, zt, TEMP), ref.detach(), 1e-4)
        del zs64, zt64, ref
        free(device)
    # tensor-core costs: split-bf16 products for fp32, one bf16 product for bf16 inputs
    for name in ("sqeuclidean", "cosine"):
        x = (torch.randn(2, 300, 1024, generator=gen) * 0.1).to(device)
        y = (torch.randn(2, 200, 1024, generator=gen) * 0.1 + 0.05).to(device)
        ref = sinkd.cost_matrix(x.double(), y.double(), name, precision="fp32")
        check(f"{name} tensor-core float32", sinkd.cost_matrix(x, y, name, precision="bf16x3"), ref, 1e-4)
        xb, yb = x.bfloat16(), y.bfloat16()
        ref_b = sinkd.cost_matrix(xb.double(), yb.double(), name, precision="fp32")
        check(f"{name} tensor-core bfloat16", sinkd.cost_matrix(xb, yb, name), ref_b, 1e-2)
    return checks


# ---------------------------------------------------------------- part a: floor and the large loss
def fp32_matmul_tflops(size, device, repeats=10):
    """fp32 GEMM rate with TF32 off: the arithmetic floor the loss is compared with."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        a @ b
        times = [_timed_call(lambda: a @ b, device) for _ in range(repeats)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return 2 * size**3 / statistics.median(times) / 1e12


@triton.jit
def _fadd_chains(out_ptr, step, iters, BLOCK: tl.constexpr):
    """8 independent chains of fp32 adds per element: no FMA to pair them, no reassociation allowed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a0 = offs.to(tl.float32) * 1e-7
    a1, a2, a3, a4, a5, a6, a7 = a0 + 1, a0 + 2, a0 + 3, a0 + 4, a0 + 5, a0 + 6, a0 + 7
    for _ in range(iters):
        a0 += step
        a1 += step
        a2 += step
        a3 += step
        a4 += step
        a5 += step
        a6 += step
        a7 += step
    tl.store(out_ptr + offs, a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7)


def fp32_add_tops(device, blocks_per_sm, iters, repeats=5):
    """Plain fp32 add rate (one operation an instruction, where the matmul rate counts an FMA as two):
    the rate the L1 kernels' subtract / |.| / compare / select work issues at."""
    block = 1024
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 1
    elements = sms * blocks_per_sm * block
    out = torch.empty(elements, device=device)
    grid = (elements // block,)

    def launch():
        _fadd_chains[grid](out, 1e-3, iters, BLOCK=block, num_warps=8, enable_fp_fusion=False)

    launch()  # compiles
    times = [_timed_call(launch, device) for _ in range(repeats)]
    return 8 * elements * iters / statistics.median(times) / 1e12


def _timed_call(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def part_a(n, v, device, matmul_size, repeats, impls, add_size):
    tflops = fp32_matmul_tflops(matmul_size, device)
    add_tops = fp32_add_tops(device, *add_size)
    ops = 5 * n * n * v
    floor_ms = ops / (tflops * 1e12) * 1e3
    add_floor_ms = ops / (add_tops * 1e12) * 1e3
    budget_bytes = 4 * n * v
    rows = []
    for impl in impls:
        status, r = "ok", {}
        try:
            r = run_loss(impl, n, v, device, repeats)
        except torch.cuda.OutOfMemoryError:
            status = "OOM"
        free(device)
        row = {"impl": impl, "n": n, "v": v, "status": status, **r}
        if r:
            row.update(ratio_to_floor=r["ms"] / floor_ms, meets_time=r["ms"] <= 1.5 * floor_ms,
                       ratio_to_add_floor=r["ms"] / add_floor_ms,
                       extra_over_4nv_in_n2_floats=(r["peak_extra_bytes"] - budget_bytes) / (4 * n * n))
        rows.append(row)
    return {"fp32_matmul_tflops": tflops, "matmul_size": matmul_size, "fp32_add_tops": add_tops, "add_floor_ms": add_floor_ms,
            "ops_5n2v": ops, "floor_ms": floor_ms,
            "target_ms": 1.5 * floor_ms, "budget_4nv_bytes": budget_bytes, "rows": rows}


# ---------------------------------------------------------------- part b: 256 x 32k
def part_b(n, v, device, repeats, have_pot):
    ref = reference_loss(n, v, device)
    rows = {}
    for impl in IMPLS:
        if impl == "pot" and not have_pot:
            rows[impl] = {"status": "not installed"}
            continue
        try:
            rows[impl] = {"status": "ok", **run_loss(impl, n, v, device, repeats)}
            rows[impl]["rel_diff_vs_official_value"] = abs(rows[impl]["loss"] - ref) / abs(ref)
        except torch.cuda.OutOfMemoryError:
            rows[impl] = {"status": "OOM"}
        free(device)
    base = rows["official"]
    for impl, r in rows.items():
        if "ms" in r and "ms" in base:
            r["speedup_vs_official"] = base["ms"] / r["ms"]
            r["memory_ratio_official_over_this"] = base["peak_extra_bytes"] / max(r["peak_extra_bytes"], 1)
    return {"n": n, "v": v, "reference_loss": ref, "rows": rows}


# ---------------------------------------------------------------- part c: largest N
def largest_n(impl, v, device, start, step, mem_cap, deadline):
    """Largest N whose forward+backward fits. Three small tries give peak(N) = c + a N + b N^2, which
    predicts the limit; then growth by 25% steps until a try fails and bisection down to `step`.
    Stops at the deadline with what is known. CUDA: peak = inputs + extra vs free memory at start;
    CPU: extra vs mem_cap."""
    import math

    tries, peaks = [], {}
    capacity = mem_cap if device != "cuda" else torch.cuda.mem_get_info()[0]

    def fits(n):
        status, r = try_loss(impl, n, v, device, mem_cap)
        inputs = 0 if device != "cuda" else 2 * 4 * n * v
        if "peak_extra_bytes" in r:
            peaks[n] = r["peak_extra_bytes"] + inputs
        tries.append({"n": n, "status": status, "s": r.get("ms", 0) / 1e3, "peak_extra_bytes": r.get("peak_extra_bytes")})
        print(f"  [c] {impl} N={n}: {status} {r.get('ms', 0) / 1e3:.1f} s", file=sys.stderr, flush=True)
        return status == "ok"

    def done(note=None):
        out = {"largest_n": lo, "first_failing_n": hi, "step": step, "tries": tries, "exact": note is None}
        return {**out, "note": note} if note else out

    lo, hi = 0, None
    probes = (start, 2 * start, 4 * start)
    for n in probes:
        if not fits(n):
            hi = n
            break
        lo = n
    n = None
    if hi is None and all(p in peaks for p in probes):
        # peak(N) = c + a N + b N^2 through the three probes (inputs and gradients ~ N V, plans ~ N^2,
        # cdist's backward ~ N^2 V), solved for peak(N) = capacity.
        import numpy as np

        coef = np.linalg.solve(np.array([[1.0, q, q * q] for q in probes]), np.array([peaks[q] for q in probes], dtype=float))
        c, a, b = (float(t) for t in coef)
        if b > 0:
            n = (-a + math.sqrt(max(a * a - 4 * b * (c - capacity), 0.0))) / (2 * b)
        elif a > 0:
            n = (capacity - c) / a
        n = max(int(n) // step * step, lo + step) if n else None
    while hi is None:
        if time.monotonic() > deadline:
            return done("time budget reached while growing")
        n = n or 2 * lo
        if fits(n):
            lo, n = n, max(int(n * 1.25) // step * step, n + step)
        else:
            hi = n
    while hi - lo > step:
        if time.monotonic() > deadline:
            return done(f"time budget reached between {lo} and {hi}")
        mid = max((lo + hi) // 2 // step * step, lo + step)
        if mid >= hi:
            break
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return done()


def part_c(v, device, have_pot, mem_cap, budget_s, quick, impls):
    starts = {"official": (32, 16), "pot": (32, 16), "sinkd": (1024, 1024), "sinkd-unrolled": (1024, 1024)}
    if quick:
        starts = {k: (16, 8) for k in starts}
    starts = {k: s for k, s in starts.items() if k in impls}
    out = {"v": v, "mem_cap_bytes": mem_cap}
    for impl, (start, step) in starts.items():
        if impl == "pot" and not have_pot:
            out[impl] = {"largest_n": None, "note": "not installed"}
            continue
        out[impl] = largest_n(impl, v, device, start, step, mem_cap, time.monotonic() + budget_s)
    return out


# ---------------------------------------------------------------- part d: top-k on real logits
def part_d(device, cache, sequences, seq_len, ks, repeats):
    import topk_bench

    class A:
        pass

    args = A()
    args.cache, args.sequences, args.seq_len = cache, sequences, seq_len
    try:
        zt, info = topk_bench.load_logits(args, device)
    except Exception as err:  # noqa: BLE001  (missing package, file or model support: report it, keep the table)
        return {"status": f"teacher logits unavailable: {type(err).__name__}: {err}".splitlines()[0]}
    zs = topk_bench.student_from(zt, 1.0)
    return {"status": "ok", "info": info, "n": zt.shape[0], "v": zt.shape[1], "noise": 1.0,
            "rows": topk_bench.compare(zs, zt, ks, repeats)}


# ---------------------------------------------------------------- report
def gib(b):
    return b / 2**30


def fmt_mem(b):
    return "-" if b is None else (f"{gib(b):.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB")


def report(res) -> str:
    load = res["machine"].get("loadavg_at_start")
    lines = [f"# gpu_bench — {res['machine']['where']}", f"Command: `{res['command']}`",
             f"Load average at start (1/5/15 min): {load}" if res["machine"]["device"] == "cpu" else "", ""]
    if "e" in res:
        lines += [f"## (e) kernel correctness vs float64 (seed {res['e']['seed']})", "",
                  "| check | rel. error | tolerance | ok |", "|---|---:|---:|---|"]
        lines += [f"| {c['check']} | {c['rel_err']:.2e} | {c['tol']:.0e} | {'ok' if c['ok'] else 'FAIL'} |" for c in res["e"]["checks"]]
        lines.append("")
    if "a" in res:
        a = res["a"]
        lines += [f"## (a) floor and the L1 loss at N={a['rows'][0]['n']}, V={a['rows'][0]['v']}", "",
                  f"fp32 matmul (TF32 off, {a['matmul_size']}^3): {a['fp32_matmul_tflops']:.2f} TFLOP/s; "
                  f"5 N^2 V = {a['ops_5n2v']:.3e} ops -> floor {a['floor_ms']:.1f} ms, target 1.5x = {a['target_ms']:.1f} ms; "
                  f"memory budget 4 N V = {fmt_mem(a['budget_4nv_bytes'])} + O(N^2) (N^2 fp32 = {fmt_mem(4 * a['rows'][0]['n'] ** 2)})", "",
                  f"Second reading of 'fp32 rate': plain fp32 adds (an add is one op, an FMA two): {a['fp32_add_tops']:.2f} Tops/s "
                  f"-> 5 N^2 V takes {a['add_floor_ms']:.1f} ms ('x add floor').", "",
                  "| impl | status | ms fwd+bwd | x floor | <= 1.5x floor | x add floor | extra memory | (extra - 4NV) / (4 N^2) |",
                  "|---|---|---:|---:|---|---:|---:|---:|"]
        for r in a["rows"]:
            if "ms" in r:
                lines.append(f"| {r['impl']} | {r['status']} | {r['ms']:.1f} | {r['ratio_to_floor']:.2f} | {r['meets_time']} | "
                             f"{r['ratio_to_add_floor']:.2f} | {fmt_mem(r['peak_extra_bytes'])} | {r['extra_over_4nv_in_n2_floats']:.1f} |")
            else:
                lines.append(f"| {r['impl']} | {r['status']} | - | - | - | - | - | - |")
        lines.append("")
    if "b" in res:
        b = res["b"]
        lines += [f"## (b) N={b['n']}, V={b['v']}: official vs POT vs sinkd", "",
                  "| impl | status | ms fwd+bwd | peak extra memory | speed-up vs official | official memory / this | value rel. diff |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for impl, r in b["rows"].items():
            if "ms" in r:
                lines.append(f"| {impl} | ok | {r['ms']:.1f} | {fmt_mem(r['peak_extra_bytes'])} | {r.get('speedup_vs_official', float('nan')):.2f} | "
                             f"{r.get('memory_ratio_official_over_this', float('nan')):.1f} | {r['rel_diff_vs_official_value']:.1e} |")
            else:
                lines.append(f"| {impl} | {r['status']} | - | - | - | - | - |")
        lines.append("")
    if "c" in res:
        c = res["c"]
        cap = "" if c["mem_cap_bytes"] is None else f" (CPU: 'fits' = peak extra <= {fmt_mem(c['mem_cap_bytes'])})"
        lines += [f"## (c) largest N at V={c['v']}{cap}", "", "| impl | largest N | first failing N | tries | note |", "|---|---:|---:|---:|---|"]
        for impl in [k for k in IMPLS if k in c]:
            r = c[impl]
            lines.append(f"| {impl} | {r.get('largest_n')} | {r.get('first_failing_n', '-')} | {len(r.get('tries', []))} | {r.get('note', '')} |")
        lines.append("")
    if "d" in res:
        d = res["d"]
        lines += ["## (d) top-k vs full vocabulary", ""]
        if d["status"] != "ok":
            lines.append(d["status"])
        else:
            import topk_bench

            lines += [f"N={d['n']} tokens x V={d['v']}, {d['info']['teacher']} on {d['info']['text']} ({d['info']['source']}); "
                      f"student = teacher logits + {d['noise']:g} * N(0,1); paper preset", "", topk_bench.format_rows(d["rows"])]
        lines.append("")
    return "\n".join(lines)


def machine(device):
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET"), "loadavg_at_start": os.getloadavg()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import ot

        info["pot"] = ot.__version__
    except ImportError:
        info["pot"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        info["where"] = f"{props.name} ({info['gpu_mem_gib']} GiB), torch {torch.__version__}, triton {info['triton']}, POT {info['pot']}"
    else:
        info["where"] = (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}, "
                         f"triton {info['triton']} interpreter, POT {info['pot']}")
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), required=True)
    ap.add_argument("--quick", action="store_true", help="small sizes (the CPU proof run)")
    ap.add_argument("--parts", default="e,a,b,c,d", help="comma list of e,a,b,c,d (run in that order)")
    ap.add_argument("--seed", type=int, help="part e's seed (default: from the clock, printed)")
    ap.add_argument("--search-seconds", type=float, default=None, help="part c: time budget per implementation (default 120 on CUDA)")
    ap.add_argument("--c-impls", default=",".join(IMPLS), help="part c: implementations to search (comma list)")
    ap.add_argument("--mem-cap-mib", type=float, default=None, help="part c on CPU: a try fits when its peak extra RSS is below this")
    ap.add_argument("--teacher-cache", help="part d: teacher logits file from topk_bench.py --save-cache (else the live teacher)")
    ap.add_argument("--topk-sequences", type=int, help="part d: sequences of real text (default 2, quick 1)")
    ap.add_argument("--topk-seq-len", type=int, help="part d: tokens a sequence (default 256, quick 128)")
    ap.add_argument("--keep-going", action="store_true", help="do not stop after a failed correctness check")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.c_impls.split(",")) - set(IMPLS)) + sorted(set(args.parts.split(",")) - set("eabcd"))
    if unknown:
        ap.error(f"unknown --c-impls / --parts entries {unknown}; valid: {', '.join(IMPLS)} / e,a,b,c,d")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: --device cuda but torch.cuda.is_available() is False")
    sizes = QUICK if args.quick or device == "cpu" else FULL
    parts = [p for p in "eabcd" if p in args.parts.split(",")]
    have_pot = machine(device)["pot"] is not None
    command = "python benchmarks/gpu_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    res = {"command": command, "machine": machine(device), "settings": {"eps": EPS, "iterations": ITERS, "temperature": TEMP}}
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_bench_{device}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for part in parts:
        t0 = time.perf_counter()
        print(f"[{part}] ...", file=sys.stderr, flush=True)
        if part == "e":
            seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
            res["e"] = {"seed": seed, "checks": part_e(sizes["e"], device, seed)}
        elif part == "a":
            res["a"] = part_a(*sizes["a"], device, sizes["matmul"], sizes["repeats"], ["sinkd", "sinkd-unrolled"], sizes["add"])
        elif part == "b":
            res["b"] = part_b(*sizes["b"], device, sizes["repeats"], have_pot)
        elif part == "c":
            cap = None if device == "cuda" else int((args.mem_cap_mib or 16) * 2**20)
            budget = args.search_seconds or (120.0 if device == "cuda" else 30.0)
            res["c"] = part_c(sizes["c_vocab"], device, have_pot, cap, budget, args.quick or device == "cpu", args.c_impls.split(","))
        elif part == "d":
            res["d"] = part_d(device, args.teacher_cache, args.topk_sequences or sizes["topk"][0],
                              args.topk_seq_len or sizes["topk"][1], [64, 256, 1024], sizes["repeats"])
        res.setdefault("seconds", {})[part] = time.perf_counter() - t0
        out.write_text(json.dumps(res, indent=1, default=str) + "\n")  # partial results survive a later failure
        if part == "e" and not all(c["ok"] for c in res["e"]["checks"]):
            print(report(res))
            bad = [c["check"] for c in res["e"]["checks"] if not c["ok"]]
            print(f"gpu_bench: KERNEL CORRECTNESS FAILED: {', '.join(bad)}", file=sys.stderr)
            if not args.keep_going:
                sys.exit(1)
    res["seconds"]["total"] = time.perf_counter() - started
    res["machine"]["loadavg_at_end"] = os.getloadavg()
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(report(res))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
