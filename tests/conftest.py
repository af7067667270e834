import os
import subprocess
import sys
from pathlib import Path

import pytest

# Keep hypothesis deterministic and bounded on the 2-core CI machine.
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Ray Train's controller polls its workers every 2 s, and a worker's ray.train.report blocks while the
# previous report is still unpolled (a queue of one): a tiny test job that checkpoints every step or two
# and ends in seconds spends most of its stage waiting for polls. Polling every 0.2 s changes when
# results are collected, not what they are (a slow poll is tolerated for the 10-min health timeout).
# Set before any Ray starts, so the in-process Ray, the `sinkd` subprocesses and the test cluster's
# nodes inherit it (Ray Train also propagates it to its controller).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def pytest_configure(config):
    """Ray writes ~/.ray/auth_token the first time a local cluster starts; two pytest-xdist workers
    doing that at once can leave one cluster with a token its processes no longer read. Write it
    once, in the controller, before any worker starts."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                       check=True, capture_output=True)


RAY_FIXTURES = {"ray_session", "local_ray", "zero2", "live_zero2"}  # fixtures that start (or need) a Ray instance


# The longest test files, longest first (seconds per file under `-n 2`, benchmarks/RESULTS.md "Two test files
# at a time"). pytest-xdist hands files out in collection order (with --no-loadscope-reorder): starting
# these first keeps a single long file from running alone at the end while the other worker idles.
# (test_online_teacher_ray: 236 s there, plus its ZeRO-3 run since, about 100 s: placed by estimate.)
LONGEST_FIRST = ("tests/pipelines/test_e2e.py", "tests/cluster/test_isolated_node.py", "tests/pipelines/test_compare.py",
                 "tests/llm/test_llm_ray.py", "tests/llm/test_online_teacher_ray.py", "tests/pipelines/test_tune_e2e.py",
                 "tests/pipelines/test_run_output.py", "tests/llm/test_cross_tokenizer_ray.py",
                 "tests/llm/test_prompt_response_ray.py")


def pytest_collection_modifyitems(config, items):
    """Every test that starts Ray carries the `slow` marker (`-m "not slow"` is the quick suite);
    the longest files are collected first (a stable sort: tests keep their order within a file)."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    unmarked = [item.nodeid for item in items
                if RAY_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that start Ray need @pytest.mark.slow: {', '.join(unmarked)}")
