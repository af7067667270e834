"""`sinkd compare`: the statistics against closed forms of the t distribution, the objective names and
their one-line errors (no Ray), the paper preset against the official code's loss, and (slow) the
command end to end: 2 objectives x 2 seeds on a tiny model, then the finished command rerun twice."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from pipeline_helpers import snapshot, tiny_job

from pipelines.config import Config, ConfigError
from pipelines.recipes import compare

# ----------------------------------------------------------------------------- statistics


def t_sf_df1(t: float) -> float:
    """P(T > t), 1 degree of freedom (Cauchy): 1/2 - arctan(t) / pi."""
    return 0.5 - math.atan(t) / math.pi


def t_sf_df2(t: float) -> float:
    """P(T > t), 2 degrees of freedom: 1/2 - t / (2 sqrt(2 + t^2))."""
    return 0.5 - t / (2 * math.sqrt(2 + t * t))


def t_quantile_df1(p: float) -> float:
    return math.tan(math.pi * (p - 0.5))


def t_quantile_df2(p: float) -> float:
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


@pytest.mark.parametrize("x, y, sf, quantile", [
    ([0.872, 0.866, 0.878], [0.874, 0.870, 0.878], t_sf_df2, t_quantile_df2),  # d = -0.002, -0.004, 0
    ([0.70, 0.66], [0.65, 0.64], t_sf_df1, t_quantile_df1),  # d = 0.05, 0.02
])
def test_paired_difference_matches_the_t_distribution_in_closed_form(x, y, sf, quantile):
    d = [a - b for a, b in zip(x, y)]
    n, mean = len(d), sum(d) / len(d)
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) / math.sqrt(n)
    t = mean / se
    half = quantile(0.975) * se
    got = compare.paired_difference(x, y)
    assert got["n"] == n
    assert got["mean"] == pytest.approx(mean, abs=1e-12)
    assert got["p"] == pytest.approx(2 * sf(abs(t)), rel=1e-9)
    assert got["ci"] == pytest.approx([mean - half, mean + half], rel=1e-9)


def test_paired_difference_fixed_numbers_and_degenerate_cases():
    # n = 3, d = (-0.002, -0.004, 0): t = -sqrt(3), p = 1 - sqrt(3/5); t(0.975, 2) = 0.95 / sqrt(0.04875)
    got = compare.paired_difference([0.872, 0.866, 0.878], [0.874, 0.870, 0.878])
    assert got["p"] == pytest.approx(1 - math.sqrt(3 / 5), rel=1e-9)
    half = 0.95 / math.sqrt(0.04875) * 0.002 / math.sqrt(3)
    assert got["ci"] == pytest.approx([-0.002 - half, -0.002 + half], rel=1e-9)
    assert round(got["p"], 6) == 0.225403 and round(got["ci"][0], 6) == -0.006968
    one = compare.paired_difference([0.7], [0.6])
    assert one == {"n": 1, "mean": pytest.approx(0.1), "ci": None, "p": None}
    same = compare.paired_difference([0.7, 0.8], [0.6, 0.7])  # identical differences: no spread, no p
    assert same["ci"] == pytest.approx([0.1, 0.1]) and same["p"] is None
    with pytest.raises(ValueError, match="same length"):
        compare.paired_difference([0.7, 0.8], [0.6])


def test_describe_matches_the_statistics_module():
    values = [0.8125, 0.7750, 0.8000, 0.7875]
    got = compare.describe(values)
    assert got == {"n": 4, "mean": pytest.approx(statistics.mean(values)), "std": pytest.approx(statistics.stdev(values)),
                   "min": 0.7750, "max": 0.8125}
    assert compare.describe([0.5])["std"] is None
    assert compare.describe([])["mean"] is None


def _trials(table: dict) -> list[dict]:
    """objective -> [score per seed] as compare.json trials (seed i is the i-th score; None: failed)."""
    return [{"objective": name, "seed": seed, "status": "OK" if v is not None else "ERROR",
             "test": None if v is None else {"accuracy": v, "f1": v / 2}, "history": [{"epoch": 1, "val_accuracy": v or 0}],
             "error": None if v is not None else "boom"}
            for name, values in table.items() for seed, v in enumerate(values)]


def test_summary_pairs_by_seed_and_the_markdown_shows_its_numbers(tmp_path):
    trials = _trials({"ce": [0.70, 0.66, 0.60], "kd": [0.65, 0.64, None], "sinkd": [0.71, None, 0.62]})
    summary = compare.summarize(trials, ["ce", "kd", "sinkd"], ["accuracy", "f1"])
    acc = summary["accuracy"]
    assert acc["ce"]["n"] == 3 and acc["ce"]["mean"] == pytest.approx(statistics.mean([0.70, 0.66, 0.60]))
    assert acc["ce"]["vs_reference"] == compare.paired_difference([0.70, 0.66], [0.65, 0.64])  # seeds 0, 1 only
    assert acc["sinkd"]["vs_reference"]["n"] == 1 and acc["sinkd"]["vs_reference"]["p"] is None  # seed 0 is its only pair
    assert acc["kd"]["vs_reference"] is None
    report = {"run_dir": "r", "teacher": "t", "metrics": ["accuracy", "f1"], "headline": "accuracy", "data": "d",
              "seeds": [0, 1, 2], "objectives": {n: {"alpha": 1.0} for n in ("ce", "kd", "sinkd")},
              "trials": trials, "summary": summary,
              "described": {n: f"ce 1 + {n} settings" for n in ("ce", "kd", "sinkd")}}
    out = compare.write_outputs(report, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    rows = _md_rows(md, "accuracy")
    assert rows["ce"][:5] == ["3", "0.6533", f"{statistics.stdev([0.70, 0.66, 0.60]):.4f}", "0.6000", "0.7000"]
    p = 1 - 2 * math.atan(2.3333333333333335) / math.pi  # d = 0.05, 0.02: t = 0.035 / 0.015, df 1
    assert rows["ce"][5] == "+0.0350" and rows["ce"][7] == f"{p:.3g}" == "0.258"
    assert rows["kd"][5] == "reference" and rows["kd"][0] == "2"
    assert rows["sinkd"][5:] == ["+0.0600", "n/a", "n/a"]  # one pair (seed 0)
    assert "- `kd`: ce 1 + kd settings" in md
    assert "2 of 9 trials failed" in md and out["failed"][0]["error"] == "boom"
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "compare.json").read_text())["summary"] == json.loads(json.dumps(summary))


def test_without_kd_the_paired_column_is_against_ce_alone(tmp_path):
    """A cross-tokenizer comparison (no token-level KD between vocabularies) pairs against CE alone."""
    trials = _trials({"ce": [0.60, 0.62], "uld": [0.64, 0.63], "multilevel_ot": [0.66, 0.61]})
    names = ["ce", "uld", "multilevel_ot"]
    summary = compare.summarize(trials, names, ["accuracy"])
    assert summary["accuracy"]["uld"]["vs_reference"] == compare.paired_difference([0.64, 0.63], [0.60, 0.62])
    assert summary["accuracy"]["ce"]["vs_reference"] is None
    report = {"run_dir": "r", "teacher": "t", "metrics": ["accuracy"], "headline": "accuracy", "data": "d", "seeds": [0, 1],
              "objectives": {n: {} for n in names}, "trials": trials, "summary": {},
              "described": {n: n for n in names}}
    compare.write_outputs(report, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    rows = _md_rows(md, "accuracy")
    assert "| - ce (paired) |" in md and rows["ce"][5] == "reference" and rows["uld"][5] == "+0.0250"
    assert "Differences: objective - ce," in md
    alone = compare.summarize(_trials({"uld": [0.6, 0.7]}), ["uld"], ["accuracy"])
    assert alone["accuracy"]["uld"]["vs_reference"] is None


def test_reference_names_the_objective_the_others_are_paired_against(tmp_path):
    """Two tuned objectives, neither kd nor ce: without --reference nothing is paired; with it, the
    table, the markdown and the summary pair against the chosen one."""
    names = ["kd_tuned", "sinkd_tuned"]
    trials = _trials({"kd_tuned": [0.683, 0.678, 0.683], "sinkd_tuned": [0.675, 0.673, 0.685]})
    assert compare.summarize(trials, names, ["accuracy"])["accuracy"]["sinkd_tuned"]["vs_reference"] is None
    report = {"run_dir": "r", "teacher": "t", "metrics": ["accuracy"], "headline": "accuracy", "data": "d", "seeds": [0, 1, 2],
              "objectives": {n: {} for n in names}, "trials": trials, "summary": {}, "described": {n: n for n in names}}
    out = compare.write_outputs(report, tmp_path)
    assert _md_rows((tmp_path / "compare.md").read_text(), "accuracy")["sinkd_tuned"][5] == "n/a (no kd or ce: --reference NAME)"
    out = compare.write_outputs({**report, "reference": "kd_tuned"}, tmp_path)
    md = (tmp_path / "compare.md").read_text()
    rows = _md_rows(md, "accuracy")
    diff = compare.paired_difference([0.675, 0.673, 0.685], [0.683, 0.678, 0.683])
    assert rows["kd_tuned"][5] == "reference" and rows["sinkd_tuned"][5] == f"{diff['mean']:+.4f}" == "-0.0037"
    assert rows["sinkd_tuned"][6] == f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]" and rows["sinkd_tuned"][7] == f"{diff['p']:.3g}"
    assert "| - kd_tuned (paired) |" in md and "Differences: objective - kd_tuned," in md and "- kd_tuned (paired)" in out["table"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["reference"] == "kd_tuned" and saved["summary"]["accuracy"]["sinkd_tuned"]["vs_reference"] == json.loads(json.dumps(diff))
    # on a job with kd, --reference still wins over the default
    kd_too = compare.summarize(_trials({"kd": [0.6, 0.7], "ce": [0.5, 0.55]}), ["kd", "ce"], ["accuracy"], "ce")
    assert kd_too["accuracy"]["kd"]["vs_reference"]["mean"] == pytest.approx(0.125) and kd_too["accuracy"]["ce"]["vs_reference"] is None


def test_an_unknown_reference_fails_before_any_work(tmp_path):
    cfg = _cfg(run_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^--reference: 'kd' is not among the compared objectives \(ce, sinkd\)$"):
        compare.run_compare(cfg, ["ce", "sinkd"], 2, reference="kd")
    assert not (tmp_path / "run").exists()


def _md_rows(md: str, metric: str) -> dict:
    """objective -> cells of its row in the table of `test <metric>`."""
    block = md.split(f"### test {metric}\n", 1)[1].split("\n\n", 1)[0]
    rows = [line.strip("|").split("|") for line in block.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


# ----------------------------------------------------------------------------- objectives


def _cfg(**over) -> Config:
    raw = {"objective": {"alpha": 0.5, "beta": 2.0, "temperature": 3.0, "sinkhorn": {"eps": 0.2}},
           "baselines": {"kd": {"beta": 0.0}, "sk": {"divergence": "skew_kl"}}, **over}
    return Config.from_dict(raw)


def test_objective_names_defaults_and_what_each_means():
    cfg = _cfg()
    assert compare.default_names(cfg) == ["ce", "kd", "sinkd", "sk"]
    known = compare.available_objectives(cfg)
    assert list(known) == ["ce", "kd", "rkl", "js", "tvd", "skew_kl", "sinkd", "sinkd_paper", "sk"]
    assert known["ce"]["alpha"] == 0 and known["ce"]["beta"] == 0 and known["ce"]["ce_weight"] == 1
    assert known["kd"] == {**cfg.objective, "beta": 0.0}  # the job's own kd baseline replaces the built-in
    assert known["rkl"] == {**cfg.objective, "alpha": 0.5, "beta": 0.0, "divergence": "rkl"}
    assert known["sinkd"] == cfg.objective and known["sk"]["divergence"] == "skew_kl" and known["sk"]["beta"] == 2.0
    no_kd = compare.available_objectives(_cfg(objective={"beta": 1.0}, baselines={}))
    assert no_kd["kd"]["alpha"] == 1.0 and no_kd["kd"]["divergence"] == "kl"  # a job without KD: weight 1
    assert list(compare.resolve_objectives(cfg, ["kd", "ce", "kd"])) == ["kd", "ce"]
    assert compare.seed_list(_cfg(seed=7), 3) == [7, 8, 9]


def test_a_cross_tokenizer_job_compares_its_own_objectives_only():
    """The built-ins are same-vocabulary objectives (KL and friends on aligned logits): a job whose
    student has another vocabulary compares its own objective and its baselines (its `ce` replaces
    the built-in), and naming a built-in it cannot train is an unknown name, not a crash."""
    cfg = Config.from_dict({"task_type": "cross_tokenizer", "objective": {"method": "multilevel_ot"},
                            "baselines": {"uld": {"method": "uld"}, "ce": {"method": "ce"}}})
    assert compare.default_names(cfg) == ["ce", "sinkd", "uld"]
    assert compare.available_objectives(cfg)["ce"] == {"method": "ce"}
    with pytest.raises(ConfigError, match=r"^--objectives: unknown objective 'kd'; valid: sinkd, uld, ce$"):
        compare.resolve_objectives(cfg, ["kd"])


@pytest.mark.parametrize("call, message", [
    (lambda cfg: compare.resolve_objectives(cfg, ["kd", "dpo"]),
     "--objectives: unknown objective 'dpo'; valid: ce, kd, rkl, js, tvd, skew_kl, sinkd, sinkd_paper, sk"),
    (lambda cfg: compare.seed_list(cfg, 0), "--seeds: must be an integer >= 1, got 0"),
    (lambda cfg: compare.resolve_objectives(_cfg(baselines={"bad": {"alpha": -1}}), ["bad"]),
     "--objectives bad: objective.alpha"),
])
def test_bad_names_and_seeds_are_one_line_errors(call, message):
    with pytest.raises(ConfigError) as err:
        call(_cfg())
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def official_loss(student, teacher, labels, alpha=0.9, beta=0.8, temperature=2.0):
    """github 2018cx/SinKD at 1ffac90, as glue_train.py combines loss.py's terms for `kd+sinkhorn` had
    its Sinkhorn branch run: (1 - alpha) CE + alpha DistillKL(T) + beta Sinkhorn (T = 2 inside)."""
    ce = F.cross_entropy(student, labels)
    kd = -torch.sum(F.softmax(teacher / temperature, -1) * F.log_softmax(student / temperature, -1), -1).mean()
    p_s, p_t = F.softmax(student / 2, dim=1), F.softmax(teacher / 2, dim=1)
    cost = torch.cdist(p_s, p_t, p=1)
    plan = torch.exp(-cost / 0.1)
    for _ in range(20):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    sinkhorn = 0.001 * torch.sum(plan * cost)
    return alpha * kd + (1 - alpha) * ce + beta * sinkhorn


def test_paper_preset_is_the_official_loss_up_to_the_teachers_entropy():
    from sinkd import DistillationObjective, ObjectiveConfig

    torch.manual_seed(0)
    student = (torch.randn(32, 2, dtype=torch.float64) * 2).requires_grad_(True)
    teacher, labels = torch.randn(32, 2, dtype=torch.float64) * 3, torch.randint(0, 2, (32,))
    ours = DistillationObjective(ObjectiveConfig.from_dict(compare.paper_objective()))(student, teacher, labels).loss
    (g_ours,) = torch.autograd.grad(ours, student)
    ref = official_loss(student, teacher, labels)
    (g_ref,) = torch.autograd.grad(ref, student)
    p_t = F.softmax(teacher / 2, -1)
    entropy = -(p_t * p_t.log()).sum(-1).mean()  # DistillKL is CE(p_t, p_s) = KL + H(p_t)
    torch.testing.assert_close(ours.detach() + 0.9 * entropy, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the command


def _sinkd(*args) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-3000:]}\n{err[-3000:]}") from None


@pytest.mark.parametrize("args, message", [
    (["--objectives", "kd", "dpo"], "sinkd: error: --objectives: unknown objective 'dpo'; valid: ce, kd, rkl"),
    (["--seeds", "0"], "sinkd: error: --seeds: must be an integer >= 1, got 0"),
    (["--set", "train.lr=-1"], "sinkd: error: train.lr"),
])
def test_bad_input_is_refused_in_one_line_before_any_work(tmp_path, tiny_bert, sst2_small, args, message):
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_job(tmp_path / "run", tiny_bert, sst2_small)))
    proc = _sinkd("compare", config, *args)
    out, err = _finish(proc, 120)
    assert proc.returncode == 2, (out, err)
    assert err.strip().startswith(message) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # `sinkd compare` subprocesses, each with its own local Ray
def test_compare_two_objectives_two_seeds_then_finished_reruns(tmp_path, tiny_bert, sst2_small):
    run_dir = tmp_path / "cmp"
    job = tiny_job(run_dir, tiny_bert, sst2_small, **{
        "data.max_train_examples": 32, "data.max_eval_examples": 16, "data.max_length": 16,
        "train.epochs": 1, "train.grad_accum": 1, "train.zero_stage": 0, "train.checkpoint_every_steps": None,
        # 1 worker CPU + 1 for Ray Data (+1 that sinkd adds for the trial drivers): one trial at a time
        "train.keep_checkpoints": 1, "scaling.num_workers": 1, "ray.num_cpus": 2})
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job))
    command = ["compare", config, "--objectives", "kd", "sinkd", "--seeds", "2"]
    out_dir, trials_dir = run_dir / "compare", run_dir / "compare" / "trials"

    # 1. 2 objectives x 2 seeds: 4 trials with test scores and their validation epoch.
    proc = _sinkd(*command)
    out, err = _finish(proc, 900)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    report = json.loads((out_dir / "compare.json").read_text())
    trials = report["trials"]
    assert [(t["objective"], t["seed"]) for t in trials] == [("kd", 0), ("kd", 1), ("sinkd", 0), ("sinkd", 1)]
    assert all(t["status"] == "OK" and 0 <= t["test"]["accuracy"] <= 1 for t in trials), trials
    assert all([h["epoch"] for h in t["history"]] == [1] and "val_accuracy" in t["history"][0] for t in trials), trials
    # Tune's view of an epoch: what Task.validation_metrics declares (`sinkd tune` checks a space's metric on it)
    assert all(set(t["history"][0]) == {"epoch", "val_examples", "val_accuracy", "val_loss"} for t in trials), trials
    assert report["objectives"]["sinkd"] == job["objective"] and report["objectives"]["kd"]["beta"] == 0.0
    assert out.count("compare: ") == 4 and "compare: kd seed 1: test accuracy" in out  # a line per finished trial

    # compare.md's numbers are the mean and std of compare.json's scores; the terminal shows the table.
    md = (out_dir / "compare.md").read_text()
    for name in ("kd", "sinkd"):
        scores = [t["test"]["accuracy"] for t in trials if t["objective"] == name]
        row = _md_rows(md, "accuracy")[name]
        assert row[:5] == ["2", f"{statistics.mean(scores):.4f}", f"{statistics.stdev(scores):.4f}",
                           f"{min(scores):.4f}", f"{max(scores):.4f}"], (name, row, scores)
        assert f"| {name} | 2 | {statistics.mean(scores):.4f} |" in out
    by = {(t["objective"], t["seed"]): t["test"]["accuracy"] for t in trials}
    diff = [by["sinkd", s] - by["kd", s] for s in (0, 1)]
    assert _md_rows(md, "accuracy")["sinkd"][5] == f"{statistics.mean(diff):+.4f}"
    assert (out_dir / "compare.png").stat().st_size > 10_000

    # 2. The finished command reruns from compare.json: no Ray, no training, nothing written in the trials.
    before = snapshot(trials_dir)
    tick = time.monotonic()
    proc = _sinkd(*command)
    out, err = _finish(proc, 120)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert json.loads((out_dir / "compare.json").read_text())["trials"] == trials
    assert snapshot(trials_dir) == before and "| kd | 2 |" in out and time.monotonic() - tick < 60

    # 3. Without compare.json, the rerun restores Tune's finished experiment: every trial kept, none trained.
    (out_dir / "compare.json").unlink()
    proc = _sinkd(*command)
    out, err = _finish(proc, 300)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    assert json.loads((out_dir / "compare.json").read_text())["trials"] == trials
    after = snapshot(trials_dir)
    kept = {k: v for k, v in before.items() if "/" in k}  # each trial's files: results, checkpoints, models
    assert {k: after.get(k) for k in kept} == kept
    assert not set(after) - set(before) - {k for k in after if "/" not in k}, set(after) - set(before)


def _reported(trials_dir) -> set[str]:
    """Trials that have reported a result (their first epoch)."""
    return {p.parent.name for p in trials_dir.glob("*/result.json") if p.stat().st_size > 0}


def test_trial_record_keeps_scores_the_last_report_per_epoch_and_the_error_line():
    import pandas as pd

    class Result:  # the attributes of ray.tune.Result that trial_record reads
        def __init__(self, metrics, frame, error=None):
            self.metrics, self.metrics_dataframe, self.error = metrics, frame, error
            self.config, self.path = {"objective": "kd", "seed": 1}, "/x/compare/trials/compare_trial_ab12c_00003"

    frame = pd.DataFrame({"epoch": [1, 2, 1, 2, None], "val_accuracy": [0.5, 0.6, 0.55, 0.65, None],
                          "val_loss": [0.7, 0.6, 0.69, 0.59, None]})  # epochs 1-2, resumed and rerun, then the test row
    ok = compare.trial_record(Result({"test_accuracy": 0.7, "test_f1": 0.6, "time_total_s": 12.5}, frame), ["accuracy"])
    assert ok == {"objective": "kd", "seed": 1, "trial": "compare_trial_ab12c_00003", "status": "OK",
                  "test": {"accuracy": 0.7}, "history": [{"epoch": 1, "val_accuracy": 0.55, "val_loss": 0.69},
                                                         {"epoch": 2, "val_accuracy": 0.65, "val_loss": 0.59}],
                  "time_s": 12.5, "error": None}
    failed = compare.trial_record(Result({"epoch": 1}, frame.iloc[:1], RuntimeError("trace\nValueError: boom")), ["accuracy"])
    assert failed["status"] == "ERROR" and failed["error"] == "ValueError: boom" and failed["test"] is None
    silent = compare.trial_record(Result({}, None), ["accuracy"])
    assert silent["status"] == "ERROR" and silent["error"] == "no test scores reported" and silent["history"] == []


def test_a_compare_folder_of_another_request_is_refused_and_a_finished_one_is_reused(tmp_path):
    cfg = _cfg()
    wanted = compare.request(cfg, compare.resolve_objectives(cfg, ["kd", "ce"]), [0, 1])
    (tmp_path / "request.json").write_text(json.dumps(wanted))
    compare.check_request(tmp_path, wanted)  # the same request: fine
    other = compare.request(_cfg(train={"lr": 1e-3}), compare.resolve_objectives(cfg, ["kd", "ce"]), [0, 1, 2])
    with pytest.raises(ConfigError, match=r"holds a comparison with other settings \(seeds, job.train changed\); use a new run_dir"):
        compare.check_request(tmp_path, other)
    assert compare.finished_report(tmp_path, wanted) is None  # no compare.json yet
    trials = _trials({"kd": [0.6, 0.7], "ce": [0.5, None]})
    (tmp_path / "compare.json").write_text(json.dumps({"request": wanted, "trials": trials}))
    assert compare.finished_report(tmp_path, wanted) is None  # ce seed 1 failed: rerun it
    trials[-1].update(status="OK", test={"accuracy": 0.5})
    (tmp_path / "compare.json").write_text(json.dumps({"request": wanted, "trials": trials}))
    assert compare.finished_report(tmp_path, wanted)["trials"] == trials
