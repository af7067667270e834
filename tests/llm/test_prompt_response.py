"""Prompt/response data for both LM tasks without Ray: prompt/continuation records cut from the real
Wikipedia extract, cross-tokenizer rows with response masks on both sides (SmolLM2's BPE teacher,
MiniLM's WordPiece student), every objective blind to prompt rows, Rouge-L against rouge_score and by
hand, greedy generation against a plain argmax loop, and every bad input's one-line message."""

from __future__ import annotations

import json

import pytest
import torch
from llm_helpers import MINILM, cross_job

from pipelines.config import ConfigError
from pipelines.tasks import checked_config, get_task
from pipelines.tasks.common import DataError
from pipelines.tasks.protocol import Rows


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer), AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def records(wiki_path):
    from pipelines.tasks.causal_lm.data import wiki_pages
    from pipelines.tasks.causal_lm.prompts import continuation_records

    docs = list(wiki_pages(wiki_path, 4, 400))
    return docs, continuation_records(docs, 12, 6)


def test_continuations_are_a_prefix_and_the_next_words_of_real_paragraphs(records):
    docs, recs = records
    assert len(recs) > 20 and [r[0] for r in recs] == list(range(1, len(recs) + 1))
    text = "\n\n".join(docs)
    for _, prompt, response in recs:
        assert len(prompt.split()) == 12 and len(response.split()) == 6
        assert prompt + response in text and response[0].isspace() and not prompt[-1].isspace()
        # The prompt starts a paragraph.
        assert any(p.strip().startswith(prompt) for d in docs for p in d.split("\n\n"))


def test_cross_rows_tokenise_prompt_and_response_apart_with_each_sides_start_and_end(tokenizers, records):
    from pipelines.tasks.cross_tokenizer.data import PairCollate, prompt_pairs

    teacher, student = tokenizers
    _, recs = records
    pairs = prompt_pairs(recs, teacher, student, 40, 36, [f"row {n}" for n, _, _ in recs])
    rows = pairs.table.to_pylist()
    cut = {"t": 0, "s": 0}
    for rec, row in zip(recs, rows):
        _, prompt, response = rec
        assert row["response"] == response and row["text_bytes"] == len(response.encode())
        for side, tok, start, end, cap in (("t", teacher, 1, 2, 40), ("s", student, 101, 102, 36)):
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
            r = enc["input_ids"]
            kept = (r + [end])[:cap - len(p)]
            assert row[f"{side}_input_ids"] == [start] + p + kept
            assert row[f"{side}_response_start"] == 1 + len(p)
            n = min(len(r), cap - len(p))
            cut[side] += n < len(r)
            covered = response if n == len(r) else response[:enc["offset_mapping"][n - 1][1]]
            assert row[f"{side}_bytes"] == len(covered.encode())
    assert pairs.truncated == {"teacher": cut["t"], "student": cut["s"]} and cut["t"] + cut["s"] > 0
    # The collate's labels: each side's ids from its response start on, -100 on the prompt and padding.
    batch = PairCollate()(pairs.table.slice(0, 4))
    for side in ("t", "s"):
        for b, row in enumerate(rows[:4]):
            ids, start = row[f"{side}_input_ids"], row[f"{side}_response_start"]
            labels = batch[f"{side}_labels"][b].tolist()
            assert labels == [-100] * start + ids[start:] + [-100] * (len(labels) - len(ids))


def random_prompt_rows(seed=0):
    """Rows of 3 sequences whose first positions are prompt rows (mask False) on both sides."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 9, 30, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 11, 45, generator=g, dtype=torch.float64)
    s_mask = torch.zeros(3, 9, dtype=torch.bool)
    t_mask = torch.zeros(3, 11, dtype=torch.bool)
    for b, (s0, s1, t0, t1) in enumerate([(2, 9, 3, 11), (4, 8, 5, 9), (1, 6, 6, 11)]):
        s_mask[b, s0:s1], t_mask[b, t0:t1] = True, True
    labels = torch.randint(30, (3, 9), generator=g).masked_fill(~s_mask, -100)
    return student, teacher, labels, s_mask, t_mask


@pytest.mark.parametrize("method", ["ce", "uld", "multilevel_ot", "dskd"])
def test_every_objective_ignores_the_prompt_rows_of_both_sides(method):
    from pipelines.tasks.cross_tokenizer.dskd import CMAProjectors, Side
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective

    torch.manual_seed(0)
    proj = CMAProjectors(6, 10).double()
    g = torch.Generator().manual_seed(1)
    s_hidden, t_hidden = torch.randn(3, 9, 6, generator=g, dtype=torch.float64), torch.randn(3, 11, 10, generator=g, dtype=torch.float64)
    s_ids, t_ids = torch.randint(30, (3, 10), generator=g), torch.randint(45, (3, 12), generator=g)
    emb = (torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randn(45, 10, generator=g, dtype=torch.float64))
    objective = CrossTokenizerObjective({"method": method, "multilevel_ot": {"k": 10}})

    def loss(student, teacher, labels, s_mask, t_mask):
        extra = {"student_mask": s_mask, "teacher_mask": t_mask}
        if method == "dskd":
            extra.update(projectors=proj,
                         student_side=Side(student, s_hidden, s_ids[:, :-1], s_ids[:, 1:], s_mask, emb[0], emb[0]),
                         teacher_side=Side(teacher, t_hidden, t_ids[:, :-1], t_ids[:, 1:], t_mask, emb[1], emb[1]))
        return objective(Rows(student, teacher, labels, extra=extra))

    student, teacher, labels, s_mask, t_mask = random_prompt_rows()
    base = loss(student, teacher, labels, s_mask, t_mask)
    # New logits on every prompt row of both sides (and other labels there): the loss does not move.
    s2, t2, _, _, _ = random_prompt_rows(seed=5)
    student_p = torch.where(s_mask[..., None], student, 10 * s2)
    teacher_p = torch.where(t_mask[..., None], teacher, 10 * t2)
    moved = loss(student_p, teacher_p, labels, s_mask, t_mask)
    for term in ("loss", "ce", "kd", "sinkhorn"):
        assert getattr(moved, term).item() == pytest.approx(getattr(base, term).item(), rel=1e-12, abs=1e-15), term
    # It can fail: the same change on a response row moves it.
    student_r = student.clone()
    student_r[0, 5, 7] += 3.0  # one logit (a shift of the whole row would change no softmax)
    assert loss(student_r, teacher, labels, s_mask, t_mask).loss.item() != pytest.approx(base.loss.item(), rel=1e-9)
    if method == "multilevel_ot":  # the sequence-level plan: uniform marginals over the scored tokens alone
        from sinkd import multilevel_ot_loss

        assert base.sinkhorn.item() > 0
        for b in range(3):
            one = multilevel_ot_loss(student[b:b + 1, s_mask[b]], teacher[b:b + 1, t_mask[b]], k=10)
            alone = multilevel_ot_loss(student[b:b + 1], teacher[b:b + 1], s_mask[b:b + 1], t_mask[b:b + 1], k=10)
            assert alone.sd.item() == pytest.approx(one.sd.item(), rel=1e-10)


def test_rouge_l_is_rouge_score_and_the_lcs_f_measure_by_hand():
    from rouge_score import rouge_scorer

    from pipelines.tasks.causal_lm.generation import rouge_l

    preds = ["the cat on the mat", "Cats were running!", "nothing alike", "the mat sat the cat on"]
    refs = ["the cat sat on the mat", "the cat runs", "completely different words", "the cat sat on the mat"]
    got = rouge_l(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert got == [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    # By hand: LCS 5 of 5 predicted and 6 reference words: P 1, R 5/6; stemmed "cat run" against
    # "the cat run": P 2/3 ("were" unmatched), R 2/3; nothing shared: 0; LCS "the sat on" / "the cat on": 3 of 6 and 6.
    f = lambda p, r: 2 * p * r / (p + r)  # noqa: E731
    assert got == pytest.approx([f(1, 5 / 6), f(2 / 3, 2 / 3), 0.0, f(3 / 6, 3 / 6)], rel=1e-12)


def test_greedy_generation_is_a_plain_argmax_loop_and_deterministic(tiny_llama):
    from pipelines.tasks.causal_lm.generation import greedy_new_tokens
    from pipelines.tasks.causal_lm.models import load_causal_lm

    model = load_causal_lm(str(tiny_llama)).eval()
    prompt = [1, 504, 2831, 314, 253]
    first = greedy_new_tokens(model, prompt, eos_id=2, pad_id=2, max_new_tokens=12)
    torch.manual_seed(123)
    assert greedy_new_tokens(model, prompt, eos_id=2, pad_id=2, max_new_tokens=12) == first
    ids = list(prompt)
    with torch.no_grad():  # no KV cache: the whole sequence each step
        for _ in range(12):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 2:
                break
            ids.append(nxt)
    assert first == ids[len(prompt):] and len(first) > 0
    # An end token stops it (and is not returned).
    stop = first[3]
    assert greedy_new_tokens(model, prompt, eos_id=stop, pad_id=2, max_new_tokens=12) == first[:first.index(stop)]


def prompt_job(tmp_path, tiny_llama, path, **over):
    raw = cross_job(tmp_path, tiny_llama, path, **{"lm.format": "prompt_response", "data.max_length": 12,
                                                    "lm.student_max_length": 12, "lm.max_documents": None, **over})
    raw["data"]["files"] = {"train": str(path)}
    return raw


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in rows))
    return path


@pytest.mark.parametrize("bad, message", [
    (("one two three four five six seven eight nine ten eleven twelve", " go"),
     r"line 7: the prompt has 1[0-9] teacher tokens, no room for a response within data.max_length=12$"),
    (("a short prompt", " \x07\x07"),
     r"line 7: the response \(' \\x07\\x07'\) has no student token after truncation to lm.student_max_length=12 "
     r"\(the student's tokenizer drops all of it\)$"),
])
def test_bad_prompt_response_rows_name_the_file_and_line(tmp_path, tiny_llama, bad, message):
    rows = [(f"prompt number {i}", f" answer {i}") for i in range(12)]
    rows[6] = bad
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = checked_config(prompt_job(tmp_path, tiny_llama, path, **{"data.files.validation": str(path),
                                                                     "data.files.test": str(path)}))
    with pytest.raises(DataError, match=rf"^{path} " + message):
        get_task("cross_tokenizer").prepare(cfg)


def test_a_student_prompt_without_room_is_refused_on_the_student_side(tmp_path, tiny_llama):
    rows = [(f"prompt number {i}", f" answer {i}") for i in range(12)]
    rows[2] = ("unbelievably", " yes")  # 3 BPE tokens or so, more WordPiece tokens than the student's 4
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = checked_config(prompt_job(tmp_path, tiny_llama, path, **{"lm.student_max_length": 8, "data.files.test": str(path),
                                                                     "data.files.validation": str(path)}))
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(MINILM)("unbelievably", add_special_tokens=False)["input_ids"])
    cfg.lm.student_max_length = n + 1
    with pytest.raises(DataError, match=rf"^{path} line 3: the prompt has {n} student tokens, no room for a response "
                                        rf"within lm.student_max_length={n + 1}$"):
        get_task("cross_tokenizer").prepare(cfg)


def test_continuation_options_are_checked_and_the_cross_task_takes_prompt_rows(tmp_path, tiny_llama, wiki_path):
    for key in ("lm.prompt_words", "lm.response_words", "lm.max_new_tokens"):
        with pytest.raises(ConfigError, match=rf"^{key}: must be > 0, got 0$"):
            checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"lm.format": "prompt_continuation", key: 0}))
    cfg = checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"lm.format": "prompt_continuation", "lm.prompt_words": 8,
                                                                        "lm.response_words": 4, "data.max_length": 64,
                                                                        "lm.student_max_length": 64}))
    prepared = get_task("cross_tokenizer").prepare(cfg)
    assert prepared.metrics == ["bits_per_byte", "perplexity", "rouge_l"]
    test = prepared.data.splits["test"]
    assert test.num_rows == 4 and all(len(r.split()) == 4 for r in test.column("response").to_pylist())
    assert prepared.data.end_tokens == {"t": 2, "s": 102}
    with pytest.raises(DataError, match=r"^data.files.train: no paragraph of the train documents has lm.prompt_words \+ "
                                        r"lm.response_words = 100004 words$"):
        get_task("cross_tokenizer").prepare(checked_config(cross_job(
            tmp_path, tiny_llama, wiki_path, **{"lm.format": "prompt_continuation", "lm.prompt_words": 100000,
                                                "lm.response_words": 4})))


def test_causal_lm_prompt_continuation_rows_carry_the_response_and_label_it_alone(tmp_path, tiny_llama, wiki_path):
    from pipelines.tasks.causal_lm.data import prompt_rows

    raw = cross_job(tmp_path, tiny_llama, wiki_path, task_type="causal_lm", objective={"alpha": 1.0},
                    **{"lm.format": "prompt_continuation", "lm.prompt_words": 8, "lm.response_words": 4, "data.max_length": 64,
                       "lm.student_max_length": None, "student.tokenizer": None})
    prepared = get_task("causal_lm").prepare(checked_config(raw))
    assert prepared.metrics[-1] == "rouge_l"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    table = prepared.data.splits["test"]
    ids, prompts, refs = prompt_rows(table)
    for row, prompt, ref in zip(table.to_pylist(), prompts, refs):
        response = tok(ref, add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt + response + [tok.eos_token_id]
        assert row["labels"] == [-100] * len(prompt) + response + [tok.eos_token_id]


def test_the_shipped_prompt_config_checks(tmp_path):
    from pathlib import Path

    from pipelines.tasks import load_checked_config

    root = Path(__file__).parents[2]
    cfg = load_checked_config(root / "pipelines/configs/cross_tokenizer_prompts.yaml", [f"run_dir={tmp_path / 'run'}"])
    assert cfg.task_type == "cross_tokenizer" and cfg.lm.format == "prompt_continuation" and cfg.lm.max_new_tokens == 24


def test_the_forward_hands_the_objective_response_masks_of_both_sides(tokenizers, records, tiny_llama):
    from types import SimpleNamespace

    from pipelines.tasks.causal_lm.models import load_causal_lm
    from pipelines.tasks.cross_tokenizer import CrossTokenizerTask
    from pipelines.tasks.cross_tokenizer.data import PairCollate, pad_pairs, prompt_pairs
    from pipelines.tasks.cross_tokenizer.models import PairLM

    teacher, student = tokenizers
    _, recs = records
    table = pad_pairs(prompt_pairs(recs[:3], teacher, student, 40, 36, ["r"] * 3).table, 4)  # + one padding row
    batch = PairCollate()(table)
    model = PairLM(load_causal_lm(str(tiny_llama)))  # vocabulary 49,152: holds both tokenizers' ids
    engine = type("Engine", (), {"module": model, "__call__": lambda self, **kw: model(**kw)})()  # DeepSpeed's call
    w = SimpleNamespace(engine=engine, teacher=model, device=torch.device("cpu"))
    rows = CrossTokenizerTask().forward(w, batch)
    rows_in = table.to_pylist()[:3]
    for side, key in (("s", "student_mask"), ("t", "teacher_mask")):
        mask = rows.extra[key]
        assert mask.shape[0] == 3  # the padding row removed
        for b, row in enumerate(rows_in):
            n, start = len(row[f"{side}_input_ids"]), row[f"{side}_response_start"]
            # Row t predicts token t + 1: rows start - 1 .. n - 2 predict the response and the end token.
            assert mask[b].tolist() == [False] * (start - 1) + [True] * (n - start) + [False] * (mask.shape[1] - n + 1)
