"""cluster/: the Ray launcher YAML against the schema the installed Ray ships, the KubeRay manifests
field by field, the runtime env through Ray's own RuntimeEnv, and the job configs they run."""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipelines.cli import parser
from pipelines.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/home/ray/sinkd"  # where cluster/Dockerfile puts this checkout
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ----------------------------------------------------------------------------- ray up


def test_launcher_yaml_validates_against_the_installed_rays_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    launcher = _load(CLUSTER / "aws-gpu.yaml")
    schema = _ray_schema()
    jsonschema.validate(launcher, schema)
    validate_config(prepare_config(copy.deepcopy(launcher)))  # what `ray up` runs: AWS defaults merged in
    broken = {**copy.deepcopy(launcher), "worker_nodes": {}}  # the schema is strict: unknown keys fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_launcher_has_a_cpu_head_gpu_workers_and_installs_pinned_torch_first():
    launcher = _load(CLUSTER / "aws-gpu.yaml")
    types = launcher["available_node_types"]
    assert launcher["provider"]["type"] == "aws"
    assert types[launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != launcher["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= 1 for t in workers)
    assert all(t["node_config"]["InstanceType"].startswith(("g5", "p4d", "p5", "g6")) for t in workers)
    setup = launcher["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    package_at = next(i for i, c in enumerate(setup) if "sinkd[pipeline]" in c)
    assert torch_at < package_at
    mounted = {remote for remote, local in launcher["file_mounts"].items() if local == "."}
    assert any(remote in setup[package_at] for remote in mounted)  # installs the checkout file_mounts ships


# ----------------------------------------------------------------------------- KubeRay


def _cluster_specs():
    for name in MANIFESTS:
        doc = _load(CLUSTER / "kuberay" / name)
        yield name, doc, doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _check_pod(template: dict, where: str, gpus: int, claims: set) -> None:
    spec = template["spec"]
    (container,) = spec["containers"]
    assert container["name"] and container["image"], where
    res = container["resources"]
    assert res["limits"] == res["requests"], f"{where}: requests and limits differ (Ray sizes from limits)"
    assert int(res["limits"].get("nvidia.com/gpu", 0)) == gpus, where
    assert float(res["limits"]["cpu"]) >= 1 and res["limits"]["memory"].endswith("Gi"), where
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container["volumeMounts"]:
        assert mount["name"] in volumes, f"{where}: volumeMount {mount['name']} has no volume"
    assert {v["persistentVolumeClaim"]["claimName"] for v in volumes.values() if "persistentVolumeClaim" in v} <= claims
    assert any(m["mountPath"] == "/shared" for m in container["volumeMounts"]), f"{where}: no shared storage"


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_carry_the_required_fields(name):
    claims = {_load(CLUSTER / "kuberay" / "storage.yaml")["metadata"]["name"]}
    doc = _load(CLUSTER / "kuberay" / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob") and doc["metadata"]["name"]
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    import ray

    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265} <= ports
    _check_pod(head["template"], f"{name} head", gpus=0, claims=claims)
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["groupName"] and 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert all(isinstance(v, str) for v in gpu["rayStartParams"].values())
    _check_pod(gpu["template"], f"{name} gpu workers", gpus=1, claims=claims)
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


@pytest.mark.parametrize("name, command", [("rayjob-train.yaml", "train"), ("rayjob-tune.yaml", "tune")])
def test_rayjob_entrypoints_are_valid_sinkd_commands_on_valid_configs(name, command, tmp_path):
    from ray.runtime_env import RuntimeEnv

    spec = _load(CLUSTER / "kuberay" / name)["spec"]
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert isinstance(spec["shutdownAfterJobFinishes"], bool) and spec["ttlSecondsAfterFinished"] > 0
    RuntimeEnv(**yaml.safe_load(spec["runtimeEnvYAML"]))
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sinkd", command]
    args = parser().parse_args([a.replace(IMAGE_ROOT, str(REPO)) for a in argv[1:]])
    # The job config it names, as the cluster would read it (storage and run dir moved to tmp here).
    local = [f"run_dir={tmp_path / 'run'}", f"ray.storage_path={tmp_path / 'storage'}"]
    cfg = load_config(args.config, args.overrides + local)
    assert cfg.scaling.use_gpu and cfg.train.precision == "bf16" and cfg.scaling.max_failures >= 1
    raw = _load(Path(args.config))
    assert raw["ray"]["storage_path"].startswith("/shared/") and raw["run_dir"].startswith("/shared/")
    if command == "tune":
        from pipelines.recipes.tune_space import load_space

        assert load_space(args.space).metric.startswith("val_")


# ----------------------------------------------------------------------------- runtime env


def test_runtime_env_yaml_is_a_valid_ray_runtime_env(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    from pipelines.recipes.submit import runtime_env

    raw = _load(CLUSTER / "runtime_env.yaml")
    env = RuntimeEnv(**raw)
    assert env["working_dir"] == "." and ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    monkeypatch.chdir(REPO)
    assert runtime_env(str(CLUSTER / "runtime_env.yaml"), ".") == raw  # what `sinkd submit --runtime-env` sends
    assert os.path.isdir(REPO / raw["working_dir"])
