"""DeepSpeed for a stage: the engine config from the job's train settings, the student's parameter
groups, and where the frozen teacher lives (a ZeRO-3 inference engine, or moved to the device)."""

from __future__ import annotations

import torch

from ..config import TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(t: TrainConfig, total_steps: int, use_gpu: bool) -> dict:
    """DeepSpeed settings from the job config; we own gradient-accumulation boundaries (epochs end
    on a partial window) so the loop, not DeepSpeed's counter, decides when a step happens. The
    schedules peak at each parameter group's own lr (train.lr unless a group sets one): warmup_max_lr
    None is how DeepSpeed's WarmupLR / WarmupDecayLR read it (their default would be 0.001)."""
    warmup = max(1, round(t.warmup_ratio * total_steps))
    scheduler = {
        "linear": {"type": "WarmupDecayLR", "params": {"total_num_steps": max(total_steps, warmup + 1), "warmup_min_lr": 0.0,
                                                       "warmup_max_lr": None, "warmup_num_steps": warmup, "warmup_type": "linear"}},
        "cosine": {"type": "WarmupCosineLR", "params": {"total_num_steps": max(total_steps, warmup + 1), "warmup_min_ratio": 0.0,
                                                        "warmup_num_steps": warmup, "cos_min_ratio": 0.0, "warmup_type": "linear"}},
        "constant": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": None,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}},
    }[t.schedule]
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": t.max_grad_norm,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "scheduler": scheduler,
        "zero_optimization": {"stage": t.zero_stage, "overlap_comm": use_gpu and t.zero_stage == 2},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (the usual BERT recipe). A module may name
    parameters with their own learning rate (`lr_overrides`: name prefix -> lr, e.g. DSKD's
    projectors): they get groups of their own, which the schedule scales like the others."""
    overrides = getattr(model, "lr_overrides", None) or {}
    groups: dict = {}  # (lr or None, no decay) -> parameters, in the module's parameter order
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = next((lr for prefix, lr in overrides.items() if name.startswith(prefix)), None)
            groups.setdefault((lr, p.ndim < 2), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay, **({} if lr is None else {"lr": lr})}
            for (lr, no_decay), params in groups.items()]


def student_engine(student, t: TrainConfig, ds_config: dict, alone: bool = False):
    """The student's DeepSpeed engine. alone: the only rank, on CPU (DeepSpeed's shared-memory
    all-reduce op has no peer to serve: not compiled, see without_shm_comm_op)."""
    import deepspeed

    if alone:
        without_shm_comm_op()
    return deepspeed.initialize(model=student, model_parameters=param_groups(student, t.weight_decay), config=ds_config)[0]


def without_shm_comm_op() -> None:
    """Skip DeepSpeed's CPU shared-memory all-reduce op in this process. Its comm backend compiles the
    op when it starts, peers or not: about 2 min on 2 cores, once per machine (the ~/.cache/torch_extensions
    build), most of a fresh machine's first one-worker stage. DeepSpeed skips an op its probe marks
    incompatible (`deepspeed.comm.torch.build_shm_op` reads `deepspeed.ops.__compatible_ops__`, a dict
    the module keeps so that edits to it persist); a one-rank job all-reduces nothing."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def place_teacher(teacher, t: TrainConfig, ds_config: dict, device):
    """ZeRO-3: an inference engine, the teacher stays partitioned and is gathered layer by layer;
    otherwise the whole module on this rank's device in the training precision."""
    if t.zero_stage == 3:
        import deepspeed

        inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        engine = deepspeed.initialize(model=teacher, config=inference)[0]
        engine.eval()
        return engine
    return teacher.to(device=device, dtype=DTYPES[t.precision])
