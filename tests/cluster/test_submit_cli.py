"""`sinkd submit` without a cluster: the entrypoint it builds, and every local check failing in one line
(exit 2) before anything is uploaded or any cluster is contacted."""

from __future__ import annotations

import pytest
import yaml
from pipeline_helpers import tiny_job

from pipelines.cli import main
from pipelines.recipes.submit import entrypoint

NOWHERE = "http://127.0.0.1:9"  # nothing listens: reaching it would fail with an address error


@pytest.fixture
def job(tmp_path, tiny_bert, sst2_small):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job(tmp_path / "run", tiny_bert, sst2_small)))
    return path


def test_entrypoint_is_the_sinkd_command_quoted_for_the_shell():
    assert entrypoint("train", ["job.yaml", "--set", "name=a b"]) == "sinkd train job.yaml --set 'name=a b' --no-progress"
    assert entrypoint("train", ["job.yaml", "--no-progress"]) == "sinkd train job.yaml --no-progress"
    assert entrypoint("tune", ["job.yaml", "space.yaml"]) == "sinkd tune job.yaml space.yaml"


@pytest.mark.parametrize("extra, expected", [
    (["train", "job.yaml", "--set", "train.lrr=1"], "train.lrr: unknown key (did you mean 'lr'?)"),
    (["train", "job.yaml", "--set", "train.epochs=many"], "train.epochs: expected an integer, got 'many'"),
    (["train", "missing.yaml"], "missing.yaml: config file not found in the working dir"),
    (["tune", "job.yaml"], "sinkd submit tune: needs CONFIG.yaml SPACE.yaml"),
    (["tune", "job.yaml", "space.yaml"], "space.yaml: search space file not found in the working dir"),
])
def test_bad_jobs_fail_locally_before_the_cluster_is_contacted(job, capsys, extra, expected):
    assert main(["submit", "--address", NOWHERE, "--working-dir", str(job.parent), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_bad_runtime_env_names_the_file(tmp_path, job, capsys):
    env = tmp_path / "env.yaml"
    env.write_text("working_dir: .\nenv_vars: {A: 1}\n")  # Ray wants string values
    assert main(["submit", "--address", NOWHERE, "--runtime-env", str(env), "train", str(job)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sinkd: error: --runtime-env {env}:") and len(err.splitlines()) == 1, err
    assert main(["submit", "--address", NOWHERE, "--runtime-env", str(tmp_path / "none.yaml"), "train"]) == 2
    assert "none.yaml: file not found" in capsys.readouterr().err


def test_an_unreachable_cluster_is_one_line_naming_the_address(job, capsys):
    assert main(["submit", "--address", NOWHERE, "--working-dir", str(job.parent), "train", job.name]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sinkd: error: --address {NOWHERE}:") and len(err.splitlines()) == 1, err
