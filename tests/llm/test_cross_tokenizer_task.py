"""The cross-tokenizer task without Ray: its objective against sinkd.cross_vocab's functions and a
hand-written CE, the student with a transplanted vocabulary, the collate, and the config checks that
refuse what cannot work (one line naming the key). The Ray job is in test_cross_tokenizer_ray.py."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from llm_helpers import MINILM, cross_job

from pipelines.config import ConfigError
from pipelines.tasks import checked_config
from pipelines.tasks.protocol import Rows


def random_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 6, 30, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 8, 45, generator=g, dtype=torch.float64)
    labels = torch.randint(30, (3, 6), generator=g)
    s_mask = torch.ones(3, 6, dtype=torch.bool)
    s_mask[1, 4:] = False
    t_mask = torch.ones(3, 8, dtype=torch.bool)
    t_mask[2, 5:] = False
    labels[~s_mask] = -100
    return Rows(student, teacher, labels, extra={"student_mask": s_mask, "teacher_mask": t_mask})


def test_objective_terms_are_the_library_losses_plus_a_plain_ce():
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective
    from sinkd import multilevel_ot_loss, uld_loss

    rows = random_rows()
    s_mask, t_mask = rows.extra["student_mask"], rows.extra["teacher_mask"]
    real = rows.labels != -100
    ce = -torch.log_softmax(rows.student, -1).gather(-1, rows.labels.clamp_min(0)[..., None])[..., 0][real].mean()
    assert F.cross_entropy(rows.student[real], rows.labels[real]).item() == pytest.approx(ce.item(), rel=1e-12)

    mlot = CrossTokenizerObjective({"method": "multilevel_ot", "ce_weight": 0.5,
                                    "multilevel_ot": {"k": 10, "alpha": 0.3, "beta": 0.2, "gamma": 0.4}})(rows)
    ref = multilevel_ot_loss(rows.student, rows.teacher, s_mask, t_mask, k=10, alpha=0.3, beta=0.2, gamma=0.4)
    assert mlot.ce.item() == pytest.approx(ce.item(), rel=1e-12)
    assert mlot.kd.item() == pytest.approx(0.3 * (ref.had + 0.2 * ref.sl).item(), rel=1e-12)
    assert mlot.sinkhorn.item() == pytest.approx(0.3 * 0.4 * ref.sd.item(), rel=1e-12) and mlot.sinkhorn.item() > 0
    assert mlot.loss.item() == pytest.approx(0.5 * ce.item() + ref.total_kd.item(), rel=1e-12)

    uld = CrossTokenizerObjective({"method": "uld", "uld": {"weight": 2.0, "temperature": 2.0}})(rows)
    ref_uld = uld_loss(rows.student, rows.teacher, s_mask, t_mask, temperature=2.0)
    assert uld.kd.item() == pytest.approx(2 * ref_uld.item(), rel=1e-12) and uld.sinkhorn.item() == 0.0
    assert uld.loss.item() == pytest.approx(ce.item() + 2 * ref_uld.item(), rel=1e-12)

    only_ce = CrossTokenizerObjective({"method": "ce"})(rows)
    assert only_ce.loss.item() == pytest.approx(ce.item(), rel=1e-12) and only_ce.kd.item() == 0.0
    only_ce.loss.backward()  # the gradient reaches the student
    assert rows.student.grad.abs().sum() > 0


@pytest.mark.parametrize("objective, message", [
    ({"method": "gkd"}, r"^objective.method: must be one of ce, uld, multilevel_ot, dskd, got 'gkd'$"),
    ({"alpha": 1.0}, r"^objective.alpha: unknown key for task_type cross_tokenizer; valid: ce_weight, dskd, method, multilevel_ot, uld$"),
    ({"multilevel_ot": {"k": 0}}, r"^objective.multilevel_ot.k must be an integer >= 1, got 0"),
    ({"multilevel_ot": {"lambda": 0.1}}, r"^objective.multilevel_ot.lambda: unknown key"),
    ({"uld": {"reduction": "mean"}}, r"^objective.uld.reduction"),
    ({"uld": {"weight": -1}}, r"^objective.uld.weight: must be a number >= 0, got -1$"),
    ({"ce_weight": "one"}, r"^objective.ce_weight: must be a number >= 0, got 'one'$"),
])
def test_objective_errors_name_the_key(objective, message):
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective

    with pytest.raises(ConfigError, match=message):
        CrossTokenizerObjective(objective)


def test_transplanted_vocabulary_starts_each_student_token_from_the_teachers_embedding_of_its_text(tiny_llama):
    from transformers import AutoTokenizer

    from pipelines.tasks.causal_lm.models import load_causal_lm
    from pipelines.tasks.cross_tokenizer.models import (
        transplanted_embedding,
        with_vocabulary,
    )

    teacher, t_tok, s_tok = load_causal_lm(str(tiny_llama)), AutoTokenizer.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(MINILM)
    e_t = teacher.get_input_embeddings().weight.detach()
    e_s = transplanted_embedding(e_t, t_tok, s_tok)
    assert e_s.shape == (30522, e_t.shape[1])
    the, ing, cls = (s_tok.convert_tokens_to_ids(t) for t in ("the", "##ing", "[CLS]"))
    # "the" starts a word: the teacher's " the" (one byte-level token, with its space); "##ing"
    # continues one: the teacher's "ing" without a space; [CLS] means nothing to the teacher: the mean row.
    (space_the,), ing_ids = t_tok(" the", add_special_tokens=False)["input_ids"], t_tok("ing", add_special_tokens=False)["input_ids"]
    assert torch.equal(e_s[the], e_t[space_the])
    assert torch.allclose(e_s[ing], e_t[ing_ids].mean(0))
    assert torch.allclose(e_s[cls], e_t.mean(0))
    word = s_tok.convert_tokens_to_ids("unbelievable") if "unbelievable" in s_tok.get_vocab() else s_tok.convert_tokens_to_ids("university")
    ids = t_tok(" " + s_tok.convert_ids_to_tokens(word), add_special_tokens=False)["input_ids"]
    assert len(ids) >= 1 and torch.allclose(e_s[word], e_t[ids].mean(0))

    student = with_vocabulary(load_causal_lm(str(tiny_llama)), e_s, s_tok)
    assert student.config.vocab_size == 30522 and student.config.bos_token_id == 101
    assert student.config.eos_token_id == 102 and student.config.pad_token_id == 0
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()  # still tied
    logits = student(input_ids=torch.tensor([[101, the, ing]])).logits
    assert logits.shape == (1, 3, 30522)


def test_pair_collate_masks_padding_rows_and_pads_each_side_to_its_own_longest_row():
    from pipelines.tasks.cross_tokenizer.data import PairCollate, pad_pairs

    table = pa.table({"id": pa.array([0, 1], pa.int64()), "text": ["ab", "cde"], "text_bytes": pa.array([2, 3], pa.int64()),
                      "t_input_ids": pa.array([[1, 5, 6], [1, 7]], pa.list_(pa.int32())), "t_bytes": pa.array([2, 3], pa.int64()),
                      "s_input_ids": pa.array([[101, 8], [101, 9, 10, 11]], pa.list_(pa.int32())),
                      "s_bytes": pa.array([2, 2], pa.int64())})
    padded = pad_pairs(table, 3)  # one padding row: a copy of row 0 with id -1 and no bytes
    assert padded["id"].to_pylist() == [0, 1, -1] and padded["s_bytes"].to_pylist() == [2, 2, 0]
    b = PairCollate()(padded)
    assert b["t_input_ids"].tolist() == [[1, 5, 6], [1, 7, 0], [1, 5, 6]]
    assert b["t_attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert b["s_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert b["s_labels"].tolist() == [[101, 8, -100, -100], [101, 9, 10, 11], [-100] * 4]
    assert b["s_bytes"].tolist() == [2, 2, 0] and b["ids"].tolist() == [0, 1, -1]


@pytest.mark.parametrize("over, message", [
    ({"student.tokenizer": None}, r"^student.tokenizer: required with student.init: teacher_layers"),
    ({"student.tokenizer": "/no/such/dir"}, r"^student.tokenizer: directory not found /no/such/dir$"),
    ({"lm.format": "prompt_response"}, r"^data.files.train: lm.format prompt_response needs jsonl records, got wiki_xml"),
    ({"lm.cache.temperatures": []}, r"^lm.cache.temperatures: must be a non-empty list of distinct numbers > 0"),
    ({"lm.cache.temperatures": [1.0, 1.0]}, r"^lm.cache.temperatures: must be a non-empty list of distinct"),
    ({"lm.cache.temperatures": [2.0, -1.0]}, r"^lm.cache.temperatures: must be a non-empty list of distinct"),
    ({"student.layers": [0, 9]}, r"^student.layers: must be distinct indices of the teacher's 4 layers, got \[0, 9\]$"),
    ({"student.init": "config", "student.layers": None, "student.config": {"vocab_size": 100}},
     r"^student.config.vocab_size: 100 is below the student tokenizer's 30,522 tokens"),
    ({"objective.method": "kd"}, r"^objective.method: must be one of ce, uld, multilevel_ot, dskd, got 'kd'$"),
    ({"baselines": {"uld": {"uld": {"k": 0}}}}, r"^baselines.uld.uld.k"),
    ({"lm.student_max_length": 4}, r"^lm.student_max_length: must be >= 8, got 4$"),
])
def test_bad_cross_tokenizer_configs_are_refused_before_any_work(tmp_path, tiny_llama, wiki_path, over, message):
    with pytest.raises(ConfigError, match=message):
        checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **over))
    assert not (tmp_path / "run").exists()


def test_a_student_tokenizer_equal_to_the_teachers_points_to_causal_lm(tmp_path, tiny_llama, wiki_path):
    copy = tmp_path / "same_tokenizer"
    shutil.copytree(tiny_llama, copy)  # the teacher's tokenizer in another folder: the same tokenizer
    with pytest.raises(ConfigError, match=r"^student.tokenizer: its tokenizer is the teacher's \(49,152 tokens\); use task_type: causal_lm"):
        checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"student.tokenizer": str(copy)}))


def test_a_pretrained_student_whose_tokenizer_outgrows_its_embedding_is_refused(tmp_path, tiny_llama, wiki_path):
    from llm_helpers import make_tiny_llama

    small = make_tiny_llama(tmp_path / "student", MINILM, layers=1)  # vocab_size 49,152 >= 30,522: fine
    checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"student.init": "pretrained", "student.layers": None,
                                                                 "student.tokenizer": None, "student.path": str(small)}))
    conf = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**conf, "vocab_size": 30000}))
    with pytest.raises(ConfigError, match=r"^student.path: its tokenizer has 30,522 tokens but the model's embedding has 30,000 rows"):
        checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"student.init": "pretrained", "student.layers": None,
                                                                     "student.tokenizer": None, "student.path": str(small)}))


def test_student_tokenizer_is_refused_by_the_same_tokenizer_tasks(tmp_path, tiny_llama, wiki_path):
    raw = cross_job(tmp_path, tiny_llama, wiki_path, task_type="causal_lm", objective={"alpha": 1.0})
    with pytest.raises(ConfigError, match=r"^student.tokenizer: task_type causal_lm distils into the teacher's tokenizer"):
        checked_config(raw)
    raw = cross_job(tmp_path, tiny_llama, wiki_path, task_type="causal_lm", objective={"alpha": 1.0}, student={"init": "teacher_layers", "layers": [0]})
    raw["lm"]["cache"] = {"temperatures": [1.0]}
    with pytest.raises(ConfigError, match=r"^lm.cache.temperatures: task_type cross_tokenizer only"):
        checked_config(raw)


# ----------------------------------------------------------------------------- the teacher's ranked logit cache


@pytest.mark.parametrize("objective, cache, use", [
    ({"method": "ce"}, {}, "none"),
    ({"method": "ce"}, {"enabled": True}, "none"),
    ({"method": "multilevel_ot"}, {}, "live"),  # the cache is off
    ({"method": "multilevel_ot"}, {"enabled": True}, "cache"),  # k 50 <= topk 64, tau 1 and 2 kept
    ({"method": "multilevel_ot", "multilevel_ot": {"k": 80}}, {"enabled": True}, "live"),
    ({"method": "multilevel_ot", "multilevel_ot": {"k": 80}}, {"enabled": True, "topk": 80}, "cache"),
    ({"method": "multilevel_ot", "multilevel_ot": {"tau_sd": 3.0}}, {"enabled": True}, "live"),
    ({"method": "multilevel_ot", "multilevel_ot": {"tau_sd": 3.0, "gamma": 0.0}}, {"enabled": True}, "cache"),
    ({"method": "multilevel_ot", "multilevel_ot": {"tau_sd": 3.0}}, {"enabled": True, "temperatures": [1, 3]}, "cache"),
    ({"method": "uld"}, {"enabled": True}, "live"),  # k null: whole sorted vocabularies
    ({"method": "uld", "uld": {"k": 64, "temperature": 2.0}}, {"enabled": True}, "cache"),
    ({"method": "dskd"}, {"enabled": True}, "live"),
])
def test_each_method_reads_the_cache_only_when_it_holds_what_its_loss_reads(tmp_path, tiny_llama, wiki_path, objective, cache, use):
    from pipelines.tasks.cross_tokenizer.cache import teacher_use
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective

    cfg = checked_config(cross_job(tmp_path, tiny_llama, wiki_path, objective=objective, **{"lm.cache": cache}))
    assert teacher_use(cfg, CrossTokenizerObjective(objective))[0] == use


def test_the_ranked_cache_rows_give_the_live_teachers_losses(tmp_path, tiny_llama, wiki_path):
    """RankedScorer's rows, read back through the collate (with a padding row), are the live teacher's
    ranked rows: the objective on them equals the objective on the live logits."""
    from pipelines.tasks import get_task
    from pipelines.tasks.causal_lm.data import padding_rows
    from pipelines.tasks.cross_tokenizer.cache import RankedScorer, cached_teacher
    from pipelines.tasks.cross_tokenizer.data import PairCollate
    from pipelines.tasks.cross_tokenizer.metrics import side_inputs
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective
    from sinkd import RankedLogits

    cfg = checked_config(cross_job(tmp_path, tiny_llama, wiki_path))
    table = get_task(cfg.task_type).prepare(cfg).data.splits["train"].slice(0, 5)
    scored = pa.concat_tables([RankedScorer(str(tiny_llama), 24, [1.0, 2.0])(table.slice(0, 3)),
                               RankedScorer(str(tiny_llama), 24, [1.0, 2.0])(table.slice(3, 2))])
    assert scored.column_names[:len(table.column_names)] == table.column_names  # the paired rows, whole
    lengths = [len(ids) - 1 for ids in table["t_input_ids"].to_pylist()]
    assert [len(v) for v in scored["t_top"].to_pylist()] == [24 * n for n in lengths]
    batch = PairCollate()(pa.concat_tables([scored, padding_rows(scored, 1)]))
    cached = cached_teacher(batch, "cpu")
    assert cached.temperatures == (1.0, 2.0) and cached.vocab == 49152 and cached.shape == (6, max(lengths))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        live = model(**side_inputs(batch, "t", "cpu")).logits[:, :-1].float()
    reference = RankedLogits.from_logits(live, 24, (1.0, 2.0))
    t_mask = batch["t_labels"][:, 1:] != -100
    for k in (1, 20, 24):
        torch.testing.assert_close(cached.log_ranked(k, 2.0)[t_mask], reference.log_ranked(k, 2.0)[t_mask], rtol=0, atol=1e-5)
    real = batch["ids"] != -1
    g = torch.Generator().manual_seed(0)
    student = torch.randn(6, batch["s_input_ids"].shape[1] - 1, 30522, generator=g)
    labels = batch["s_labels"][:, 1:]
    for values in ({"method": "multilevel_ot", "multilevel_ot": {"k": 20}}, {"method": "uld", "uld": {"k": 24, "temperature": 2.0}}):
        objective = CrossTokenizerObjective(values)
        extra = {"student_mask": (labels != -100)[real], "teacher_mask": t_mask[real]}
        got = objective(Rows(student[real], cached[real], labels[real], extra=extra))
        want = objective(Rows(student[real], live[real], labels[real], extra=extra))
        assert float(got.kd) > 0
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(got.sinkhorn, want.sinkhorn, rtol=1e-5, atol=0)


def test_the_cache_fingerprint_covers_both_sides_tokens_the_width_and_the_temperatures(tmp_path, tiny_llama, wiki_path):
    from pipelines.tasks import get_task
    from pipelines.tasks.cross_tokenizer.cache import fingerprint

    cfg = checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"lm.cache.enabled": True}))
    table = get_task(cfg.task_type).prepare(cfg).data.splits["train"]
    base = fingerprint(cfg, table, str(tiny_llama))
    assert fingerprint(cfg, table, str(tiny_llama)) == base
    s_ids = table["s_input_ids"].to_pylist()
    s_ids[0][1] += 1  # another student token: the cached rows carry the student's side too
    changed = [fingerprint(cfg, table.set_column(table.schema.get_field_index("s_input_ids"), "s_input_ids",
                                                 pa.array(s_ids, table.schema.field("s_input_ids").type)), str(tiny_llama))]
    for key, value in (("lm.cache.topk", 32), ("lm.cache.temperatures", [1.0, 3.0]), ("lm.cache.dtype", "bfloat16")):
        changed.append(fingerprint(checked_config(cross_job(tmp_path, tiny_llama, wiki_path, **{"lm.cache.enabled": True, key: value})),
                                   table, str(tiny_llama)))
    changed.append(fingerprint(cfg, table.slice(1), str(tiny_llama)))
    assert len({base, *changed}) == len(changed) + 1


# ----------------------------------------------------------------------------- DSKD with cross-model attention


def reference_dskd(proj, s, t, T, tau):
    """DSKD-CMA's KD terms written token by token from the paper's formulas (float64 loops over each
    sequence's real tokens; std over the real rows of the batch), the oracle for dskd_cma_terms."""
    import math

    def real_rows(x, mask):
        return torch.cat([x[b][mask[b]] for b in range(x.shape[0])])

    E, Et = s.embedding, t.embedding
    t_index = torch.cat([Et[t.inputs], Et[t.targets]], -1)
    sd_index, sd_hidden, sd_target = (real_rows(x, t.mask).std() for x in (t_index, t.hidden, Et[t.targets]))
    ce = t2s_kd = s2t_kd = 0.0
    n_s = int(s.mask.sum())
    for b in range(s.logits.shape[0]):
        js, is_ = s.mask[b].nonzero()[:, 0].tolist(), t.mask[b].nonzero()[:, 0].tolist()
        q = torch.stack([proj.query(torch.cat([E[s.inputs[b, j]], E[s.targets[b, j]]])) for j in js])
        k = torch.stack([t_index[b, i] / sd_index for i in is_])
        scores = q @ k.T / math.sqrt(k.shape[1])
        v_t = torch.stack([proj.t2s(t.hidden[b, i] / sd_hidden + Et[t.targets[b, i]] / sd_target) for i in is_])
        v_s = torch.stack([proj.s2t(s.hidden[b, j]) for j in js])
        t2s = torch.softmax(scores, 1) @ v_t @ s.head.T
        s2t = torch.softmax(scores.T, 1) @ v_s @ t.head.T
        for row, j in enumerate(js):
            y = int(s.targets[b, j])
            ce = ce - torch.log_softmax(t2s[row], 0)[y]
            if int(t2s[row].argmax()) == y:
                p = torch.softmax(t2s[row].detach() / (T * tau), 0)
                t2s_kd = t2s_kd + (p * (p.log() - torch.log_softmax(s.logits[b, j] / T, 0))).sum()
        for row, i in enumerate(is_):
            p = torch.softmax(t.logits[b, i] / T, 0)
            s2t_kd = s2t_kd + (p * (p.log() - torch.log_softmax(s2t[row] / T, 0))).sum()
    return {"t2s_ce": ce / n_s, "t2s_kd": t2s_kd / n_s, "s2t_kd": s2t_kd / n_s}


def random_sides(seed=0, pad_student=0, pad_teacher=0):
    """A student (V 4, d 6: small, so that some t2s predictions are right and t2s_KD counts) and a
    teacher (V 45, d 10) view of 2 blocks of different lengths; padding columns appended on request
    (random values: they must not matter)."""
    from pipelines.tasks.cross_tokenizer.dskd import Side

    g = torch.Generator().manual_seed(seed)

    def side(B, T, V, d, lengths, pad, emb, head):
        T2 = T + pad
        mask = torch.arange(T2)[None, :] < torch.tensor(lengths)[:, None]
        ids = torch.randint(V, (B, T2 + 1), generator=g)
        return Side(torch.randn(B, T2, V, generator=g, dtype=torch.float64), torch.randn(B, T2, d, generator=g, dtype=torch.float64),
                    ids[:, :-1], ids[:, 1:], mask, emb, head)

    e_s, h_s = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    e_t, h_t = torch.randn(45, 10, generator=g, dtype=torch.float64), torch.randn(45, 10, generator=g, dtype=torch.float64)
    return side(2, 5, 4, 6, [5, 3], pad_student, e_s, h_s), side(2, 7, 45, 10, [6, 7], pad_teacher, e_t, h_t)


def test_dskd_terms_match_a_token_by_token_reference_and_ignore_padding():
    from pipelines.tasks.cross_tokenizer.dskd import CMAProjectors, dskd_cma_terms

    torch.manual_seed(0)
    proj = CMAProjectors(6, 10).double()
    s, t = random_sides()
    s.logits.requires_grad_(True)
    s.hidden.requires_grad_(True)
    got = dskd_cma_terms(proj, s, t, temperature=2.0, teacher_temperature=1.5)
    ref = reference_dskd(proj, s, t, 2.0, 1.5)
    for key in ref:
        assert got[key].item() == pytest.approx(float(torch.as_tensor(ref[key]).detach()), rel=1e-10, abs=1e-12), key
    assert got["t2s_ce"] > 0 and got["t2s_kd"] > 0 and got["s2t_kd"] > 0
    sum(got.values()).backward()
    # The projectors learn (query and t2s through t2s_ce, s2t through s2t_kd), so does the student.
    for name in ("query", "t2s", "s2t"):
        assert getattr(proj, name).weight.grad.abs().sum() > 0, name
    assert s.hidden.grad.abs().sum() > 0 and s.embedding.grad is None  # embeddings are read, not trained here
    # Padding columns on both sides (random values, masked out) change nothing.
    s2, t2 = random_sides(pad_student=3, pad_teacher=2)
    for x, y in ((s2, s), (t2, t)):
        for name in ("logits", "hidden", "inputs", "targets"):
            getattr(x, name)[:, : getattr(y, name).shape[1]] = getattr(y, name).detach()
    padded = dskd_cma_terms(proj, s2, t2, temperature=2.0, teacher_temperature=1.5)
    for key in ref:
        assert padded[key].item() == pytest.approx(got[key].item(), rel=1e-12), key


def test_dskd_objective_weights_ce_and_kd_and_checks_its_keys():
    from pipelines.tasks.cross_tokenizer.dskd import CMAProjectors, dskd_cma_terms
    from pipelines.tasks.cross_tokenizer.objective import CrossTokenizerObjective

    torch.manual_seed(0)
    proj = CMAProjectors(6, 10).double()
    s, t = random_sides()
    labels = torch.where(s.mask, s.targets, -100)
    rows = Rows(s.logits, t.logits, labels, extra={"student_mask": s.mask, "teacher_mask": t.mask, "projectors": proj,
                                                   "student_side": s, "teacher_side": t})
    objective = CrossTokenizerObjective({"method": "dskd", "dskd": {"kd_rate": 0.3, "temperature": 1.0}})
    out = objective(rows)
    kd = sum(dskd_cma_terms(proj, s, t, 1.0, 1.0).values())
    ce = F.cross_entropy(s.logits[s.mask], s.targets[s.mask])
    assert out.loss.item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-12)
    assert out.kd.item() == pytest.approx(0.3 * kd.item(), rel=1e-12) and objective.projector_lr == 1e-3
    assert CrossTokenizerObjective({"method": "uld"}).projector_lr is None
    for bad, message in (({"kd_rate": 1.5}, r"^objective.dskd.kd_rate: must be in \[0, 1\]"),
                         ({"projector_lr": 0}, r"^objective.dskd.projector_lr: must be a number > 0, got 0$"),
                         ({"lr": 1e-3}, r"^objective.dskd.lr: unknown key; valid: kd_rate, temperature")):
        with pytest.raises(ConfigError, match=message):
            CrossTokenizerObjective({"method": "dskd", "dskd": bad})


def test_projectors_get_their_own_parameter_group_and_the_schedule_peaks_at_each_groups_lr():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR, WarmupDecayLR

    from pipelines.config import TrainConfig
    from pipelines.tasks.cross_tokenizer.dskd import CMAProjectors
    from pipelines.tasks.cross_tokenizer.models import PairLM
    from pipelines.train.engine import deepspeed_config, param_groups

    module = PairLM(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), CMAProjectors(4, 6), projector_lr=0.01)
    groups = param_groups(module, 0.1)
    by_lr = {(g.get("lr"), g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in groups}
    assert by_lr == {(None, 0.1): 16, (None, 0.0): 12, (0.01, 0.1): 8 * 12 + 6 * 4 + 4 * 6, (0.01, 0.0): 12 + 4 + 6}
    for schedule, cls in (("linear", WarmupDecayLR), ("cosine", WarmupCosineLR)):
        params = deepspeed_config(TrainConfig(lr=1e-3, schedule=schedule, warmup_ratio=0.5), 10, False)["scheduler"]["params"]
        optimizer = torch.optim.AdamW(param_groups(module, 0.1), lr=1e-3)
        scheduler = cls(optimizer, **params)
        for step in range(1, 7):
            optimizer.step()
            scheduler.step()
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs[0] > 0 or step == 1  # warm-up from 0
            assert lrs == pytest.approx([lrs[0], lrs[0], 10 * lrs[0], 10 * lrs[0]]), (schedule, step)
        if schedule == "linear":  # the end of the warm-up (5 steps): every group at its own peak
            assert lrs == pytest.approx([1e-3, 1e-3, 0.01, 0.01])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_a_padding_only_dskd_micro_batch_joins_the_other_ranks_under_zero3(zero_stage):
    """ZeRO-3 over 2 ranks gathers the teacher's weights in its forward, DSKD's embeddings and heads
    (whole_weights) and its projectors from every rank: a rank whose micro-batch holds padding rows
    only still runs all of them, and its zero loss reaches every projector (so their gradient
    reduction has this rank too). Below ZeRO-3 it skips the teacher."""
    from types import SimpleNamespace

    from llm_helpers import EngineLike
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.tasks import get_task
    from pipelines.tasks.cross_tokenizer.data import PairCollate, pad_pairs
    from pipelines.tasks.cross_tokenizer.dskd import CMAProjectors
    from pipelines.tasks.cross_tokenizer.models import PairLM
    from pipelines.train.worker import step_loss

    def llama(vocab, width):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2))

    table = pa.table({"id": pa.array([0], pa.int64()), "text": ["ab"], "text_bytes": pa.array([2], pa.int64()),
                      "t_input_ids": pa.array([[1, 5, 6]], pa.list_(pa.int32())), "t_bytes": pa.array([2], pa.int64()),
                      "s_input_ids": pa.array([[3, 8, 9, 4]], pa.list_(pa.int32())), "s_bytes": pa.array([2], pa.int64())})
    batch = PairCollate()(pad_pairs(table, 3).slice(1))  # two padding rows, nothing real
    assert batch["ids"].tolist() == [-1, -1]
    task = get_task("cross_tokenizer")
    teacher = PairLM(llama(40, 24)).eval()
    seen = []
    teacher.register_forward_hook(lambda *_: seen.append(1))
    w = SimpleNamespace(task=task, objective=task.objective({"method": "dskd"}), device=torch.device("cpu"), world=2,
                        engine=EngineLike(PairLM(llama(30, 16), CMAProjectors(16, 24), 1e-3)), teacher=teacher,
                        stage=SimpleNamespace(train=SimpleNamespace(zero_stage=zero_stage)))
    loss, terms = step_loss(w, batch)
    loss.backward()
    projectors = w.engine.module.projectors
    assert loss.item() == 0.0 and not terms.any()
    assert len(seen) == (1 if zero_stage == 3 else 0)
    if zero_stage == 3:
        assert all(p.grad is not None and not p.grad.any() for p in projectors.parameters())  # reached, with zeros
    else:
        assert all(p.grad is None for p in projectors.parameters())


def test_the_shipped_config_and_its_tune_space_check(tmp_path):
    """pipelines/configs/cross_tokenizer.yaml (the real SmolLM2 teacher, MiniLM's tokenizer) passes every
    check, and each value tune_spaces/cross_tokenizer.yaml can take is a valid change of it."""
    from pathlib import Path

    from pipelines.recipes.tune import check_space_against_config
    from pipelines.recipes.tune_space import load_space
    from pipelines.tasks import load_checked_config

    root = Path(__file__).parents[2]
    cfg = load_checked_config(root / "pipelines/configs/cross_tokenizer.yaml", [f"run_dir={tmp_path / 'run'}"])
    assert cfg.task_type == "cross_tokenizer" and set(cfg.baselines) == {"uld", "dskd", "ce"}
    space = load_space(root / "tune_spaces/cross_tokenizer.yaml")
    assert space.metric == "val_bits_per_byte" and space.mode == "min"
    check_space_against_config(cfg, space)
