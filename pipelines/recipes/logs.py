"""Where the libraries' logs go: the terminal shows sinkd's own lines; Ray's, Ray Train's, Ray Data's,
DeepSpeed's and transformers' logs go to RUN_DIR/logs/ (`--verbose` shows them too).

Only the libraries' own controls are used: `ray.init(log_to_driver=...)` (worker output stays in
Ray's session log files, linked as RUN_DIR/logs/ray), logger levels and handlers, Ray Data's
DataContext, an explicit DS_ACCELERATOR (DeepSpeed's "unset, so I guessed" warning).
Warnings a worker raises still reach the terminal: the training worker forwards them through the
progress actor (pipelines.train.worker).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LIBRARIES = ("ray", "DeepSpeed", "py.warnings")  # loggers whose records RUN_DIR/logs/driver.log keeps
_state = {"verbose": False, "handler": None}


def configure(verbose: bool = False, use_gpu: bool = False) -> None:
    """Call before work starts (the CLI does, first thing): console levels and the libraries' env."""
    _state["verbose"] = verbose
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # DeepSpeed warns "Setting accelerator to CPU" when it has to guess: say it (the driver only
    # consolidates checkpoints; training workers get their own DS_ACCELERATOR).
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if verbose:
        return
    import ray  # noqa: F401  (installs Ray's console handler on the "ray" logger)

    _console_at_warning(logging.getLogger("ray"))  # the console: warnings and errors only
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Ray announces that a new local cluster got token authentication, its default (RAY_AUTH_MODE
    # unset); setting the variable ourselves would have to happen before Ray reads it at import.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray Data notes once that its progress bars are off: sinkd turned them off and draws its own.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def verbose() -> bool:
    return _state["verbose"]


def ray_init_kwargs() -> dict:
    """What `ray.init` gets: the workers' output streams to the driver only with --verbose (it stays in
    Ray's session log files either way)."""
    return {"log_to_driver": _state["verbose"]}


def quiet_ray_data() -> None:
    """Ray Data's per-dataset "Starting execution" / "Execution plan" lines and progress bars (the
    evaluation's; training stages draw their own bar)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.print_on_execution_start = _state["verbose"]
    ctx.enable_progress_bars = False
    if not _state["verbose"]:  # Ray Data logs to its own console handler ("execution finished in 10 s")
        _console_at_warning(logging.getLogger("ray.data"))


def _console_at_warning(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def to_run_dir(run_dir: str | Path, ray_session_dir: str | None = None) -> Path:
    """RUN_DIR/logs/driver.log gets every library log record of this process (INFO and above), and
    RUN_DIR/logs/ray links to the logs of the local Ray session this process started (workers'
    stdout/stderr, Ray's own), when it started one."""
    logs = Path(run_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if _state["handler"] is None:
        handler = logging.FileHandler(logs / "driver.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        for name in LIBRARIES:
            logging.getLogger(name).addHandler(handler)
        _state["handler"] = handler
    if ray_session_dir:
        session = Path(ray_session_dir) / "logs"
        link = logs / "ray"
        if session.exists():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session.resolve(), target_is_directory=True)
    return logs


def detach() -> None:
    handler = _state["handler"]
    if handler is not None:
        for name in LIBRARIES:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
        _state["handler"] = None
