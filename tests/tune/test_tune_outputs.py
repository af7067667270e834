"""The end-of-tuning table and plot, from trial records as write_outputs builds them (no Ray)."""

from __future__ import annotations

from pipelines.recipes.tune import _plot, format_table, short_name
from pipelines.recipes.tune_space import parse_space

SPACE = parse_space({
    "metric": "val_accuracy", "mode": "max", "num_samples": 3, "trial_resources": {"cpu": 0.01},
    "space": {"objective.sinkhorn.eps": {"loguniform": [0.01, 1.0]}, "objective.beta": {"uniform": [0.1, 10.0]}},
})


def _trial(n: int, acc: float, eps: float, beta: float, epochs: int) -> dict:
    name = f"_trial_e518c_{n:05d}_{n}_objective_sinkhorn_eps={eps:.4f}_2026-11-23_14-57-3{n}"
    return {"trial": name, "status": "OK", "iterations": epochs, "val_accuracy": acc,
            "params": {"objective.sinkhorn.eps": eps, "objective.beta": beta},
            "history": [[i + 1, acc - 0.01 * (epochs - i - 1)] for i in range(epochs)], "error": None}


def test_table_names_trials_by_id_and_marks_the_best(tmp_path):
    trials = [_trial(0, 0.71, 0.1, 1.0, 4), _trial(1, 0.52, 0.02, 5.0, 1), _trial(2, 0.74, 0.5, 0.3, 4)]
    table = format_table(trials, SPACE, trials[2])
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "status", "iters", "val_accuracy", "sinkhorn.eps", "beta"]
    assert lines[2].split()[:4] == ["e518c_00000", "OK", "4", "0.7100"]
    assert lines[3].split()[:3] == ["e518c_00001", "OK", "1"]  # stopped at the first rung
    assert lines[4].split()[:2] == ["e518c_00002", "*"] and lines[-1] == "* best"
    _plot(trials, SPACE, tmp_path / "tune.png")
    assert (tmp_path / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_name_falls_back_to_the_tail():
    assert short_name("_trial_0a1b2_00012_12_train_lr=0.001") == "0a1b2_00012"
    assert short_name("my-own-trial-name") == "my-own-trial-name"
