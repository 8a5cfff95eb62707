"""S3 settings from the environment: our names, RunPod's official worker's names, and limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from diffbox.config import Settings, split_s3_endpoint


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # Virtual-hosted: the bucket is the host's first label(s), the endpoint the rest.
        ("https://mybucket.s3.us-east-1.amazonaws.com",
         ("mybucket", "https://s3.us-east-1.amazonaws.com", "us-east-1")),
        ("https://my.dotted.bucket.s3.eu-west-1.amazonaws.com/",
         ("my.dotted.bucket", "https://s3.eu-west-1.amazonaws.com", "eu-west-1")),
        ("https://legacy.s3-us-west-2.amazonaws.com", ("legacy", "https://s3-us-west-2.amazonaws.com", "us-west-2")),
        ("https://b1.s3.amazonaws.com", ("b1", "https://s3.amazonaws.com", None)),
        ("https://bkt.s3.us-west-004.backblazeb2.com",
         ("bkt", "https://s3.us-west-004.backblazeb2.com", "us-west-004")),
        ("https://space.nyc3.digitaloceanspaces.com", ("space", "https://nyc3.digitaloceanspaces.com", "nyc3")),
        # Service endpoints: no bucket in the host, URL kept as given.
        ("https://nyc3.digitaloceanspaces.com", (None, "https://nyc3.digitaloceanspaces.com", "nyc3")),
        ("https://s3.us-east-1.amazonaws.com", (None, "https://s3.us-east-1.amazonaws.com", "us-east-1")),
        ("https://0123abcd.r2.cloudflarestorage.com", (None, "https://0123abcd.r2.cloudflarestorage.com", None)),
        ("https://s3api-eu-ro-1.runpod.io", (None, "https://s3api-eu-ro-1.runpod.io", None)),
        ("http://127.0.0.1:9000", (None, "http://127.0.0.1:9000", None)),
        ("http://minio:9000", (None, "http://minio:9000", None)),
    ],
)
def test_split_s3_endpoint(url: str, expected: tuple[str | None, str, str | None]) -> None:
    assert split_s3_endpoint(url) == expected


def test_runpod_names_take_bucket_and_region_from_the_endpoint_host() -> None:
    settings = Settings.from_env({
        "BUCKET_ENDPOINT_URL": "https://outputs.s3.eu-central-1.amazonaws.com",
        "BUCKET_ACCESS_KEY_ID": "AKIARUNPOD",
        "BUCKET_SECRET_ACCESS_KEY": "runpod-secret",
        "BUCKET_PREFIX": "renders/",
    })
    s3 = settings.s3
    assert s3 is not None
    assert (s3.bucket, s3.region) == ("outputs", "eu-central-1")
    assert s3.endpoint_url == "https://s3.eu-central-1.amazonaws.com"
    assert (s3.access_key_id, s3.secret_access_key, s3.prefix) == ("AKIARUNPOD", "runpod-secret", "renders")
    assert "runpod-secret" not in repr(settings)


def test_diffbox_names_win_and_credentials_stay_paired() -> None:
    s3 = Settings.from_env({
        "DIFFBOX_S3_BUCKET": "mine",
        "DIFFBOX_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "DIFFBOX_S3_REGION": "auto",
        "BUCKET_ENDPOINT_URL": "https://other.s3.us-east-1.amazonaws.com",
        "AWS_ACCESS_KEY_ID": "AKIAAWS",
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "AWS_SESSION_TOKEN": "token",
        "BUCKET_ACCESS_KEY_ID": "AKIARUNPOD",
        "BUCKET_SECRET_ACCESS_KEY": "runpod-secret",
        "DIFFBOX_S3_URL_TTL_S": "3600",
        "DIFFBOX_S3_PART_SIZE_MB": "5",
        "DIFFBOX_S3_RETRY_MODE": "adaptive",
    }).s3
    assert s3 is not None
    assert (s3.bucket, s3.endpoint_url, s3.region) == ("mine", "http://127.0.0.1:9000", "auto")
    assert (s3.access_key_id, s3.secret_access_key, s3.session_token) == ("AKIAAWS", "aws-secret", "token")
    assert (s3.url_ttl_s, s3.part_size_mb, s3.retry_mode) == (3600, 5, "adaptive")


def test_no_bucket_means_no_s3() -> None:
    assert Settings.from_env({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}).s3 is None


def test_endpoint_without_a_bucket_anywhere_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="DIFFBOX_S3_BUCKET"):
        Settings.from_env({"BUCKET_ENDPOINT_URL": "https://acct.r2.cloudflarestorage.com"})


def test_conflicting_buckets_are_refused() -> None:
    with pytest.raises(ValueError, match="BUCKET_ENDPOINT_URL names bucket 'a-bucket'"):
        Settings.from_env({"DIFFBOX_S3_BUCKET": "b-bucket",
                           "BUCKET_ENDPOINT_URL": "https://a-bucket.s3.us-east-1.amazonaws.com"})


@pytest.mark.parametrize(("name", "value"), [
    ("DIFFBOX_S3_PART_SIZE_MB", "4"),  # below S3's 5 MiB minimum part
    ("DIFFBOX_S3_URL_TTL_S", str(8 * 24 * 3600)),  # SigV4 presigned URLs live at most 7 days
    ("DIFFBOX_S3_RETRY_MODE", "legacy-loop"),
])
def test_bad_values_are_refused(name: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings.from_env({"DIFFBOX_S3_BUCKET": "bucket", name: value})
