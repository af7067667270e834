"""Ray for a recipe: join the running Ray or a cluster, or start a local one that knows its own address."""

from __future__ import annotations

import contextlib
import os

from ..config import Config
from . import logs


def init_local_ray(**kwargs) -> str:
    """`ray.init(address="local")` with the new cluster's own address in RAY_ADDRESS for its processes;
    returns the new cluster's session directory (its logs; /tmp/ray/session_latest may be another's).

    Code inside a Ray cluster that calls the state API without an address (Ray Train V2's
    PlacementGroupCleaner among it) finds its cluster by scanning the machine and fails when two Ray
    instances run there; the placement group of every Tune trial that ASHA stops then leaks, until the
    next trial's data tasks find no CPU and wait forever. The GCS port is chosen here, so the raylet
    and workers (started by ray.init, with this environment) know their cluster; the driver's own
    environment is restored afterwards.
    """
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    saved = {key: os.environ.get(key) for key in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
    try:
        return ray.init(address="local", **kwargs).address_info["session_dir"]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def ray_session(cfg: Config, extra_cpus: int = 0):
    """Join the running Ray (tests, notebooks), a cluster (ray.address), or start a local one;
    extra_cpus: logical CPUs a local one gets on top (Tune's trial drivers, which only wait)."""
    import ray

    logs.quiet_ray_data()
    if ray.is_initialized():
        yield
        return
    kwargs = {"address": cfg.ray.address, **logs.ray_init_kwargs()}
    if cfg.ray.address is None and os.environ.get("RAY_ADDRESS"):
        kwargs["address"] = os.environ["RAY_ADDRESS"]  # a `ray job submit` entrypoint: join its cluster
    if kwargs["address"] is None:
        # A fresh local instance, even when a `ray start` node runs on this machine (a plain
        # ray.init() would silently join the latest one).
        kwargs.pop("address")
        session_dir = init_local_ray(num_cpus=(cfg.ray.num_cpus or (os.cpu_count() or 1) + 1) + extra_cpus,
                                     object_store_memory=cfg.ray.object_store_memory_mb * 2**20
                                     if cfg.ray.object_store_memory_mb else None, **kwargs)
        logs.to_run_dir(cfg.run_dir, ray_session_dir=session_dir)
    else:
        ray.init(**kwargs)
        logs.to_run_dir(cfg.run_dir)
    try:
        yield
    finally:
        ray.shutdown()
        logs.detach()
