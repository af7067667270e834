"""Storage URIs as Ray and pyarrow read them: a local folder, `s3://`, `gs://`, or an S3-compatible
store (`s3://bucket/run?endpoint_override=host:port&scheme=http`), opened through pyarrow.fs."""

from __future__ import annotations

import re
from pathlib import Path

from .typed import ConfigError


def shown(uri: str) -> str:
    """A URI for messages: without its query, which may carry access_key / secret_key."""
    return uri.partition("?")[0] if "://" in uri else uri


def short_reason(exc: BaseException) -> str:
    """pyarrow's error in a few words: `AWS Error NO_SUCH_BUCKET during ...: The specified bucket
    does not exist (Request ID: ...)` -> `NO_SUCH_BUCKET: The specified bucket does not exist`."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    aws = re.search(r"AWS Error (\w+) during \w+ operation:\s*(.*)", text)
    if aws:
        text = f"{aws.group(1)}: {aws.group(2)}".rstrip(": ")
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text)
    return text if len(text) <= 200 else text[:197] + "..."


def open_storage(uri: str, key: str = "ray.storage_path"):
    """(pyarrow filesystem, path on it) for a local path or a URI, as Ray resolves it."""
    import pyarrow.fs

    target = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    try:
        return pyarrow.fs.FileSystem.from_uri(target)
    except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid (unknown scheme, bad query)
        raise ConfigError(f"{key}: cannot open {shown(uri)} ({short_reason(e)})") from None


def is_local_fs(fs) -> bool:
    import pyarrow.fs

    return isinstance(fs, pyarrow.fs.LocalFileSystem)


def is_object_store(uri: str | None) -> bool:
    """A URI whose filesystem is not this machine's disk (s3://, gs://, ...): nodes share nothing else
    through it. A plain path or file:// is local (one machine, or a shared filesystem such as NFS)."""
    return bool(uri) and "://" in uri and uri.partition("://")[0].lower() not in ("file", "local")
