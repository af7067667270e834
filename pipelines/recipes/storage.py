"""ray.storage_path as a place this run may write, checked before any stage starts.

Everything goes through pyarrow.fs, as Ray Train and Tune do, so a local folder, `s3://`, `gs://` and
an S3-compatible store (`s3://bucket/run?endpoint_override=host:port&scheme=http`) behave alike.

- `probe_storage`: create and delete one uniquely named object, so a missing bucket, a read-only
  path or rejected credentials fail now in one line, not at a stage's first checkpoint an hour in.
- `check_claim` / `write_claim`: a small JSON marker (`sinkd_owner.json`) inside the folder a stage,
  a Tune experiment or a comparison persists to, naming the run (its run_dir) and its settings. Ray
  resumes whatever it finds under a storage path; the marker makes a path reused by another run a
  one-line error, while a rerun of the same job (same run_dir and settings) still resumes.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from ..config import Config, ConfigError
from ..config.uris import is_local_fs, open_storage, short_reason, shown

MARKER = "sinkd_owner.json"
PROBE_PREFIX = ".sinkd_write_probe_"


@dataclasses.dataclass(frozen=True)
class Claim:
    """Who persists under a storage folder: what it holds (for errors), the run, its settings."""

    what: str  # "stage 'sinkd'", "the Tune experiment", ...
    run_dir: str | None  # None: the folder lives inside run_dir and moves with it
    settings: dict

    def to_json(self) -> dict:
        # Through JSON once, so tuples, paths and numbers compare as they read back.
        return json.loads(json.dumps({"what": self.what, "run_dir": self.run_dir, "settings": self.settings},
                                     default=str))


def storage_key(cfg: Config) -> str:
    """The config key an error about the storage names: ray.storage_path, or run_dir by default."""
    return "ray.storage_path" if cfg.ray.storage_path else "run_dir"


def storage_owner(cfg: Config) -> str | None:
    """The run a claim names: its run_dir when the storage is elsewhere (a moved run_dir keeps its own)."""
    return cfg.run_dir if cfg.ray.storage_path else None


def probe_storage(uri: str, key: str = "ray.storage_path") -> None:
    """Write and delete one uniquely named object under `uri`; a ConfigError names `key` otherwise.
    A local folder that does not exist yet is left alone: check_cluster checked it can be created,
    and making it here would write before the run starts. Existing objects are never touched."""
    import pyarrow.fs

    fs, path = open_storage(uri, key)
    if is_local_fs(fs) and fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return
    probe = f"{path.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(probe) as out:
            out.write(b"sinkd write probe: safe to delete\n")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot write to {shown(uri)} ({short_reason(e)})") from None
    try:
        fs.delete_file(probe)
    except (OSError, ValueError) as e:  # Ray deletes old checkpoints (keep_checkpoints): it must be allowed
        raise ConfigError(f"{key}: cannot delete from {shown(uri)} ({short_reason(e)})") from None


def read_claim(uri: str, key: str = "ray.storage_path") -> dict | None:
    """The marker under `uri`, or None when there is none (a fresh folder, or one from before markers)."""
    import pyarrow.fs

    fs, path = open_storage(uri, key)
    marker = f"{path.rstrip('/')}/{MARKER}"
    try:
        if fs.get_file_info(marker).type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(marker) as f:
            return json.loads(f.read().decode())
    except (OSError, ValueError) as e:  # ValueError: json's decode error too (a damaged marker)
        raise ConfigError(f"{key}: cannot read {shown(uri)}/{MARKER} ({short_reason(e)})") from None


def claim_conflicts(old: dict, new: dict) -> str:
    """What differs between the marker found and this run's claim, in words; "" when it may resume."""
    parts = []
    if old.get("run_dir") and new["run_dir"] and old["run_dir"] != new["run_dir"]:
        parts.append(f"its run_dir is {old['run_dir']}")
    changed = diff_keys(old.get("settings"), new["settings"])
    if changed:
        parts.append(f"{', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} changed")
    return "; ".join(parts)


def check_claim(uri: str, claim: Claim, key: str = "ray.storage_path") -> None:
    """Refuse a storage folder another run (another run_dir, or other settings) persisted to."""
    old = read_claim(uri, key)
    if old is None:
        return
    conflicts = claim_conflicts(old, claim.to_json())
    if conflicts:
        raise ConfigError(f"{key}: {shown(uri)} holds {claim.what} of another run ({conflicts}); use another {key}")


def write_claim(uri: str, claim: Claim, key: str = "ray.storage_path") -> None:
    """Record this run as the folder's owner (before Ray writes there), so other runs are refused."""
    fs, path = open_storage(uri, key)
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path.rstrip('/')}/{MARKER}") as out:
            out.write(json.dumps(claim.to_json(), indent=1).encode())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot write to {shown(uri)} ({short_reason(e)})") from None


def diff_keys(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix or "value"]
