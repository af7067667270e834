"""Model adapters: PKD-style layer copies (BERT and T5), label-token logits for encoder-decoders."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

from pipelines.tasks import checked_config
from pipelines.tasks.classification.models import (
    Classifier,
    is_task_tuned,
    label_token_ids,
    load_pretrained,
    model_kind,
    student_from_teacher_layers,
)


def test_bert_student_copies_the_chosen_teacher_layers(tiny_bert):
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    student = student_from_teacher_layers(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate([1, 3]):
        for name in ("attention.self.query.weight", "output.dense.bias", "intermediate.dense.weight"):
            assert torch.equal(s[f"bert.encoder.layer.{j}.{name}"], t[f"bert.encoder.layer.{i}.{name}"])
    for key in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s[key], t[key])
    assert not torch.equal(s["bert.encoder.layer.0.output.dense.weight"], t["bert.encoder.layer.0.output.dense.weight"])


def test_t5_student_copies_blocks_and_relative_bias(tiny_t5):
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5)
    student = student_from_teacher_layers(teacher, [1])
    assert (student.config.num_layers, student.config.num_decoder_layers) == (1, 1)
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["encoder.block.0.layer.0.SelfAttention.q.weight"], t["encoder.block.1.layer.0.SelfAttention.q.weight"])
    assert torch.equal(s["decoder.block.0.layer.1.EncDecAttention.k.weight"], t["decoder.block.1.layer.1.EncDecAttention.k.weight"])
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(s[bias], t[bias])  # only block 0 has it: taken from the teacher's block 0


def test_t5_classifier_returns_label_token_logits(tiny_t5):
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    ids = label_token_ids(tok, ["negative", "positive"])
    assert len(set(ids)) == 2 and model_kind(tiny_t5) == "seq2seq"
    model = load_pretrained(tiny_t5, "seq2seq", 2).eval()
    clf = Classifier(model, "seq2seq", ids).eval()
    enc = tok(["a fine film", "a dull one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clf(enc["input_ids"], enc["attention_mask"])
        full = model(**enc, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits
    assert logits.shape == (2, 2)
    torch.testing.assert_close(logits, full[:, 0, ids])
    with pytest.raises(ValueError, match="do not start with distinct tokens"):
        label_token_ids(tok, ["good", "goodx"])  # both start with the token "good"


def test_task_tuned_detection(tiny_bert, minilm):
    assert is_task_tuned(tiny_bert, 2) and not is_task_tuned(tiny_bert, 3)
    assert not is_task_tuned(minilm, 2)  # a sentence encoder: no classifier head yet -> fine-tune first


def test_student_from_config_and_from_pretrained(tiny_bert, tmp_path):
    from pipeline_helpers import tiny_job

    from pipelines.tasks.classification.models import build_student

    raw = tiny_job(tmp_path / "run", tiny_bert, {"train": str(tiny_bert / "config.json")})
    raw["data"]["format"] = "csv"
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32}}
    cfg = checked_config(raw)
    torch.manual_seed(0)
    small = build_student(cfg, str(tiny_bert), "encoder", 2, ["neg", "pos"])
    assert (small.config.num_hidden_layers, small.config.hidden_size, small.config.num_labels) == (1, 16, 2)
    assert small.config.id2label == {0: "neg", 1: "pos"}
    small.save_pretrained(tmp_path / "small")
    raw["student"] = {"init": "pretrained", "path": str(tmp_path / "small")}
    again = build_student(checked_config(raw), str(tiny_bert), "encoder", 2, ["neg", "pos"])
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values()))


def test_students_copy_layers_from_the_fine_tuned_teacher_or_from_teacher_path_before_fine_tuning(minilm, tmp_path):
    """student.layers_from: finetuned (default) slices the teacher the job fine-tuned, head included;
    pretrained slices teacher.path as it was (MiniLM has no task head: a new one, seeded)."""
    from pipeline_helpers import tiny_job

    from pipelines.config import ConfigError
    from pipelines.tasks.classification.models import build_student

    tuned = load_pretrained(minilm, "encoder", 2, ["neg", "pos"])
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)  # stands in for fine-tuning: every weight moved
    tuned.save_pretrained(tmp_path / "tuned")
    raw = tiny_job(tmp_path / "run", minilm, {"train": str(minilm / "config.json")}, **{
        "data.format": "csv", "teacher.finetune": "always", "student.layers": [1, 4]})

    def student(layers_from: str):
        raw["student"]["layers_from"] = layers_from
        torch.manual_seed(0)
        return build_student(checked_config(raw), str(tmp_path / "tuned"), "encoder", 2, ["neg", "pos"]).state_dict()

    pretrained = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2).state_dict()
    t, s = tuned.state_dict(), student("finetuned")
    assert torch.equal(s["bert.encoder.layer.1.output.dense.weight"], t["bert.encoder.layer.4.output.dense.weight"])
    assert torch.equal(s["classifier.weight"], t["classifier.weight"])
    s, again = student("pretrained"), student("pretrained")
    assert torch.equal(s["bert.encoder.layer.1.output.dense.weight"], pretrained["bert.encoder.layer.4.output.dense.weight"])
    assert torch.equal(s["bert.embeddings.word_embeddings.weight"], pretrained["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(s["classifier.weight"], t["classifier.weight"])  # a new head, not the fine-tuned one
    assert torch.equal(s["classifier.weight"], again["classifier.weight"])  # the same on every rank under the seed
    raw["student"] = {"init": "config", "config": {"num_hidden_layers": 1}, "layers_from": "pretrained"}
    with pytest.raises(ConfigError, match=r"^student\.layers_from: used only with student\.init: teacher_layers"):
        checked_config(raw)
