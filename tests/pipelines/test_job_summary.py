"""The job's one-screen summary says which student won on the headline metric, by how much, where
the teacher stands, and that one seed cannot tell the students apart."""

from __future__ import annotations

from pipelines.recipes.job import best_student_lines, summary


def _results(scores: dict, metrics=("accuracy", "f1")) -> dict:
    models = {name: {"test": {m: s - 0.01 * i for i, m in enumerate(metrics)}, "layers": 3, "params": 1e6,
                     "train_s": 10.0, "examples_per_s": 50.0} for name, s in scores.items()}
    return {"run_dir": "runs/x", "data": {"train": 10, "validation": 2, "test": 2}, "description": "d",
            "metrics": list(metrics), "notes": [], "models": models, "wall_s": 1.0}


def test_the_best_student_is_named_with_its_margins_the_teacher_and_the_untested_seed_noise():
    lines = best_student_lines(_results({"teacher": 0.80, "sinkd": 0.71, "kd": 0.74, "ce": 0.69}))
    assert lines[0] == "best student: kd (test accuracy 0.7400; +0.0300 over sinkd; +0.0500 over ce)"
    assert lines[1] == "teacher: test accuracy 0.8000 (+0.0600 over the best student)"
    assert lines[2].startswith("1 seed: whether these differences are beyond seed noise is not tested; "
                               "`sinkd compare runs/x/config.yaml --seeds 3`")


def test_the_headline_metric_decides_and_a_teacher_below_its_student_shows_a_negative_margin():
    results = _results({"teacher": 0.60, "a": 0.70, "b": 0.65}, metrics=("matthews", "accuracy"))
    results["models"]["b"]["test"]["accuracy"] = 0.99  # a better second metric does not make b the best
    lines = best_student_lines(results)
    assert lines[0].startswith("best student: a (test matthews 0.7000; +0.0500 over b)")
    assert lines[1] == "teacher: test matthews 0.6000 (-0.1000 over the best student)"


def test_one_student_has_no_ranking_to_doubt_and_the_summary_carries_the_lines():
    results = _results({"teacher": 0.8, "sinkd": 0.7})
    assert best_student_lines(results) == ["best student: sinkd (test accuracy 0.7000)",
                                           "teacher: test accuracy 0.8000 (+0.1000 over the best student)"]
    assert "best student: sinkd (test accuracy 0.7000)\n" in summary(results)
    given = _results({"s": 0.5})
    assert best_student_lines(given) == ["best student: s (test accuracy 0.5000)"]


def test_for_bits_per_byte_the_lowest_student_is_best_and_margins_count_as_better():
    results = _results({"teacher": 1.00, "sinkd": 1.20, "kd": 1.10}, metrics=("bits_per_byte", "perplexity"))
    lines = best_student_lines(results)
    assert lines[0] == "best student: kd (test bits_per_byte 1.1000, lower is better; +0.1000 over sinkd)"
    assert lines[1] == "teacher: test bits_per_byte 1.0000 (+0.1000 over the best student)"
