"""Fixtures for the cluster tests: the pipeline suite's tiny models and SST-2 rows (imported from
tests/pipelines/conftest.py, not copied) and its tiny_job config helper."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "pipelines"))  # pipeline_helpers.tiny_job

_spec = importlib.util.spec_from_file_location("sinkd_pipeline_fixtures", REPO / "tests" / "pipelines" / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
minilm, tiny_bert, sst2_small = _fixtures.minilm, _fixtures.tiny_bert, _fixtures.sst2_small
pytest_configure = _fixtures.pytest_configure  # its filters for Ray's own deprecation warnings

sys.path.insert(0, str(Path(__file__).parent))  # s3_server, local_cluster
from s3_server import s3_server, use_test_credentials  # noqa: E402

use_test_credentials()  # before the suite's local Ray starts: its workers read the test bucket too

s3 = pytest.fixture(scope="module")(s3_server)  # moto's S3 server, one per test module
