"""A two-node Ray cluster on one machine: `ray start --head` and `ray start --address ...`, each with
`--block` in a process group of its own, its own ports, CPUs, custom resources and temp dir.

Everything lives under one private directory: Ray's temp dirs and address file (RAY_TMPDIR), so a
plain `ray.init()` elsewhere on the machine never joins this cluster and `ray stop` is never needed.
Stopping a node kills its process group (raylet, GCS, dashboard, the workers it forked); `leftovers()`
lists any process still carrying the cluster's directory or process groups, e.g. a job's driver.

A worker node can be isolated: it runs in a mount namespace of its own (`unshare --mount`, root only)
with an empty tmpfs laid over each of the given folders, so nothing the driver wrote there (run dirs,
data, model folders) can be read on that node; a restarted node starts with empty folders again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port")
    return [x for name, port in zip(names, free_ports(len(names))) for x in (name, str(port))]


def unshare_mount() -> list[str]:
    """`unshare` for a private mount namespace: as root directly, else inside a user namespace."""
    return ["unshare", "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--map-root-user"])]


def can_isolate() -> str:
    """"" when this machine can start an isolated node, else why not (one line)."""
    try:
        done = subprocess.run([*unshare_mount(), "sh", "-c", "mount -t tmpfs sinkd-probe /mnt && umount /mnt"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare: {e}"
    return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]


class Node:
    """One `ray start --block` process group."""

    def __init__(self, name: str, args: list[str], cluster: "LocalCluster", hidden: list[Path] = (),
                 env: dict | None = None):
        self.name, self.args, self.cluster, self.hidden = name, args, cluster, [str(p) for p in hidden]
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [RAY, "start", "--block", *self.args, *_node_ports()]
        if self.hidden:  # unshare and sh exec: the node's process group leader is ray start itself
            mounts = 'for d in "$@"; do [ "$d" = -- ] && break; mount -t tmpfs sinkd-hidden "$d" || exit 97; done'
            cmd = [*unshare_mount(), "sh", "-c",
                   f'{mounts}; while [ "$1" != -- ]; do shift; done; shift; exec "$@"', "sh", *self.hidden, "--", *cmd]
        with open(self.cluster.root / f"{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**self.cluster.env, **self.env},
                                         start_new_session=True)
        self.cluster.pgids.add(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.proc = None


class LocalCluster:
    def __init__(self, root: Path, head_cpus: int, worker_cpus: int, head_resources: dict, worker_resources: dict,
                 object_store_mb: int = 300, worker_hidden: list[Path] = (), worker_env: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.pgids: set[int] = set()
        # Ray 2.60 turns token auth on for new clusters: a private token, in the environment of every
        # process started here (nodes, `ray job submit`, `sinkd submit`, the state CLI).
        self.env = {**os.environ, "RAY_TMPDIR": str(self.root), "TOKENIZERS_PARALLELISM": "false",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `sinkd` for the job entrypoint
                    # notice a lost node in ~3 s rather than ~15 s
                    "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "SINKD_SHIPPED_CACHE": str(self.root / "shipped_cache")}  # fetched model folders: cleaned up with root
        self.env.pop("RAY_ADDRESS", None)
        gcs, dash, client = free_ports(3)
        self.address, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        common = ["--node-ip-address", "127.0.0.1", "--object-store-memory", str(object_store_mb * 2**20),
                  "--disable-usage-stats"]
        self.head = Node("head", ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                                  str(dash), "--include-dashboard", "true", "--ray-client-server-port", str(client),
                                  "--temp-dir", str(self.root / "head"), "--num-cpus", str(head_cpus),
                                  "--resources", json.dumps(head_resources), *common], self)
        self.worker = Node("worker", ["--address", self.address, "--temp-dir", str(self.root / "worker"),
                                      "--num-cpus", str(worker_cpus), "--resources", json.dumps(worker_resources),
                                      *common], self, hidden=worker_hidden, env=worker_env)

    def start(self, timeout: float = 180) -> None:
        self.head.start()
        self.wait_nodes(1, timeout)
        self.worker.start()
        self.wait_nodes(2, timeout)

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float = 180) -> list[dict]:
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                alive = self.alive_nodes()
                if len(alive) == n:
                    return alive
                last = f"{len(alive)} alive"
            except subprocess.CalledProcessError as e:  # the dashboard is not up yet
                last = e.stderr.strip().splitlines()[-1:] if e.stderr else e
            time.sleep(1)
        raise TimeoutError(f"not {n} Ray nodes alive after {timeout}s ({last}); logs in {self.root}")

    def state(self, kind: str, *filters: str) -> list[dict]:
        """`ray list KIND --detail` through the dashboard's state API (kept a while after actors die)."""
        cmd = [RAY, "list", kind, "--address", self.dashboard, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            cmd += ["--filter", f]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=self.env, check=True).stdout
        return json.loads(out) if out.lstrip().startswith("[") else []  # else "No resource in the cluster"

    def client(self):
        """A JobSubmissionClient for this cluster (the token as a header: this process keeps its own env)."""
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})

    def leftovers(self) -> list[str]:
        """Processes still holding this cluster's directory or process groups."""
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
        rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
        return [" ".join(r) for r in rows if len(r) == 3 and int(r[0]) != os.getpid()
                and (int(r[1]) in self.pgids or str(self.root) in r[2])]

    def stop(self) -> None:
        self.worker.stop()
        self.head.stop()
        deadline = time.time() + 30
        while (left := self.leftovers()) and time.time() < deadline:
            for row in left:  # e.g. a job driver in a session of its own: ours, started through this cluster
                try:
                    os.kill(int(row.split()[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
