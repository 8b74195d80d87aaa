"""Result images in an S3 bucket (AWS or any S3-compatible server), linked to with SigV4 presigned GET URLs.

A PUT is atomic on S3: an object becomes visible only once its whole body has arrived, so readers never see half an
image. Objects are private; ``url(key)`` signs a GET that is valid for ``url_expiry_s`` seconds, computed locally (no
request to the server).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from core.storage.base import Storage, validate_key

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)

# S3 deletes at most this many keys per DeleteObjects request.
DELETE_BATCH = 1000
NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def _client(
    *,
    endpoint_url: str | None,
    region: str | None,
    path_style: bool,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> Any:
    options: dict[str, Any] = {}
    if endpoint_url:
        # botocore >= 1.36 adds CRC checksums to every upload by default; several S3-compatible servers (older MinIO,
        # Ceph, some hosted ones) reject those headers, so only send checksums the operation requires there.
        options = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    config = Config(
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "virtual"},
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        **options,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=config,
    )


def _normalize_prefix(prefix: str) -> str:
    if prefix.startswith("/"):
        raise ValueError(f"S3 prefix must not start with '/', got {prefix!r}")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


class S3Storage(Storage):
    """Objects ``{prefix}{key}`` in ``bucket``.

    ``client`` does the reads and writes; ``presign_client`` (default: the same) signs the URLs handed to clients.
    They differ when the servers reach the object store at another address than clients do (``http://minio:9000``
    inside docker compose, ``http://localhost:9000`` from the host): a presigned URL is signed for its host name.
    """

    name = "s3"

    def __init__(
        self, bucket: str, *, client: Any, presign_client: Any = None, prefix: str = "", url_expiry_s: int = 3600
    ) -> None:
        if not bucket:
            raise ValueError("S3 bucket name is empty: set SDQ_S3_BUCKET")
        if not 1 <= url_expiry_s <= 7 * 24 * 3600:
            raise ValueError(f"presigned URL expiry must be between 1 s and 7 days (SigV4), got {url_expiry_s}")
        self.bucket = bucket
        self.prefix = _normalize_prefix(prefix)
        self.client = client
        self.presign_client = presign_client or client
        self.url_expiry_s = url_expiry_s

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Storage:
        if not settings.s3_bucket:
            raise ValueError("SDQ_S3_BUCKET must be set when SDQ_STORAGE=s3")
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        if bool(settings.s3_access_key_id) != bool(secret):
            raise ValueError(
                "set both SDQ_S3_ACCESS_KEY_ID and SDQ_S3_SECRET_ACCESS_KEY, or neither (to use the AWS_* variables)"
            )
        # Empty strings (a blank line in .env) mean "not set", like for boto3's own variables.
        endpoint = settings.s3_endpoint_url or None
        make_client = functools.partial(
            _client,
            region=settings.s3_region or None,
            path_style=settings.s3_path_style,
            access_key_id=settings.s3_access_key_id or None,
            secret_access_key=secret,
        )
        client = make_client(endpoint_url=endpoint)
        public = settings.s3_public_endpoint_url or None
        presign_client = make_client(endpoint_url=public) if public and public != endpoint else client
        return cls(
            settings.s3_bucket,
            client=client,
            presign_client=presign_client,
            prefix=settings.s3_prefix,
            url_expiry_s=settings.s3_url_expiry_s,
        )

    def object_key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.object_key(key), Body=data, ContentType=content_type)

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                raise KeyError(key) from None
            raise
        body: bytes = response["Body"].read()
        return body

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) in NOT_FOUND_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        # S3 answers 204 for a missing key too, which is the interface's "not an error".
        self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))

    def url(self, key: str) -> str:
        url: str = self.presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self.object_key(key)},
            ExpiresIn=self.url_expiry_s,
        )
        return url

    def list_objects(self) -> Iterator[tuple[str, datetime]]:
        """Every ``(key, last_modified)`` under the prefix, keys without the prefix (for retention)."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :], obj["LastModified"]

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete ``keys`` in batches of up to 1000 per request; returns how many were deleted."""
        batch: list[str] = []
        deleted = 0
        for key in keys:
            batch.append(self.object_key(key))
            if len(batch) == DELETE_BATCH:
                deleted += self._delete_batch(batch)
                batch = []
        if batch:
            deleted += self._delete_batch(batch)
        return deleted

    def _delete_batch(self, object_keys: list[str]) -> int:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in object_keys], "Quiet": True}
        )
        errors = response.get("Errors", [])
        for err in errors:
            log.warning("could not delete s3://%s/%s: %s", self.bucket, err.get("Key"), err.get("Message"))
        return len(object_keys) - len(errors)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
