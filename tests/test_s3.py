"""Object storage against a real S3 API (moto's server mode on loopback, tests/conftest.py `s3`).

Quick: data_pipeline.storage round trips and its errors (missing bucket, missing object, wrong
credentials), each naming the URL and what to do. Slow: the demo data precomputed and packed into a
bucket, and training from it through a bounded cache (see the tests below).
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from data_pipeline import storage


def _moto_auth(endpoint: str, count: str) -> None:
    """Switch moto's credential checks on (after `count` free requests: "0") or off ("inf")."""
    req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()


def test_storage_round_trip(s3, tmp_path):
    """Write, list, read back, exists; the same calls on a local directory give the same answers."""
    for root in (s3.url("ds"), str(tmp_path / "ds")):
        storage.write_json(storage.join(root, "meta.json"), {"a": 1})
        storage.write_bytes(storage.join(root, "train", "shard.00000.mds"), b"\x00" * 3000)
        assert storage.list_dir(root) == ["meta.json", "train"]
        assert storage.read_json(storage.join(root, "meta.json")) == {"a": 1}
        with storage.open_read(storage.join(root, "train", "shard.00000.mds")) as f:
            assert f.read(10) == b"\x00" * 10 and len(f.read()) == 2990  # streamed in pieces
        assert storage.exists(storage.join(root, "meta.json")) and not storage.exists(storage.join(root, "nope"))
        assert storage.parent(storage.join(root, "train")) == root


def test_storage_errors_name_the_url_and_what_to_do(s3):
    """A missing bucket, a missing object and wrong credentials: StorageError naming the URL and the remedy."""
    storage.write_bytes(s3.url("a"), b"x")
    with pytest.raises(storage.StorageError, match=r"s3://no-such-bucket-x/a: bucket 'no-such-bucket-x' does not exist.*create it"):
        storage.read_bytes("s3://no-such-bucket-x/a")
    with pytest.raises(storage.StorageError, match=r"does not exist.*create it"):
        storage.exists("s3://no-such-bucket-x/a")  # a missing bucket is not "absent": it must not be redone silently
    with pytest.raises(storage.StorageError, match=rf"{s3.url('b')}: no such object.*run the stage that writes it"):
        storage.read_bytes(s3.url("b"))
    iam = __import__("boto3").client("iam", endpoint_url=s3.endpoint, region_name="us-east-1",
                                     aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    _moto_auth(s3.endpoint, "0")
    try:
        with pytest.raises(storage.StorageError, match=rf"{s3.url('a')}: access denied.*check the credentials in AWS_ACCESS_KEY_ID"):
            storage.read_bytes(s3.url("a"))  # the fixture's keys are unknown to the server now
        with pytest.MonkeyPatch.context() as mp:  # the real keys read it: the check is the credentials, not the test
            mp.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
            mp.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
            assert storage.read_bytes(s3.url("a")) == b"x"
    finally:
        _moto_auth(s3.endpoint, "inf")
