"""Space files: the shipped ones parse into Tune domains; bad ones fail naming file and key."""

from pathlib import Path

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from pipelines.recipes.tune_space import SpaceError, load_space, parse_space

ROOT = Path(__file__).parents[2]
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml")) + sorted((ROOT / "benchmarks" / "studies").glob("tune_*.yaml"))
BASE = {"metric": "val_accuracy", "mode": "max", "space": {"objective.sinkhorn.eps": {"loguniform": [0.01, 1.0]}}}


def test_the_project_ships_the_three_spaces():
    assert {p.stem for p in SPACES} >= {"sinkd_classification", "sinkd_causal_lm", "kd_baseline"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_parses_to_tune_domains(path):
    space = load_space(path)
    params = space.param_space()
    assert params and all(isinstance(v, (tune.search.sample.Domain, dict)) for v in params.values())
    assert isinstance(space.make_scheduler(), ASHAScheduler)
    assert space.make_search_alg() is None  # random search


def test_distributions_map_to_their_tune_domains():
    space = parse_space({**BASE, "space": {
        "a": {"loguniform": [0.01, 1.0]}, "b": {"uniform": [1, 4]}, "c": {"randint": [5, 50]},
        "d": {"choice": ["kl", "js"]}, "e": {"grid": [1, 2, 3]}, "f": {"loguniform": ["1e-5", "1e-3"]},
    }})
    p = space.param_space()
    assert isinstance(p["a"].get_sampler(), tune.search.sample.LogUniform) and (p["a"].lower, p["a"].upper) == (0.01, 1.0)
    assert isinstance(p["b"].get_sampler(), tune.search.sample.Uniform) and (p["b"].lower, p["b"].upper) == (1, 4)
    assert (p["c"].lower, p["c"].upper) == (5, 50)
    assert p["d"].categories == ["kl", "js"]
    assert p["e"] == {"grid_search": [1, 2, 3]}
    assert space.num_trials() == 3 * space.num_samples
    assert (p["f"].lower, p["f"].upper) == (1e-5, 1e-3)  # YAML reads 1e-5 as a string


@pytest.mark.parametrize(
    "change,message",
    [
        ({"metrc": "x"}, "metrc: unknown key; valid: metric, mode"),
        ({"mode": "maximize"}, "mode: must be 'min' or 'max'"),
        ({"num_samples": 0}, "num_samples: must be an integer >= 1"),
        ({"space": {}}, "space: must map config keys"),
        ({"space": {"objective.sinkhorn.eps": {"lognormal": [0, 1]}}}, "space.objective.sinkhorn.eps: unknown distribution 'lognormal'"),
        ({"space": {"objective.sinkhorn.eps": {"loguniform": [0, 1]}}}, "space.objective.sinkhorn.eps.loguniform: needs low > 0"),
        ({"space": {"objective.beta": {"uniform": [2, 1]}}}, "space.objective.beta.uniform: needs low < high"),
        ({"space": {"objective.sinkhorn.max_iter": {"randint": [1.5, 9]}}}, "space.objective.sinkhorn.max_iter.randint: needs integers"),
        ({"space": {"train.lr": 0.1}}, "space.train.lr: must be one distribution"),
        ({"space": {"train.lr": {"choice": []}}}, "space.train.lr.choice: must be a non-empty list"),
        ({"scheduler": {"type": "hyperband"}}, "scheduler.type: unknown value 'hyperband'; valid: asha"),
        ({"scheduler": {"grace_period": 5, "max_t": 2}}, "scheduler.grace_period: 5 exceeds scheduler.max_t 2"),
        ({"scheduler": {"reduction_factor": 1}}, "scheduler.reduction_factor: must be a number > 1"),
        ({"scheduler": {"patience": 1}}, "scheduler.patience: unknown key"),
        ({"search": {"algorithm": "bohb"}}, "search.algorithm: unknown value 'bohb'; valid: random, optuna"),
        ({"trial_resources": {"cpu": -1}}, "trial_resources: must map resource names to numbers >= 0"),
        ({"trial_resources": {"cpu": 0}}, "trial_resources: needs one resource > 0"),
    ],
)
def test_invalid_spaces_are_rejected_naming_the_key(change, message):
    with pytest.raises(SpaceError) as err:
        parse_space({**BASE, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_required_key_and_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match="mode: required key is missing"):
        parse_space({"metric": "m", "space": BASE["space"]})
    bad = tmp_path / "bad.yaml"
    bad.write_text("metric: m\nmode: [unclosed\n")
    with pytest.raises(SpaceError, match=f"{bad}: not valid YAML"):
        load_space(bad)
    with pytest.raises(SpaceError, match="space file not found"):
        load_space(tmp_path / "none.yaml")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("metric: m\nmode: max\nspace: {train.lr: {uniform: [1, 0]}}\n")
    with pytest.raises(SpaceError, match=f"{wrong}: space.train.lr.uniform: needs low < high"):
        load_space(wrong)
