"""`sinkd submit`: run `sinkd train` / `sinkd tune` as a Ray job on a running cluster.

    sinkd submit [--address URL] [--runtime-env FILE | --working-dir DIR] [--job-id ID] [--follow] \
                 train|tune ARGS...

The job's driver runs on the cluster (its `ray_session` joins the cluster through the $RAY_ADDRESS
that Ray's job manager sets); the working directory (this checkout by default) is shipped with it.
Prints the job id; --follow streams the logs until the job ends and exits with the driver's exit
code (0 succeeded, the entrypoint's own code when it failed, e.g. 2 for a config error).
Equivalent: `ray job submit --address URL --runtime-env FILE -- sinkd train CONFIG --no-progress`.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from pathlib import Path

import yaml

# What a default submission (no --runtime-env) leaves out of the shipped working directory.
DEFAULT_EXCLUDES = [".git", ".venv", ".whl", "runs", "**/__pycache__", "*.egg-info", "benchmarks"]
EXIT_STOPPED = 130


def add_parser(sub) -> None:
    p = sub.add_parser("submit", help="run `sinkd train` or `sinkd tune` as a job on a running Ray cluster",
                       description="Options come before the command; everything after it goes to `sinkd train|tune`.")
    p.add_argument("--address", help="the cluster's dashboard, e.g. http://127.0.0.1:8265 "
                                     "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")
    env = p.add_mutually_exclusive_group()
    env.add_argument("--runtime-env", metavar="FILE", help="runtime env YAML, e.g. cluster/runtime_env.yaml")
    env.add_argument("--working-dir", metavar="DIR", default=".",
                     help="directory shipped to the cluster as the job's working dir (default: .)")
    p.add_argument("--job-id", help="submission id (default: generated)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs; exit with its status")
    p.add_argument("job", choices=["train", "tune"], help="what the job runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml [SPACE.yaml] [--set key=value ...]")


def entrypoint(job: str, args: list[str]) -> str:
    """The job's shell command; train runs without progress bars (they are noise in job logs)."""
    args = list(args)
    if job == "train" and "--no-progress" not in args:
        args.append("--no-progress")
    return shlex.join(["sinkd", job, *args])


def runtime_env(runtime_env_file: str | None, working_dir: str) -> dict:
    """The runtime env from a YAML file, or the working dir with DEFAULT_EXCLUDES; checked by Ray's RuntimeEnv."""
    from ray.runtime_env import RuntimeEnv

    from ..config import ConfigError

    if runtime_env_file:
        path = Path(runtime_env_file)
        if not path.is_file():
            raise ConfigError(f"--runtime-env {path}: file not found")
        try:
            env = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--runtime-env {path}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(env, dict):
            raise ConfigError(f"--runtime-env {path}: expected a mapping of runtime env fields")
        where = f"--runtime-env {path}"
    else:
        if not Path(working_dir).is_dir():
            raise ConfigError(f"--working-dir {working_dir}: directory not found")
        env, where = {"working_dir": working_dir, "excludes": DEFAULT_EXCLUDES}, f"--working-dir {working_dir}"
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    return env


def check_job_args(job: str, args: list[str], env: dict) -> None:
    """Cheap local checks before anything reaches the cluster: the config's YAML, keys and types, and
    the tune space. Files the config names are checked on the cluster, where they must exist."""
    from ..config import ConfigError, load_config

    files = _positionals(args)
    if job == "tune" and len(files) < 2:
        raise ConfigError("sinkd submit tune: needs CONFIG.yaml SPACE.yaml")
    wd = env.get("working_dir")
    if not files or not wd or "://" in wd:
        return  # the default job, or nothing shipped from here: the cluster checks it
    config, base = files[0], Path(wd)
    if not Path(config).is_absolute():
        path = base / config
        if not path.is_file():
            raise ConfigError(f"{config}: config file not found in the working dir {base}")
        load_config(path, _overrides(args))  # YAML, unknown keys and types; the files it names are the cluster's
    if job == "tune" and not Path(files[1]).is_absolute():
        from .tune_space import load_space

        if not (base / files[1]).is_file():
            raise ConfigError(f"{files[1]}: search space file not found in the working dir {base}")
        load_space(base / files[1])


def _positionals(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--set":
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _overrides(args: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a == "--set" and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--set="):
            out.append(a[len("--set="):])
    return out


def run(args) -> int:
    from ray.job_submission import JobSubmissionClient

    from ..config import ConfigError

    if args.args and args.args[0] == "--":
        args.args = args.args[1:]
    env = runtime_env(args.runtime_env, args.working_dir)
    check_job_args(args.job, args.args, env)
    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as e:
        raise ConfigError(f"--address {args.address or '(from $RAY_ADDRESS)'}: {str(e).splitlines()[0]}") from None
    job_id = client.submit_job(entrypoint=entrypoint(args.job, args.args), runtime_env=env, submission_id=args.job_id)
    print(job_id, flush=True)
    address = client.get_address()
    if not args.follow:
        print(f"logs: ray job logs --address {address} --follow {job_id}\n"
              f"status: ray job status --address {address} {job_id}", file=sys.stderr)
        return 0
    try:
        asyncio.run(_tail(client, job_id))
        return _exit_code(client, job_id)
    except KeyboardInterrupt:
        print(f"\nsinkd: stopped following; the job runs on (ray job stop --address {address} {job_id})", file=sys.stderr)
        return EXIT_STOPPED


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _exit_code(client, job_id: str, timeout: float = 60) -> int:
    """The finished job's driver exit code (the log stream can close a moment before the status settles)."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    info = client.get_job_info(job_id)
    while not info.status.is_terminal() and time.time() < deadline:
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    print(f"sinkd: job {job_id} {info.status.value}" + (f": {info.message}" if info.status != JobStatus.SUCCEEDED and info.message else ""),
          file=sys.stderr)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.STOPPED:
        return EXIT_STOPPED
    return info.driver_exit_code if info.driver_exit_code not in (None, 0) else 1
