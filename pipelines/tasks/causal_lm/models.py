"""Decoder-only models: `CausalLM` returns (B, L, V) logits; students from the teacher's config with
overrides, from a subset of the teacher's layers, or pretrained; a GGUF teacher is dequantised once
into a Hugging Face directory under lm.cache.dir/teachers (transformers + the `gguf` package)."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from ...config import Config
from ..common import frozen_teacher, quiet_transformers, student_from_teacher_layers
from .checks import teacher_source


class CausalLM(nn.Module):
    """A Hugging Face causal LM returning logits (B, L, V) (the DeepSpeed engine wraps this). A
    student may carry `online`, the teacher's OKD block (sinkd.online.ResidualAdapter): trained in
    the student's engine at its own learning rate (`lr_overrides`, read by
    pipelines.train.engine.param_groups), checkpointed with it, exported beside it as online.pt."""

    def __init__(self, model: nn.Module, online: nn.Module | None = None, online_lr: float | None = None):
        super().__init__()
        self.model = model
        self.lr_overrides = {}
        if online is not None:
            self.online = online
            self.lr_overrides = {"online.": online_lr}

    def forward(self, input_ids, attention_mask, adapter: nn.Module | None = None, layer: int = -1):
        """adapter: applied to the output of decoder layer `layer` for this call only (the teacher
        adapted by a student's online block; gradients reach the block through the layers above)."""
        if adapter is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        handle = self.model.get_decoder().layers[layer].register_forward_hook(adapted_output(adapter))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        finally:
            handle.remove()


def adapted_output(adapter: nn.Module):
    """A forward hook that passes a decoder layer's hidden states (a tensor, or a tuple's first item)
    through `adapter`."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)
    return hook


def in_lockstep(w) -> bool:
    """Whether a worker's ranks must run the same forwards (ZeRO-3 over several ranks: each forward of the
    student or of the partitioned teacher gathers weights from every rank)."""
    return w.stage.train.zero_stage == 3 and w.world > 1


# ----------------------------------------------------------------------------- teacher and students


def hf_teacher_dir(cfg: Config) -> str:
    """The teacher as a Hugging Face directory; a GGUF teacher is dequantised once and cached."""
    directory, gguf = teacher_source(cfg)
    return str(directory) if gguf is None else convert_gguf(directory, gguf, cfg.lm.cache.dir)


def convert_gguf(directory: Path, gguf: str, cache_dir: str) -> str:
    """Dequantise a GGUF model (weights and tokenizer) into cache_dir/teachers/<name>-<key>, once."""
    src = Path(directory) / gguf
    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cache_dir) / "teachers" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized (not serialisable): the dequantised
        # weights go into a plain model of the same config.
        conf = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(conf, attr):
                delattr(conf, attr)
        with torch.device("meta"):  # no random init: the loaded tensors are assigned as they are
            model = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), assign=True)
        model.tie_weights()
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # converted concurrently by another process
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_causal_lm(path: str, dtype=torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def build_student(cfg: Config, teacher_dir: str) -> nn.Module:
    """The student per `student.init` (call under a fixed seed: identical on every rank)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = cfg.student
    if s.init == "pretrained":
        return load_causal_lm(s.path)
    if s.init == "teacher_layers":
        return student_from_teacher_layers(load_causal_lm(teacher_dir), s.layers)
    conf = AutoConfig.from_pretrained(teacher_dir)
    conf.update(dict(s.config))
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = conf.layer_types[: conf.num_hidden_layers]
    return AutoModelForCausalLM.from_config(conf)


def build_teacher(teacher_dir: str, ds_config_zero3: dict | None = None) -> nn.Module:
    """The frozen eval-mode teacher (partitioned as it loads when given a ZeRO-3 DeepSpeed config)."""
    return frozen_teacher(lambda: load_causal_lm(teacher_dir), ds_config_zero3)
