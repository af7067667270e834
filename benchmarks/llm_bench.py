"""Issue 6's throughput table in one command: one decoder-only distillation step, four objectives,
bare PyTorch vs Ray Train + DeepSpeed.

    # GPU host (Ray/DeepSpeed from the packed wheels; see /work/shared/gpu/pack-wheels.sh):
    source .whl/install.sh || exit 1; python benchmarks/llm_bench.py --out benchmarks/results/llm_bench_h100.json
    # any machine, tiny shapes (CPU, fp32): the same code path end to end
    python benchmarks/llm_bench.py --quick --out benchmarks/results/llm_bench_cpu_quick.json

Models are built from configs (no download): a Qwen2.5-1.5B-shaped teacher and a Qwen2.5-0.5B-shaped
student (transformers.Qwen2Config with the published sizes, vocabulary 151,936), random weights,
sequence length 2048, bf16 (CUDA). One step = teacher forward (no grad) + student forward + loss +
backward + AdamW step, on random token blocks (every token labelled). Objectives:
  a  forward KL:         CE + KL(T=1)                                  (ObjectiveConfig alpha=1, beta=0)
  b  SinKD full vocab:   CE + KL + batch-wise Sinkhorn over the tokens (group_size G, L1 on all V)
  c  SinKD top-k:        (b) with sinkhorn.topk = k (sparse L1 on the union of top-k supports)
  d  from the cache:     (c) with the teacher as a TopKDistribution (top-k log-probs, ids, rest) as
                         the logit cache stores it: no teacher forward in the step
Tokens/s counts the student's tokens per step; MFU = model FLOPs / time / peak, with model FLOPs =
3 x forward for the student (forward + backward) + 1 x forward for the teacher (not in d), forward =
2 x matmul parameters (LM head included, embeddings excluded) + 4 x layers x seq x hidden (attention
scores, not halved for the causal mask) per token; peak: H100/H200 SXM bf16 dense 989 TFLOP/s (set
--peak-tflops otherwise; none on CPU). Loss FLOPs (Sinkhorn) are not model FLOPs.
Bare vs pipeline: the same step, as a plain loop (torch.autocast bf16, torch.optim.AdamW) and inside a
Ray Train V2 TorchTrainer worker with the pipeline's DeepSpeed config (pipelines.train.deepspeed_config,
ZeRO-2, bf16), both timed over the same steps after warm-up.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"a": "forward KL", "b": "SinKD full vocabulary", "c": "SinKD top-k", "d": "SinKD top-k from the logit cache"}
# Qwen2.5 published sizes (config.json of Qwen/Qwen2.5-1.5B and -0.5B).
QWEN_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2)
QWEN_0_5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
QUICK_TEACHER = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QUICK_STUDENT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def qwen_config(sizes: dict, vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
                       use_sliding_window=False, **sizes)


def forward_flops_per_token(conf, seq: int) -> float:
    d, layers, vocab = conf.hidden_size, conf.num_hidden_layers, conf.vocab_size
    head = d // conf.num_attention_heads
    kv = conf.num_key_value_heads * head
    per_layer = d * d + 2 * d * kv + d * d + 3 * d * conf.intermediate_size
    return 2.0 * (layers * per_layer + vocab * d) + 4.0 * layers * seq * d


def objective_for(mode: str, args):
    from sinkd import DistillationObjective, ObjectiveConfig, SinkhornConfig

    if mode == "a":
        return DistillationObjective(ObjectiveConfig(alpha=1.0, beta=0.0))
    sink = SinkhornConfig(eps=0.1, max_iter=20, group_size=args.group_size, topk=None if mode == "b" else args.topk)
    return DistillationObjective(ObjectiveConfig(alpha=1.0, beta=1.0, sinkhorn=sink))


class Step:
    """One distillation step of a mode; `engine` is a DeepSpeed engine or None (bare loop)."""

    def __init__(self, mode, student, teacher, objective, optimizer=None, engine=None, amp=None):
        self.mode, self.student, self.teacher, self.objective = mode, student, teacher, objective
        self.optimizer, self.engine, self.amp = optimizer, engine, amp

    def teacher_side(self, ids):
        with torch.no_grad(), self.autocast():
            logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return logits

    def autocast(self):
        if self.amp is None:
            from contextlib import nullcontext

            return nullcontext()
        return torch.autocast(device_type=self.amp, dtype=torch.bfloat16)

    def __call__(self, ids, cached=None) -> float:
        labels = ids[:, 1:]
        teacher = cached if self.mode == "d" else self.teacher_side(ids)
        model = self.engine if self.engine is not None else self.student
        with self.autocast():
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = self.objective(logits, teacher, labels=labels).loss
        if self.engine is not None:
            self.engine.backward(loss)
            self.engine.step()
        else:
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def make_cache(teacher, ids, k, amp):
    """The logit cache's content for these blocks: top-k probabilities (T=1), ids, rest mass."""
    from sinkd import TopKDistribution
    teacher_topk = TopKDistribution.from_logits  # sinkd.topk_teacher.teacher_topk moved here

    with torch.no_grad(), torch.autocast(device_type=amp or "cpu", dtype=torch.bfloat16, enabled=amp is not None):
        logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    top = teacher_topk(logits, k)
    # stored as float32 log-probs / int32 ids in Parquet; read back as probabilities
    return TopKDistribution(top.probs.log().exp(), top.ids.to(torch.int32).long(), top.rest)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batches, cached, warmup: int, device) -> list[float]:
    times = []
    for i, ids in enumerate(batches):
        sync(device)
        start = time.perf_counter()
        step(ids, cached[i % len(cached)] if cached else None)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def build(args, device):
    """(teacher, t_conf, s_conf): the frozen teacher (bf16 on CUDA) and both configs."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t_conf, s_conf = qwen_config(args.teacher_sizes, args.vocab), qwen_config(args.student_sizes, args.vocab)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with device:
        teacher = AutoModelForCausalLM.from_config(t_conf, dtype=dtype).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, t_conf, s_conf


def new_student(s_conf, device):
    """A fresh fp32 student for each mode (the same initial weights: seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    with device:
        return AutoModelForCausalLM.from_config(s_conf, dtype=torch.float32).train()


def batches_for(args, device, n):
    g = torch.Generator(device="cpu").manual_seed(1)
    return [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device) for _ in range(n)]


def summarise(times, args, t_conf, s_conf, mode, peak) -> dict:
    tokens = args.batch * args.seq
    med = statistics.median(times)
    flops = 3 * forward_flops_per_token(s_conf, args.seq) * tokens
    if mode != "d":
        flops += forward_flops_per_token(t_conf, args.seq) * tokens
    return {"mode": mode, "objective": MODES[mode], "step_s_median": round(med, 4), "steps_timed": len(times),
            "tokens_per_s": round(tokens / med, 1), "model_tflop_per_step": round(flops / 1e12, 4),
            "mfu": round(flops / med / (peak * 1e12), 4) if peak else None}


def bare(args, device, peak) -> list[dict]:
    teacher, t_conf, s_conf = build(args, device)
    amp = "cuda" if device.type == "cuda" else None
    batches = batches_for(args, device, args.warmup + args.steps)
    rows = []
    for mode in args.modes:
        cached = [make_cache(teacher, b, args.topk, amp) for b in batches[: min(len(batches), 4)]] if mode == "d" else None
        student = new_student(s_conf, device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=device.type == "cuda")
        step = Step(mode, student, teacher, objective_for(mode, args), optimizer=opt, amp=amp)
        times = time_steps(step, batches, cached, args.warmup, device)
        rows.append(summarise(times, args, t_conf, s_conf, mode, peak))
        print(f"bare     {mode}  {rows[-1]['tokens_per_s']:>10.1f} tok/s  MFU {rows[-1]['mfu']}", flush=True)
        del opt, cached, student, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ray_worker(payload: dict) -> None:
    """Ray Train worker: the same steps through deepspeed.initialize with the pipeline's config."""
    import deepspeed
    import ray.train
    import ray.train.torch

    from pipelines.config import TrainConfig
    from pipelines.train import deepspeed_config

    args = argparse.Namespace(**payload["args"])
    device = ray.train.torch.get_device()
    use_gpu = device.type == "cuda"
    teacher, t_conf, s_conf = build(args, device)
    batches = batches_for(args, device, args.warmup + args.steps)
    train = TrainConfig(batch_size=args.batch, lr=1e-5, zero_stage=2, precision="bf16" if use_gpu else "fp32",
                        warmup_ratio=0.0, schedule="constant")
    ds_config = deepspeed_config(train, args.warmup + args.steps, use_gpu)
    ds_config["gradient_accumulation_steps"] = 1
    rows = []
    for mode in payload["modes"]:
        cached = [make_cache(teacher, b, args.topk, "cuda" if use_gpu else None) for b in batches[:4]] if mode == "d" else None
        student = new_student(s_conf, device)
        engine = deepspeed.initialize(model=student, model_parameters=list(student.parameters()), config=ds_config)[0]
        step = Step(mode, student, teacher, objective_for(mode, args), engine=engine)
        times = time_steps(step, batches, cached, args.warmup, device)
        rows.append(summarise(times, args, t_conf, s_conf, mode, payload["peak"]))
        del engine, student, step, cached
        if use_gpu:
            torch.cuda.empty_cache()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # Ray Train V2 keeps the metrics of checkpointed reports
        Path(tmp, "rows.json").write_text(json.dumps(rows))
        ray.train.report({"modes": len(rows)}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def pipeline(args, device, peak, modes) -> list[dict]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = device.type == "cuda"
    storage = Path(args.storage).resolve()
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), object_store_memory=512 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH", "")])}})
    try:
        trainer = TorchTrainer(
            ray_worker, train_loop_config={"args": vars(args), "modes": modes, "peak": peak},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": max(1, (os.cpu_count() or 2) - 1), **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(name=f"llm_bench_{int(time.time())}", storage_path=str(storage),
                                 worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu",
                                                                  "TOKENIZERS_PARALLELISM": "false"}}))
        result = trainer.fit()
    finally:
        ray.shutdown()
    with result.checkpoint.as_directory() as ckpt:
        rows = json.loads(Path(ckpt, "rows.json").read_text())
    for r in rows:
        print(f"pipeline {r['mode']}  {r['tokens_per_s']:>10.1f} tok/s  MFU {r['mfu']}", flush=True)
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny models, seq 64, fp32: proves the code path on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--group-size", type=int, default=512, help="sinkhorn.group_size: OT within blocks of G tokens")
    p.add_argument("--steps", type=int, help="timed steps per mode (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="a,b,c,d")
    p.add_argument("--pipeline-modes", default="a,b,c,d", help="modes also run under Ray Train + DeepSpeed ('' to skip)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 dense TFLOP/s for MFU (default: from the GPU name)")
    p.add_argument("--storage", default="runs/llm_bench", help="Ray Train storage for the pipeline side")
    p.add_argument("--out")
    args = p.parse_args(argv)
    args.seq = args.seq or (64 if args.quick else 2048)
    args.steps = args.steps or (3 if args.quick else 10)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes + [m for m in args.pipeline_modes.split(",") if m] if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; valid: {', '.join(MODES)}")
    args.teacher_sizes = QUICK_TEACHER if args.quick else QWEN_1_5B
    args.student_sizes = QUICK_STUDENT if args.quick else QWEN_0_5B
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if device.type == "cuda" else None
    out = {"device": name, "host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "command": "python benchmarks/llm_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "seq": args.seq, "batch": args.batch, "vocab": args.vocab, "topk": args.topk, "group_size": args.group_size,
           "dtype": "bf16" if device.type == "cuda" else "fp32", "peak_tflops": peak,
           "teacher": args.teacher_sizes, "student": args.student_sizes, "warmup": args.warmup, "steps": args.steps}
    print(f"device {name}; teacher {args.teacher_sizes}; student {args.student_sizes}; seq {args.seq}", flush=True)
    out["bare"] = bare(args, device, peak)
    pipeline_modes = [m for m in args.pipeline_modes.split(",") if m]
    out["pipeline"] = pipeline(args, device, peak, pipeline_modes) if pipeline_modes else []
    by_mode = {r["mode"]: r for r in out["bare"]}
    out["ratios"] = {}
    if "a" in by_mode and "c" in by_mode:
        out["ratios"]["topk_vs_kl_tokens_per_s"] = round(by_mode["c"]["tokens_per_s"] / by_mode["a"]["tokens_per_s"], 3)
    for r in out["pipeline"]:
        if r["mode"] in by_mode:
            out["ratios"][f"pipeline_vs_bare_{r['mode']}"] = round(r["tokens_per_s"] / by_mode[r["mode"]]["tokens_per_s"], 3)
    print(table(out))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


def table(out: dict) -> str:
    lines = ["| step | objective | bare tok/s | bare MFU | Ray+DeepSpeed tok/s | Ray+DS MFU | Ray+DS / bare |",
             "|---|---|---:|---:|---:|---:|---:|"]
    pipe = {r["mode"]: r for r in out["pipeline"]}
    fmt = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for r in out["bare"]:
        q = pipe.get(r["mode"])
        lines.append(f"| {r['mode']} | {r['objective']} | {r['tokens_per_s']:.1f} | {fmt(r['mfu'])} | "
                     f"{q['tokens_per_s'] if q else '-'} | {fmt(q['mfu']) if q else '-'} | "
                     f"{round(q['tokens_per_s'] / r['tokens_per_s'], 3) if q else '-'} |")
    lines.append(f"ratios: {out['ratios']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
