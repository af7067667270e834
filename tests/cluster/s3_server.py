"""An S3-compatible server for the cluster tests: moto's, on a free loopback port, with one bucket
and dummy credentials in the environment (no secret anywhere, no instance-metadata lookups)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

BUCKET = "sinkd"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-metadata lookups on this machine


@dataclasses.dataclass
class S3:
    endpoint: str
    client: object

    def uri(self, path: str, bucket: str = BUCKET) -> str:
        return f"s3://{bucket}/{path}?endpoint_override={self.endpoint}&scheme=http"

    def keys(self, prefix: str) -> dict:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return {o["Key"]: self.client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in listing}


def use_test_credentials() -> None:
    """The dummy credentials in this process's environment, before any Ray starts: Ray's workers and
    nodes inherit it, so Ray Data tasks and training workers reach the test server too."""
    os.environ.update(CREDENTIALS)


def s3_server():
    """moto's S3 server on a free loopback port with one bucket, dummy credentials in the environment."""
    server_mod = pytest.importorskip("moto.server")
    import boto3

    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}")
            client.create_bucket(Bucket=BUCKET)
            yield S3(f"127.0.0.1:{port}", client)
        finally:
            server.stop()
