"""The cross-tokenizer job end to end through Ray Data -> Ray Train (2 workers, DeepSpeed ZeRO-2) ->
export -> evaluation: a tiny Llama teacher speaking SmolLM2's BPE, students speaking MiniLM's
WordPiece (teacher layers with a transplanted embedding), trained with MultiLevelOT, DSKD-CMA and CE
alone (ULD takes MultiLevelOT's path with another loss: its terms are tested without Ray); bits per
byte of every model recomputed here in plain PyTorch from the texts. The DSKD stage again under
ZeRO-3 (teacher, student and projectors partitioned), its last worker killed after the first step:
it resumes to the ZeRO-2 stage's losses and projectors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from llm_helpers import MINILM, cross_job

from pipelines.tasks import checked_config, get_task
from pipelines.tasks.cross_tokenizer.metrics import VALIDATION_METRICS

pytestmark = pytest.mark.slow


def plain_bpb(model_dir: str, tokenizer_dir, texts: list[str], cap: int, covered_bytes: list[int]) -> dict:
    """NLL of every block's tokens after the tokenizer's start token, from the text, in plain torch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    nll = tokens = 0.0
    for text in texts:
        ids = torch.tensor([[start] + tok(text, add_special_tokens=False)["input_ids"][:cap]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        tokens += ids.shape[1] - 1
    return {"bits_per_byte": nll / math.log(2) / sum(covered_bytes), "perplexity": math.exp(nll / tokens)}


def stage_state(run_dir: Path, stage: str) -> dict:
    """The sinkd state of a stage's latest checkpoint (loss log, resumes)."""
    from pipelines.recipes.export import latest_checkpoint
    from pipelines.train.files import STATE_FILE

    return json.loads((latest_checkpoint(run_dir / "ray" / stage) / STATE_FILE).read_text())


def loss_log(run_dir: Path, stage: str) -> list[float]:
    return [loss for _, loss in stage_state(run_dir, stage)["loss_log"]]


@pytest.fixture(scope="module")
def zero2(local_ray, tmp_path_factory, tiny_llama, wiki_path):
    """The ZeRO-2 job of three students (MultiLevelOT, DSKD-CMA, CE): (its raw config, its results)."""
    from pipelines.recipes.job import run_job

    raw = cross_job(tmp_path_factory.mktemp("zero2"), tiny_llama, wiki_path, name="mlot",
                    baselines={"dskd": {"method": "dskd"}, "ce": {"method": "ce"}})
    return raw, run_job(checked_config(raw), show_progress=False)


def test_cross_tokenizer_job_two_workers_zero2_export_and_bits_per_byte(zero2, tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.cli import main

    raw, results = zero2
    cfg = checked_config(raw)
    run_dir = Path(raw["run_dir"])
    test = get_task(cfg.task_type).prepare(checked_config(raw)).data.splits["test"].to_pylist()
    texts = [r["text"] for r in test]
    for name in ("mlot", "dskd", "ce"):
        model = results["models"][name]
        path = Path(model["path"])
        # A plain Hugging Face causal LM that speaks the student's tokenizer.
        assert AutoModelForCausalLM.from_pretrained(path).config.vocab_size == 30522
        assert AutoTokenizer.from_pretrained(path).get_vocab() == AutoTokenizer.from_pretrained(MINILM).get_vocab()
        assert json.loads((path / "sinkd_task.json").read_text())["global_step"] == 2  # 8 blocks / (2 workers x 2)
        ref = plain_bpb(str(path), MINILM, texts, 24, [r["s_bytes"] for r in test])
        assert model["test"]["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-4)
        assert model["test"]["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-4)
        assert model["layers"] == 2 and math.isfinite(model["val"]["bits_per_byte"])
        assert set(model["val"]) - {"tokens"} == set(VALIDATION_METRICS)  # what `sinkd tune` lets a space select
    teacher = results["models"]["teacher"]
    ref = plain_bpb(teacher["path"], tiny_llama, texts, 16, [r["t_bytes"] for r in test])
    assert teacher["test"]["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-4)
    # Same initial student and first batches: the first step's loss differs by the distillation terms only.
    first = {name: loss_log(run_dir, name)[0] for name in ("mlot", "dskd", "ce")}
    assert first["mlot"] > first["ce"] + 1e-4
    assert first["dskd"] != pytest.approx(first["ce"], abs=1e-4)  # 0.5 CE + 0.5 (t2s_CE + KD terms)
    # DSKD's projectors were trained in the stage and are exported beside the model, not inside it.
    projectors = torch.load(Path(results["models"]["dskd"]["path"]) / "projectors.pt")
    assert {k: tuple(v.shape) for k, v in projectors.items() if k.endswith("weight")} == {
        "query.weight": (64, 64), "t2s.weight": (32, 32), "s2t.weight": (32, 32)}
    assert not (Path(results["models"]["mlot"]["path"]) / "projectors.pt").exists()
    assert all(len(loss_log(run_dir, n)) == 2 for n in first)
    # `sinkd eval` scores an exported student the way the job did.
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "job.yaml"), "--model", results["models"]["mlot"]["path"]]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[results["models"]["mlot"]["path"]]
    assert scores["bits_per_byte"] == pytest.approx(results["models"]["mlot"]["test"]["bits_per_byte"], rel=1e-6)


def test_dskd_under_zero3_killed_and_resumed_gives_the_zero2_losses_and_projectors(zero2, tmp_path, tiny_llama, wiki_path):
    """Partitioning and a restart change where the weights live and when, not the math: DSKD's
    embeddings and heads gathered whole (whole_weights), the projectors partitioned inside the
    student's engine and restored from the checkpoint, the teacher behind its inference engine."""
    from pipelines.recipes.job import run_job

    raw, results = zero2
    zero3 = cross_job(tmp_path, tiny_llama, wiki_path, name="dskd", objective={"method": "dskd"},
                      **{"train.zero_stage": 3, "train.checkpoint_every_steps": 1, "debug.fail_at_step": 2})
    killed = run_job(checked_config(zero3), show_progress=False)
    state = stage_state(Path(zero3["run_dir"]), "dskd")
    assert state["resumed_from"] == [1]
    assert [s for s, _ in state["loss_log"]] == [1, 2]
    assert [x for _, x in state["loss_log"]] == pytest.approx(loss_log(Path(raw["run_dir"]), "dskd"), rel=1e-4)
    assert 0 < killed["models"]["dskd"]["teacher_params_on_rank"] <= killed["models"]["dskd"]["teacher_params"] / 2 + 1024
    a = torch.load(Path(results["models"]["dskd"]["path"]) / "projectors.pt")
    b = torch.load(Path(killed["models"]["dskd"]["path"]) / "projectors.pt")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert killed["models"]["dskd"]["test"]["bits_per_byte"] == pytest.approx(results["models"]["dskd"]["test"]["bits_per_byte"],
                                                                              rel=1e-4)


def test_the_mlot_stage_on_the_ranked_cache_trains_as_on_the_live_teacher_without_one(zero2, tmp_path, tiny_llama, wiki_path):
    """lm.cache.enabled: one Ray Data pass of the teacher, then the MultiLevelOT stage reads its ranked
    rows and loads no teacher; DSKD still runs it live. The losses and the exported student equal
    the live ZeRO-2 job's, and a later run finds the cache instead of scoring again."""
    from pipelines.recipes.job import run_job
    from pipelines.tasks.cross_tokenizer.cache import ensure_ranked_cache

    raw, results = zero2
    cached_raw = cross_job(tmp_path, tiny_llama, wiki_path, name="mlot", baselines={"dskd": {"method": "dskd"}},
                           **{"lm.cache.enabled": True, "lm.cache.dir": str(tmp_path / "cache"), "lm.cache.topk": 24})
    cfg = checked_config(cached_raw)
    cached = run_job(cfg, show_progress=False)
    assert "mlot: reads the teacher logit cache (top 24 logits and the normalisers at 1, 2)" in cached["notes"]
    assert any(n.startswith("dskd: runs the teacher live (DSKD reads the teacher's hidden states") for n in cached["notes"])
    assert "teacher_params" not in cached["models"]["mlot"] and cached["models"]["dskd"]["teacher_params"] > 0
    assert results["models"]["mlot"]["teacher_params"] > 0 and "teacher_params" not in results["models"]["ce"]  # CE: no teacher
    assert loss_log(Path(cached_raw["run_dir"]), "mlot") == pytest.approx(loss_log(Path(raw["run_dir"]), "mlot"), rel=1e-5)
    for name in ("mlot", "dskd"):
        assert cached["models"][name]["test"]["bits_per_byte"] == pytest.approx(
            results["models"][name]["test"]["bits_per_byte"], rel=1e-5)
    manifests = list((tmp_path / "cache").glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["rows"] == {"train": 8}
    again = ensure_ranked_cache(cfg, get_task(cfg.task_type).prepare(cfg).data, str(tiny_llama))
    assert not again.built and again.root == str(manifests[0].parent)
