"""Prompt/continuation rows of the real Wikipedia extract through Ray: a cross-tokenizer job (tiny Llama
teacher speaking SmolLM2's BPE, a MultiLevelOT student speaking MiniLM's WordPiece; 2 workers,
ZeRO-2) and `sinkd eval`'s path for a causal_lm config. Every model's Rouge-L is recomputed here from
its own greedy continuations (plain Hugging Face generate on prompts tokenised here) with rouge_score,
and bits per byte over the response tokens in plain PyTorch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from llm_helpers import MINILM, cross_job

from pipelines.tasks import checked_config, get_task

pytestmark = pytest.mark.slow

OVER = {"lm.format": "prompt_continuation", "lm.prompt_words": 8, "lm.response_words": 4, "lm.max_new_tokens": 6,
        "data.max_length": 40, "lm.student_max_length": 40}


def plain_generations(model_dir, tokenizer_dir, rows, start_end):
    """Greedy continuations and response NLL of each (prompt, response) computed from the texts."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start, end = start_end
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    texts, rouge, nll, covered = [], [], 0.0, 0
    for prompt, response in rows:
        p = ([start] if start is not None else []) + tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                                 max_new_tokens=6, eos_token_id=end, pad_token_id=end)
            new = out[0, len(p):].tolist()
            new = new[:new.index(end)] if end in new else new
            ids = torch.tensor([p + r + [end]])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, len(p):], reduction="sum").item()
        covered += len(response.encode())
        texts.append(tok.decode(new, skip_special_tokens=True))
        rouge.append(scorer.score(response, texts[-1])["rougeL"].fmeasure)
    return texts, sum(rouge) / len(rouge), nll / math.log(2) / covered


def test_prompt_continuation_jobs_generate_and_score_rouge_l_with_bits_per_byte(local_ray, tmp_path, tiny_llama, wiki_path):
    from pipelines.recipes.evaluate import evaluate_models
    from pipelines.recipes.job import run_job
    from pipelines.tasks.causal_lm.generation import generations_file

    raw = cross_job(tmp_path, tiny_llama, wiki_path, name="mlot", **OVER)
    cfg = checked_config(raw)
    results = run_job(cfg, show_progress=False)
    assert results["metrics"] == ["bits_per_byte", "perplexity", "rouge_l"]
    test = get_task("cross_tokenizer").prepare(checked_config(raw)).data.splits["test"].to_pylist()
    assert all(r["s_response_start"] > 1 and r["t_response_start"] > 1 for r in test)  # real prompts on both sides
    pairs = [(r["text"][:len(r["text"]) - len(r["response"])], r["response"]) for r in test]
    for name, tok, start_end in (("mlot", MINILM, (101, 102)), ("teacher", tiny_llama, (1, 2))):
        info = results["models"][name]
        texts, rouge, bpb = plain_generations(info["path"], tok, pairs, start_end)
        written = [json.loads(line) for line in generations_file(cfg.run_dir, info["path"], "test").read_text().splitlines()]
        assert [w["generated"] for w in written] == texts and [w["reference"] for w in written] == [r for _, r in pairs]
        assert info["test"]["rouge_l"] == pytest.approx(rouge, abs=1e-12)
        assert info["test"]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
        assert any(texts)  # something was generated
    # causal_lm on the same rows (the teacher's tokenizer, no start token): `sinkd eval`'s path.
    lm_raw = cross_job(tmp_path, tiny_llama, wiki_path, task_type="causal_lm", objective={"alpha": 1.0},
                       **{**OVER, "lm.student_max_length": None, "student.tokenizer": None, "run_dir": str(tmp_path / "lm")})
    lm_cfg = checked_config(lm_raw)
    names, scores = evaluate_models(lm_cfg, [str(tiny_llama)])
    assert names == ["perplexity", "bits_per_byte", "top1_agreement", "rouge_l"]
    texts, rouge, bpb = plain_generations(str(tiny_llama), tiny_llama, pairs, (None, 2))
    assert scores[str(tiny_llama)]["rouge_l"] == pytest.approx(rouge, abs=1e-12)
    assert scores[str(tiny_llama)]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    assert Path(generations_file(lm_cfg.run_dir, str(tiny_llama), "test")).is_file()
