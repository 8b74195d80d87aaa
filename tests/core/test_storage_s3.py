"""The S3 backend against a real S3-compatible HTTP server (moto), plus an independent check of its URL signatures."""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from redis import Redis, RedisError

from core import jobstore
from core.jobs import Txt2ImgRequest
from core.queues import Keys
from core.settings import load_settings
from core.storage import make_storage
from core.storage.s3 import S3Storage
from sdqueue.retention import cleanup
from tests.redis_server import free_port
from tests.rq_worker_side import take
from tests.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY, S3Server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


def s3_settings(s3_server: S3Server, bucket: str, **overrides: object) -> S3Storage:
    values: dict[str, object] = {
        "storage": "s3",
        "s3_bucket": bucket,
        "s3_endpoint_url": s3_server.endpoint_url,
        "s3_path_style": True,
        "s3_region": REGION,
        "s3_access_key_id": ACCESS_KEY_ID,
        "s3_secret_access_key": SECRET_ACCESS_KEY,
        **overrides,
    }
    storage = make_storage(load_settings(**values))
    assert isinstance(storage, S3Storage)
    return storage


def sigv4_signature(method: str, url: str, secret: str) -> str:
    """Recompute a presigned URL's SigV4 signature from the AWS specification (not with botocore)."""
    parts = urlsplit(url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(params)
    date, scope = query["X-Amz-Date"], query["X-Amz-Credential"].split("/", 1)[1]
    # The query is already URI-encoded in the URL: sort the encoded pairs without the signature itself.
    raw_pairs = [p.split("=", 1) for p in parts.query.split("&")]
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(raw_pairs) if k != "X-Amz-Signature")
    assert query["X-Amz-SignedHeaders"] == "host"
    canonical_request = "\n".join(
        [method, parts.path, canonical_query, f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"]
    )
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def test_put_then_get_round_trips_bytes_and_content_type(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket, s3_prefix="results")  # the '/' is added
    storage.put("job1/0.png", b"\x89PNG fake", "image/png")

    assert storage.get("job1/0.png") == b"\x89PNG fake"
    assert storage.exists("job1/0.png")
    head = s3_server.client().head_object(Bucket=bucket, Key="results/job1/0.png")
    assert head["ContentType"] == "image/png"
    assert head["ContentLength"] == len(b"\x89PNG fake")


def test_missing_key_is_key_error_and_delete_is_idempotent(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket)
    assert not storage.exists("nope/0.png")
    with pytest.raises(KeyError):
        storage.get("nope/0.png")
    storage.put("job/0.webp", b"x", "image/webp")
    storage.delete("job/0.webp")
    storage.delete("job/0.webp")
    assert not storage.exists("job/0.webp")


def test_keys_escaping_the_prefix_are_refused(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket, s3_prefix="results/")
    for bad in ("../other/0.png", "/abs/0.png", "job/../../x"):
        with pytest.raises(ValueError, match="invalid storage key"):
            storage.put(bad, b"x", "image/png")


def test_presigned_url_serves_the_object_over_http(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket, s3_prefix="results/", s3_url_expiry_s=600)
    storage.put("job2/0.jpg", b"jpeg bytes", "image/jpeg")

    url = storage.url("job2/0.jpg")
    response = httpx.get(url)

    assert response.status_code == 200
    assert response.content == b"jpeg bytes"
    assert response.headers["content-type"] == "image/jpeg"


def test_presigned_url_shape_expiry_and_signature(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket, s3_url_expiry_s=900)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    url = storage.url("job3/1.png")
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))

    # path style: {endpoint}/{bucket}/{key}
    assert f"{parts.scheme}://{parts.netloc}" == s3_server.endpoint_url
    assert parts.path == f"/{bucket}/job3/1.png"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert query["X-Amz-Expires"] == "900"
    assert query["X-Amz-Credential"].startswith(f"{ACCESS_KEY_ID}/")
    assert query["X-Amz-Credential"].endswith(f"/{REGION}/s3/aws4_request")
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert before - timedelta(seconds=1) <= signed_at <= datetime.now(timezone.utc)
    assert len(query["X-Amz-Signature"]) == 64
    assert query["X-Amz-Signature"] == sigv4_signature("GET", url, SECRET_ACCESS_KEY)


def test_virtual_host_style_puts_the_bucket_in_the_host_name(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(
        s3_server, bucket, s3_path_style=False, s3_endpoint_url=f"http://localhost:{s3_server.port}"
    )
    # bucket.localhost does not resolve here, so the object goes in path-style; the URL is virtual-host style.
    s3_settings(s3_server, bucket).put("job4/0.png", b"vhost", "image/png")
    url = storage.url("job4/0.png")
    parts = urlsplit(url)

    assert parts.netloc == f"{bucket}.localhost:{s3_server.port}"
    assert parts.path == "/job4/0.png"
    assert dict(parse_qsl(parts.query))["X-Amz-Signature"] == sigv4_signature("GET", url, SECRET_ACCESS_KEY)
    # The server picks the bucket from the Host header, as AWS does; connect to loopback, keep the signed host.
    response = httpx.get(url.replace(parts.netloc, f"127.0.0.1:{s3_server.port}", 1), headers={"Host": parts.netloc})
    assert response.status_code == 200
    assert response.content == b"vhost"


def test_public_endpoint_signs_urls_for_the_clients_host(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket, s3_public_endpoint_url="https://images.example.com")
    url = storage.url("job5/0.png")
    parts = urlsplit(url)

    assert parts.scheme == "https"
    assert parts.netloc == "images.example.com"
    assert parts.path == f"/{bucket}/job5/0.png"
    assert dict(parse_qsl(parts.query))["X-Amz-Signature"] == sigv4_signature("GET", url, SECRET_ACCESS_KEY)


def test_credentials_fall_back_to_the_aws_variables(
    s3_server: S3Server, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENVIRONMENT1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "from-env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    storage = s3_settings(s3_server, bucket, s3_access_key_id=None, s3_secret_access_key=None, s3_region=None)
    storage.put("job6/0.png", b"env", "image/png")
    url = storage.url("job6/0.png")

    credential = dict(parse_qsl(urlsplit(url).query))["X-Amz-Credential"]
    assert credential.startswith("AKIAFROMENVIRONMENT1/")
    assert "/eu-west-3/s3/" in credential
    assert dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"] == sigv4_signature("GET", url, "from-env-secret")
    assert httpx.get(url).content == b"env"


def test_configuration_errors_name_the_variable(s3_server: S3Server) -> None:
    with pytest.raises(ValueError, match="SDQ_S3_BUCKET must be set"):
        s3_settings(s3_server, "")
    with pytest.raises(ValueError, match="SDQ_S3_SECRET_ACCESS_KEY"):
        s3_settings(s3_server, "b", s3_secret_access_key=None)


def test_retention_deletes_only_objects_older_than_the_cutoff(
    s3_server: S3Server, bucket: str, redis_url: str
) -> None:
    storage = s3_settings(s3_server, bucket, s3_prefix="results/")
    redis = Redis.from_url(redis_url)
    s3_server.client().put_object(Bucket=bucket, Key="elsewhere/keep.png", Body=b"not ours")
    storage.put("old/0.png", b"old", "image/png")
    storage.put("old/1.png", b"old", "image/png")
    time.sleep(1.1)  # S3 keeps LastModified to the second
    middle = time.time()
    time.sleep(1.1)
    storage.put("new/0.png", b"new", "image/png")

    dry = cleanup(storage, retention_s=60, redis=redis, result_ttl_s=3600, now=middle + 60, dry_run=True)
    assert (dry.deleted, dry.kept) == (2, 1)
    assert storage.exists("old/0.png")

    report = cleanup(storage, retention_s=60, redis=redis, result_ttl_s=3600, now=middle + 60)

    assert (report.deleted, report.kept) == (2, 1)
    assert not storage.exists("old/0.png")
    assert not storage.exists("old/1.png")
    assert storage.get("new/0.png") == b"new"
    assert s3_server.client().get_object(Bucket=bucket, Key="elsewhere/keep.png")["Body"].read() == b"not ours"


def test_retention_keeps_objects_of_queued_and_recently_finished_jobs(
    s3_server: S3Server, bucket: str, redis_url: str, tmp_path: Path
) -> None:
    day = 24 * 3600
    settings = load_settings(redis_url=redis_url, data_dir=tmp_path, result_ttl_s=3 * day)
    redis = Redis.from_url(redis_url)
    storage = s3_settings(s3_server, bucket, s3_prefix="results/")
    queued, finished = (jobstore.new_job_spec(Txt2ImgRequest(prompt="a cat"), task="img2img") for _ in range(2))
    for spec in (finished, queued):
        jobstore.enqueue(redis, settings, spec)
    take(redis, Keys(), finished.id).succeed({"images": [], "warnings": [], "timings": {}})
    for key in (f"{queued.id}/input.png", f"{queued.id}/mask.png", f"{finished.id}/0.png", "expired/0.png"):
        storage.put(key, b"x", "image/png")
    # S3 sets LastModified itself: look from two days on, so that every object is older than a one-day retention.
    later = time.time() + 2 * day

    report = cleanup(storage, retention_s=day, redis=redis, result_ttl_s=settings.result_ttl_s, now=later)

    assert (report.deleted, report.kept, report.kept_for_jobs) == (1, 3, 3)
    assert not storage.exists("expired/0.png")
    assert storage.exists(f"{queued.id}/input.png") and storage.exists(f"{queued.id}/mask.png")
    assert storage.exists(f"{finished.id}/0.png")

    # With a one-day result TTL the finished job's images are past it two days on; the queued job's inputs stay.
    report = cleanup(storage, retention_s=day, redis=redis, result_ttl_s=day, now=later)

    assert (report.deleted, report.kept_for_jobs) == (1, 2)
    assert not storage.exists(f"{finished.id}/0.png")
    assert storage.exists(f"{queued.id}/input.png")


def test_retention_without_redis_deletes_nothing(s3_server: S3Server, bucket: str) -> None:
    storage = s3_settings(s3_server, bucket)
    storage.put("expired/0.png", b"x", "image/png")

    with pytest.raises(RedisError):
        cleanup(storage, retention_s=60, redis=Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"),
                result_ttl_s=3600, now=time.time() + 3600)

    assert storage.exists("expired/0.png")
