"""Reading a job: one YAML parse, `--set key=value` overrides, the typed Config.

    cfg = load_config("job.yaml", ["train.lr=1e-4"])   # typed; cfg.written: the mapping as written

The checks that read files (data, models, tokenizers) are `pipelines.tasks.check_config`'s.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .schema import Config
from .typed import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def read_yaml(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The job mapping of a YAML file (or the embedded default job) with overrides applied."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for item in overrides or []:
        apply_override(raw, item)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (or the embedded default job) + `key.sub=value` overrides -> a typed Config."""
    return Config.from_dict(read_yaml(path, overrides))


def apply_override(raw: dict, item: str) -> None:
    """`train.lr=1e-4` -> raw["train"]["lr"] = 1e-4 (the value is parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key=value")
    key, value = item.split("=", 1)
    if not all(key.strip().split(".")):
        raise ConfigError(f"--set {item}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    set_key(raw, key.strip(), parsed)


def set_key(raw: dict, key: str, value) -> None:
    """raw["a"]["b"]["c"] = value for key "a.b.c", creating missing mappings (--set, Tune samples)."""
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is not a mapping, cannot set {key}")
        node = child
    node[parts[-1]] = value
