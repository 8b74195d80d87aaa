"""A throwaway S3-compatible HTTP server for tests: moto's server mode on a free loopback port.

Moto speaks the S3 REST protocol over real HTTP, so boto3 and httpx talk to it as to MinIO or AWS. It does not check
request signatures, so tests that care about presigned URLs check their shape and signature themselves.
"""

from __future__ import annotations

from typing import Any

import boto3
from moto.server import ThreadedMotoServer

# Moto accepts any credentials; these are the values the tests sign with.
ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"


class S3Server:
    """Starts moto on 127.0.0.1 with an OS-chosen port; ``stop()`` shuts it down."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.port = port
        self.endpoint_url = f"http://{host}:{port}"

    def client(self) -> Any:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def env(self, bucket: str) -> dict[str, str]:
        """``SDQ_*``/``AWS_*`` variables that point sdqueue's S3 backend at this server."""
        return {
            "SDQ_STORAGE": "s3",
            "SDQ_S3_BUCKET": bucket,
            "SDQ_S3_ENDPOINT_URL": self.endpoint_url,
            "SDQ_S3_PATH_STYLE": "true",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def stop(self) -> None:
        self._server.stop()
