"""Students with their own tokenizer: pretrained, from the teacher's config, or from a subset of the
teacher's layers with the embedding (and an untied LM head) rebuilt for the student's vocabulary;
`PairLM`, the module each side runs as (with DSKD's projectors beside the student's model)."""

from __future__ import annotations

import json

import torch
from torch import nn

from ...config import Config
from ..causal_lm.models import load_causal_lm
from ..common import load_tokenizer, student_from_teacher_layers


class PairLM(nn.Module):
    """A Hugging Face causal LM returning logits (B, L, V), or (logits, last hidden state) when asked;
    the student's may carry `projectors` (DSKD), trained with it at their own learning rate
    (`lr_overrides`: parameter-name prefix -> lr, read by pipelines.train.engine.param_groups) and
    exported beside the model, not inside it."""

    def __init__(self, model: nn.Module, projectors: nn.Module | None = None, projector_lr: float | None = None):
        super().__init__()
        self.model = model
        self.lr_overrides = {}
        if projectors is not None:
            self.projectors = projectors
            self.lr_overrides = {"projectors.": projector_lr}

    def forward(self, input_ids, attention_mask, hidden: bool = False):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=hidden)
        return (out.logits, out.hidden_states[-1]) if hidden else out.logits


def whole_weights(*params: torch.Tensor) -> list[torch.Tensor]:
    """The full values of `params`, to read outside their module's forward (DSKD reads both models'
    embeddings and LM heads): the tensors themselves, or for ZeRO-3-partitioned parameters detached
    copies gathered from every rank. The gather is a collective, so under ZeRO-3 every rank calls
    this in the same order; the copies live as long as the caller keeps them (one step)."""
    partitioned = [p for p in {id(p): p for p in params}.values() if hasattr(p, "ds_id")]
    if not partitioned:
        return list(params)
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        copies = {id(p): p.detach().clone() for p in partitioned}
    return [copies.get(id(p), p) for p in params]


def special_ids(tok) -> dict:
    """The token ids a causal-LM config names, from the student's tokenizer (None where it has none)."""
    bos = next((v for v in (tok.bos_token_id, tok.cls_token_id) if v is not None), None)
    eos = next((v for v in (tok.eos_token_id, tok.sep_token_id) if v is not None), None)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}


def token_texts(tok) -> list[str]:
    """The text each student token stands for inside running text: a WordPiece continuation ("##ing")
    without its prefix, a WordPiece word start with the space the teacher's tokens carry before words."""
    model = json.loads(tok.backend_tokenizer.to_str())["model"]
    prefix = model.get("continuing_subword_prefix") if model.get("type") == "WordPiece" else None
    special = set(tok.all_special_ids)
    out = []
    for i in range(len(tok)):
        if i in special:
            out.append("")
            continue
        text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)]) if prefix is None else tok.convert_ids_to_tokens(i)
        if prefix is not None:
            text = text[len(prefix):] if text.startswith(prefix) else " " + text
        out.append(text)
    return out


def transplanted_embedding(teacher_embedding: torch.Tensor, teacher_tok, student_tok) -> torch.Tensor:
    """(V_s, d): each student token's row is the mean of the teacher's embedding rows of the teacher
    tokens its text splits into (a token the teacher cannot spell, or a special token, gets the mean
    row): a start that already means something, so a pruned teacher with a new vocabulary heals in
    steps rather than learning its embedding from noise."""
    mean = teacher_embedding.mean(0)
    rows = teacher_tok(token_texts(student_tok), add_special_tokens=False)["input_ids"]
    out = torch.empty(len(rows), teacher_embedding.shape[1], dtype=teacher_embedding.dtype)
    for i, ids in enumerate(rows):
        out[i] = teacher_embedding[ids].mean(0) if ids else mean
    return out


def with_vocabulary(model: nn.Module, embedding: torch.Tensor, tok) -> nn.Module:
    """The model with `embedding` as its input embedding (and its LM head: tied, or a copy) and the
    student tokenizer's size and special ids in its config."""
    model.resize_token_embeddings(embedding.shape[0])
    model.get_input_embeddings().weight.data.copy_(embedding)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        head.weight.data.copy_(embedding)
    for key, value in special_ids(tok).items():
        setattr(model.config, key, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, value)
    return model


def build_student(cfg: Config, teacher_dir: str, tokenizer_dir: str) -> nn.Module:
    """The student per `student.init`, speaking the tokenizer in `tokenizer_dir` (call under a fixed seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s, tok = cfg.student, load_tokenizer(tokenizer_dir)
    if s.init == "pretrained":
        return load_causal_lm(s.path)
    if s.init == "teacher_layers":
        teacher = load_causal_lm(teacher_dir)
        embedding = transplanted_embedding(teacher.get_input_embeddings().weight.detach(), load_tokenizer(teacher_dir), tok)
        return with_vocabulary(student_from_teacher_layers(teacher, s.layers), embedding, tok)
    conf = AutoConfig.from_pretrained(teacher_dir)
    conf.update({"vocab_size": len(tok), **special_ids(tok), **dict(s.config)})
    if isinstance(getattr(conf, "layer_types", None), list):
        conf.layer_types = conf.layer_types[: conf.num_hidden_layers]
    return AutoModelForCausalLM.from_config(conf)
