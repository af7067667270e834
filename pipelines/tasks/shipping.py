"""Model folders that exist only on the driver's disk (a teacher the job fine-tuned, a model named by
a local or pkg:// path, an exported student to score), carried to Ray workers on other nodes through
ray.storage_path when that is an object store (s3://, gs://, an S3-compatible endpoint).

- `ship(path, cfg)`, on the driver: a local folder -> `<storage>/shipped/<name>-<key>`, uploaded once
  (the key digests the files' names, sizes and modification times, so an unchanged folder is not sent
  again), returned as that URI. With a local or shared ray.storage_path (one machine, NFS) every node
  reads the driver's disk already: the path comes back unchanged. Hub ids, URIs and None pass through.
- `fetch(ref)`, wherever the files are read (a training worker, a Tune trial, a batch-inference
  actor): a shipped URI -> a node-local copy, downloaded once per node; a local path unchanged.

A folder is complete once its `sinkd_shipped.json` (the file list) exists: it is written last on
upload and checked on download, so an interrupted upload is redone and never read half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from ..config import Config, ConfigError, join_storage
from ..config.uris import is_object_store, open_storage, short_reason, shown

MANIFEST = "sinkd_shipped.json"
_origins: dict[str, str] = {}  # shipped URI -> the local folder it came from, in the process that shipped it


def cache_root() -> Path:
    """Where a node keeps downloaded folders: SINKD_SHIPPED_CACHE, else <tmp>/sinkd-shipped."""
    return Path(os.environ.get("SINKD_SHIPPED_CACHE") or Path(tempfile.gettempdir()) / "sinkd-shipped")


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def folder_key(folder: Path) -> str:
    """A digest of the folder's file names, sizes and modification times (cheap for a 1 GB model)."""
    h = hashlib.sha256()
    for name, size in _files(folder).items():
        h.update(f"{name}|{size}|{(folder / name).stat().st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def ship(path: str | None, cfg: Config, key: str = "ray.storage_path") -> str | None:
    """The reference a worker on any node can read `path` by (see the module docstring)."""
    if not path or "://" in path or not is_object_store(cfg.ray.storage_path):
        return path
    folder = Path(path)
    if not folder.is_dir():  # a hub id: each node downloads it itself
        return path
    uri = join_storage(cfg.ray.storage_path, "shipped", f"{folder.name}-{folder_key(folder)}")
    fs, root = open_storage(uri, key)
    try:
        import pyarrow.fs

        if fs.get_file_info(f"{root}/{MANIFEST}").type == pyarrow.fs.FileType.NotFound:
            fs.create_dir(root, recursive=True)
            pyarrow.fs.copy_files(str(folder), root, destination_filesystem=fs, use_threads=True)
            with fs.open_output_stream(f"{root}/{MANIFEST}") as out:  # last: the folder is complete
                out.write(json.dumps(_files(folder), indent=1).encode())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot upload {folder} to {shown(uri)} ({short_reason(e)})") from None
    _origins[uri] = str(folder)
    return uri


def fetch(ref: str | None) -> str | None:
    """A local folder holding what `ref` names: the shipped folder's node-local copy (downloaded on
    first use; the process that shipped it reads its own folder), or `ref` itself when it is local."""
    if not ref or "://" not in ref:
        return ref
    if ref in _origins:
        return _origins[ref]
    fs, root = open_storage(ref)
    local = cache_root() / root.rstrip("/").rsplit("/", 1)[-1]
    if (local / MANIFEST).is_file():
        return str(local)
    try:
        with fs.open_input_stream(f"{root}/{MANIFEST}") as f:
            expected = json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"shipped folder {shown(ref)} is incomplete or gone ({short_reason(e)}); "
                                "rerun the job to upload it again") from None
    import pyarrow.fs

    part = local.with_name(f"{local.name}.part-{uuid.uuid4().hex[:8]}")  # workers of one node race here
    part.mkdir(parents=True)
    try:
        pyarrow.fs.copy_files(root, str(part), source_filesystem=fs, use_threads=True)
        got = {k: v for k, v in _files(part).items() if k != MANIFEST}
        if got != expected:
            raise FileNotFoundError(f"shipped folder {shown(ref)}: {len(got)} files downloaded, "
                                    f"{len(expected)} expected")
        try:
            part.rename(local)
        except OSError:  # another worker on this node finished first: its copy is the same files
            pass
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return str(local)
