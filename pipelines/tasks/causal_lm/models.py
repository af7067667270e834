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
    """A Hugging Face causal LM returning logits (B, L, V) (the DeepSpeed engine wraps this)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


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
