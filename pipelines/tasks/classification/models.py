"""Teachers and students as one interface: forward(batch) -> (N, num_labels) logits.

- Encoder classifiers (BERT family): AutoModelForSequenceClassification logits.
- Encoder-decoders (T5 family): the first decoder step's logits restricted to the first token of
  each label word, so the same objective distils the label/answer tokens.
Students come from a pretrained path, from the teacher's config with overrides (random init), or
from a subset of the teacher's layers (the PKD-style copy of the SinKD code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ...config import Config, model_config
from ..common import TASK_FILE, frozen_teacher, quiet_transformers, student_from_teacher_layers


def model_kind(path: str | Path) -> str:
    return "seq2seq" if model_config(path).get("is_encoder_decoder") else "encoder"


def read_task_file(path: str | Path) -> dict | None:
    f = Path(path) / TASK_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def is_task_tuned(path: str | Path, num_labels: int) -> bool:
    """True when the model already has a head for this task (exported by sinkd, or a matching classifier)."""
    meta = read_task_file(path)
    if meta is not None:
        return meta.get("num_labels") == num_labels
    conf = model_config(path)
    archs = conf.get("architectures") or []
    heads = len(conf["id2label"]) if "id2label" in conf else conf.get("num_labels", 2)  # transformers 5 omits the default 2
    return any(a.endswith("ForSequenceClassification") for a in archs) and heads == num_labels


def label_token_ids(tokenizer, words: list[str]) -> list[int]:
    """First token of each label word; they must differ, or the classes are indistinguishable."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"data.label_words: {words} do not start with distinct tokens ({ids}); choose other words")
    return ids


class Classifier(nn.Module):
    """Wraps a Hugging Face model so every family returns (N, num_labels) logits."""

    def __init__(self, model: nn.Module, kind: str, label_ids: list[int] | None = None):
        super().__init__()
        self.model, self.kind = model, kind
        self.register_buffer("label_ids", torch.tensor(label_ids or [], dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        if self.kind == "encoder":
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        start = torch.full((input_ids.shape[0], 1), self.model.config.decoder_start_token_id,
                           dtype=input_ids.dtype, device=input_ids.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start).logits
        return logits[:, 0, self.label_ids]


def model_inputs(batch: dict, device) -> dict:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: batch[k].to(device) for k in keys if k in batch}


# ----------------------------------------------------------------------------- building


def auto_class(kind: str):
    """The transformers Auto class of an encoder classifier or an encoder-decoder."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "encoder" else AutoModelForSeq2SeqLM


def load_pretrained(path: str | Path, kind: str, num_labels: int, label_names: list[str] | None = None) -> nn.Module:
    """A Hugging Face model; encoder classifiers get a head of num_labels (new if the size differs)."""
    quiet_transformers()
    if kind == "seq2seq":
        return auto_class(kind).from_pretrained(path)
    names = label_names or [str(i) for i in range(num_labels)]
    return auto_class(kind).from_pretrained(path, num_labels=num_labels, id2label=dict(enumerate(names)),
                                            label2id={n: i for i, n in enumerate(names)},
                                            ignore_mismatched_sizes=True)


def build_student(cfg: Config, teacher_path: str, kind: str, num_labels: int, label_names) -> nn.Module:
    """The student's Hugging Face model per `student.init` (call under a fixed seed: identical on all ranks)."""
    from transformers import AutoConfig

    s = cfg.student
    if s.init == "pretrained":
        return load_pretrained(s.path, kind, num_labels, label_names)
    if s.init == "teacher_layers":  # layers_from pretrained: teacher.path before fine-tuning (its head, or a new one)
        source = cfg.teacher.path if s.layers_from == "pretrained" else teacher_path
        return student_from_teacher_layers(load_pretrained(source, kind, num_labels, label_names), s.layers)
    teacher = load_pretrained(teacher_path, kind, num_labels, label_names)
    conf = AutoConfig.from_pretrained(teacher_path)
    conf.update({**s.config})
    if kind == "encoder":
        conf.num_labels = num_labels
        conf.id2label, conf.label2id = teacher.config.id2label, teacher.config.label2id
    return auto_class(kind).from_config(conf)


def build_teacher(path: str, kind: str, num_labels: int, label_names, ds_config_zero3: dict | None = None) -> nn.Module:
    """The frozen eval-mode teacher (partitioned as it loads when given a ZeRO-3 DeepSpeed config)."""
    return frozen_teacher(lambda: load_pretrained(path, kind, num_labels, label_names), ds_config_zero3)
