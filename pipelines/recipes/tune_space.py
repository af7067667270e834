"""Ray Tune search spaces from YAML (tune_spaces/*.yaml), validated before any trial starts.

A space file names config keys with the same dotted paths as `sinkd train --set`, each with one
distribution: loguniform / uniform [low, high], randint [low, high) (integers), choice [..], grid [..].
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCH_ALGORITHMS = ("random", "optuna")
TOP_LEVEL = ("metric", "mode", "num_samples", "max_concurrent_trials", "trial_resources", "search", "scheduler", "space")
SCHEDULER_KEYS = ("type", "time_attr", "grace_period", "max_t", "reduction_factor")
SEARCH_KEYS = ("algorithm", "seed")


class SpaceError(ValueError):
    """A problem in a space file; the message names the file and the key."""


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class Scheduler:
    type: str = "asha"
    time_attr: str = "training_iteration"
    grace_period: int = 1
    max_t: int = 10
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class TuneSpace:
    """One tuning job: what to search, how to pick and stop trials, and how many run at once."""

    metric: str
    mode: str
    space: dict[str, Distribution]
    num_samples: int = 8
    max_concurrent_trials: int = 1
    trial_resources: dict = field(default_factory=lambda: {"cpu": 0.01})  # the trial driver only waits on its trainer
    algorithm: str = "random"
    seed: int | None = 0
    scheduler: Scheduler | None = field(default_factory=Scheduler)

    def num_trials(self) -> int:
        """Trials Tune will run: num_samples times the size of every grid."""
        total = self.num_samples
        for dist in self.space.values():
            total *= len(dist.args) if dist.kind == "grid" else 1
        return total

    def param_space(self) -> dict:
        """Tune domains keyed by dotted config path (the trial applies them as --set overrides)."""
        return {key: dist.to_tune() for key, dist in self.space.items()}

    def make_scheduler(self):
        if self.scheduler is None:
            return None
        from ray.tune.schedulers import ASHAScheduler

        s = self.scheduler
        return ASHAScheduler(time_attr=s.time_attr, grace_period=s.grace_period, max_t=s.max_t, reduction_factor=s.reduction_factor)

    def make_search_alg(self):
        """Random search is Tune's default (None); Optuna is wrapped to respect the concurrency."""
        if self.algorithm == "random":
            return None
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=self.seed), max_concurrent=self.max_concurrent_trials)


def load_space(path: str | Path) -> TuneSpace:
    """Parse and check a space file; every error is one line naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"{path}: space file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpaceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        return parse_space(raw)
    except SpaceError as exc:
        raise SpaceError(f"{path}: {exc}") from None


def parse_space(raw: Any) -> TuneSpace:
    if not isinstance(raw, dict):
        raise SpaceError("the file must hold a mapping of keys")
    _no_unknown(raw, TOP_LEVEL, "")
    for key in ("metric", "mode", "space"):
        if key not in raw:
            raise SpaceError(f"{key}: required key is missing")
    metric = raw["metric"]
    if not isinstance(metric, str) or not metric:
        raise SpaceError(f"metric: must be a metric name the trials report, got {metric!r}")
    if raw["mode"] not in ("min", "max"):
        raise SpaceError(f"mode: must be 'min' or 'max', got {raw['mode']!r}")
    num_samples = _int(raw.get("num_samples", 8), "num_samples", 1)
    concurrency = _int(raw.get("max_concurrent_trials", 1), "max_concurrent_trials", 1)
    resources = raw.get("trial_resources", {"cpu": 0.01})
    if not isinstance(resources, dict) or any(not isinstance(v, (int, float)) or v < 0 for v in resources.values()):
        raise SpaceError(f"trial_resources: must map resource names to numbers >= 0, got {resources!r}")
    if not any(v > 0 for v in resources.values()):
        raise SpaceError("trial_resources: needs one resource > 0 (Ray cannot place an empty request); e.g. {cpu: 0.01}")

    search = raw.get("search") or {}
    _no_unknown(search, SEARCH_KEYS, "search.")
    algorithm = search.get("algorithm", "random")
    if algorithm not in SEARCH_ALGORITHMS:
        raise SpaceError(f"search.algorithm: unknown value {algorithm!r}; valid: {', '.join(SEARCH_ALGORITHMS)}")
    if algorithm == "optuna" and importlib.util.find_spec("optuna") is None:
        raise SpaceError("search.algorithm: 'optuna' needs the optuna package (pip install optuna)")
    seed = search.get("seed", 0)
    if seed is not None:
        _int(seed, "search.seed", 0)

    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise SpaceError("space: must map config keys (e.g. objective.sinkhorn.eps) to distributions")
    dists = {key: _distribution(key, spec) for key, spec in space.items()}
    if algorithm == "optuna" and any(d.kind == "grid" for d in dists.values()):
        raise SpaceError("space: 'grid' cannot be used with search.algorithm 'optuna' (use choice)")

    return TuneSpace(metric=metric, mode=raw["mode"], space=dists, num_samples=num_samples,
                     max_concurrent_trials=concurrency, trial_resources=dict(resources), algorithm=algorithm,
                     seed=seed, scheduler=_scheduler(raw.get("scheduler", {})))


def _scheduler(raw: Any) -> Scheduler | None:
    if raw is None or raw == "none":
        return None
    if not isinstance(raw, dict):
        raise SpaceError(f"scheduler: must be a mapping or 'none', got {raw!r}")
    _no_unknown(raw, SCHEDULER_KEYS, "scheduler.")
    kind = raw.get("type", "asha")
    if kind != "asha":
        raise SpaceError(f"scheduler.type: unknown value {kind!r}; valid: asha")
    grace = _int(raw.get("grace_period", 1), "scheduler.grace_period", 1)
    max_t = _int(raw.get("max_t", 10), "scheduler.max_t", 1)
    if grace > max_t:
        raise SpaceError(f"scheduler.grace_period: {grace} exceeds scheduler.max_t {max_t}")
    factor = raw.get("reduction_factor", 2.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
        raise SpaceError(f"scheduler.reduction_factor: must be a number > 1, got {factor!r}")
    time_attr = raw.get("time_attr", "training_iteration")
    if not isinstance(time_attr, str):
        raise SpaceError(f"scheduler.time_attr: must be a metric name, got {time_attr!r}")
    return Scheduler("asha", time_attr, grace, max_t, float(factor))


def _distribution(key: str, spec: Any) -> Distribution:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(f"{where}: must be one distribution, e.g. {{loguniform: [0.01, 1.0]}}; got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}.{kind}: must be a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Distribution(kind, tuple(args))
    args = [_number(a) for a in args]
    if len(args) != 2 or any(a is None for a in args):
        raise SpaceError(f"{where}.{kind}: must be [low, high] numbers, got {spec[kind]!r}")
    low, high = args
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SpaceError(f"{where}.{kind}: needs low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}.loguniform: needs low > 0, got {low!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}.randint: needs integers [low, high) , got {args!r}")
    return Distribution(kind, (low, high))


def _number(value: Any) -> int | float | None:
    """A bound as a number; YAML 1.1 reads `1e-5` (no dot) as a string, so accept numeric strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _no_unknown(raw: Any, allowed: tuple, prefix: str) -> None:
    if not isinstance(raw, dict):
        raise SpaceError(f"{prefix.rstrip('.') or 'file'}: must be a mapping, got {raw!r}")
    for key in raw:
        if key not in allowed:
            raise SpaceError(f"{prefix}{key}: unknown key; valid: {', '.join(allowed)}")


def _int(value: Any, key: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpaceError(f"{key}: must be an integer >= {low}, got {value!r}")
    return value
