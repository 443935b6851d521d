"""Object storage for the data pipeline: one home for reading and writing local paths and remote URLs.

Every stage (precompute, pack, the loader, the dry run) goes through these functions, so a
`s3://bucket/prefix` works wherever a local directory does. `s3://` is spoken with boto3 directly
(reads are streamed: `open_read` never copies a whole object to local disk); the other schemes
streaming supports (`gs://`, `oci://`, `azure://`, `hf://`, ...) go through streaming's own
`CloudDownloader` / `CloudUploader` (`streaming.base.storage`), so nothing here is S3-only except the
fast path. The endpoint and credentials come only from the standard environment: `S3_ENDPOINT_URL`
(an S3-compatible store such as MinIO, Ceph or moto) and boto3's usual `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION`; never from a
config file or a log line.

Every failure is a `StorageError` whose message names the URL and what to do (create the bucket,
run the stage that writes the object, fix the credentials, reach the endpoint).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import urllib.parse
from pathlib import Path
from typing import Any, BinaryIO

from contract.fileio import write_atomic

__all__ = ["StorageError", "is_remote", "scheme", "join", "parent", "open_read", "read_bytes", "read_json",
           "exists", "list_dir", "list_tree", "write_bytes", "write_json", "upload_file", "copy_tree", "delete",
           "delete_tree"]


class StorageError(Exception):
    """A read or write of a local path or remote URL failed; the message names the URL and what to do."""


def scheme(url: str) -> str:
    """The URL's scheme ('s3', 'gs', ...); '' for a local path (also for `file://`)."""
    s = urllib.parse.urlparse(str(url)).scheme
    return "" if s in ("", "file") or len(s) == 1 else s  # len 1: a Windows drive letter


def is_remote(url: str | Path | None) -> bool:
    """True for an object-storage URL (`s3://`, `gs://`, ...), False for a local path or `file://`."""
    return bool(url) and scheme(str(url)) != ""


def _local(url: str | Path) -> Path:
    u = str(url)
    return Path(urllib.parse.urlparse(u).path if u.startswith("file://") else u)


def join(url: str | Path, *parts: str) -> str:
    """`url` with `parts` appended ('/' for remote URLs, the OS separator for local paths)."""
    if is_remote(url):
        return posixpath.join(str(url).rstrip("/"), *(p.strip("/") for p in parts))
    return str(Path(url, *parts))


def parent(url: str | Path) -> str:
    """The directory holding `url` (`s3://b/x/train` -> `s3://b/x`)."""
    if is_remote(url):
        u = urllib.parse.urlparse(str(url).rstrip("/"))
        return urllib.parse.urlunparse(u._replace(path=posixpath.dirname(u.path)))
    return str(_local(url).parent)


# ---------------------------------------------------------------------------------------------- S3


_CLIENTS: dict[tuple, Any] = {}
_LOCK = threading.Lock()


def _s3_client() -> Any:
    """A boto3 S3 client for this process and environment (endpoint from S3_ENDPOINT_URL)."""
    try:
        import boto3  # noqa: PLC0415 - optional dependency (the `s3` extra)
        from botocore.config import Config  # noqa: PLC0415
    except ImportError as e:
        raise StorageError("s3:// URLs need boto3: pip install 'transfusion-pretrain[s3]' "
                           "(or pip install boto3)") from e

    key = (os.getpid(), os.environ.get("S3_ENDPOINT_URL"), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_PROFILE"))
    with _LOCK:
        if key not in _CLIENTS:
            _CLIENTS[key] = boto3.session.Session().client(
                "s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                config=Config(retries={"mode": "standard", "max_attempts": 3}))
        return _CLIENTS[key]


def _bucket_key(url: str) -> tuple[str, str]:
    u = urllib.parse.urlparse(url)
    return u.netloc, u.path.lstrip("/")


def _endpoint() -> str:
    return os.environ.get("S3_ENDPOINT_URL") or "AWS's default endpoint"


def s3_error(e: BaseException, url: str, doing: str) -> StorageError:
    """A StorageError for a boto3/botocore failure on `url`, naming the URL and what to do."""
    if isinstance(e, StorageError):
        return StorageError(f"{url}: {e}")
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError  # noqa: PLC0415

    bucket = _bucket_key(url)[0]
    if isinstance(e, NoCredentialsError):
        return StorageError(f"{url}: no credentials to {doing} it; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE) in the environment")
    if isinstance(e, EndpointConnectionError):
        return StorageError(f"{url}: cannot reach the object store at {_endpoint()} to {doing} it; check "
                            "S3_ENDPOINT_URL and the network")
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return StorageError(f"{url}: bucket '{bucket}' does not exist at {_endpoint()}; create it "
                                f"(aws s3 mb s3://{bucket}) or fix the bucket name in the URL")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{url}: no such object at {_endpoint()}; check the URL, or run the stage that "
                                "writes it (data_pipeline.precompute / data_pipeline.pack)")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AccessDenied",
                    "403", "InvalidClientTokenId", "AuthorizationHeaderMalformed"):
            return StorageError(f"{url}: access denied to {doing} it ({code}) at {_endpoint()}; check the credentials "
                                "in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (or AWS_PROFILE) "
                                "and that they may read/write this bucket")
        return StorageError(f"{url}: cannot {doing} it ({code}: {e})")
    return StorageError(f"{url}: cannot {doing} it ({type(e).__name__}: {e})")


def _s3_missing_bucket_or_key(url: str) -> StorageError:
    """After a 404 on HEAD (no error code in the body): tell a missing bucket from a missing object."""
    from botocore.exceptions import ClientError  # noqa: PLC0415

    bucket = _bucket_key(url)[0]
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return s3_error(ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"), url, "read")
        return s3_error(e, url, "read")
    return s3_error(ClientError({"Error": {"Code": "NoSuchKey"}}, "HeadObject"), url, "read")


class _BodyReader(io.RawIOBase):
    """A readable raw stream over botocore's StreamingBody (so io.BufferedReader can wrap it)."""

    def __init__(self, body: Any, url: str, length: int | None):
        self.body, self.url, self.length, self.pos = body, url, length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self.body.read(len(b))
        except Exception as e:  # noqa: BLE001 - a broken connection mid-object
            raise StorageError(f"{self.url}: read failed after {self.pos} bytes ({type(e).__name__}: {e}); "
                               "retry, or check the endpoint") from e
        n = len(data)
        b[:n] = data
        self.pos += n
        if n == 0 and self.length is not None and self.pos < self.length:
            raise StorageError(f"{self.url}: stream ended after {self.pos} of {self.length} bytes; retry")
        return n

    def close(self) -> None:
        try:
            self.body.close()
        finally:
            super().close()


# ----------------------------------------------------------------------------- other remote schemes


def _download_other(url: str, local: str) -> None:
    """Download `url` (a non-S3 scheme) to `local` with streaming's CloudDownloader."""
    from streaming.base.storage import CloudDownloader  # noqa: PLC0415

    try:
        CloudDownloader.get(url).download(url, local)
    except FileNotFoundError as e:
        raise StorageError(f"{url}: no such object; check the URL, or run the stage that writes it") from e
    except Exception as e:  # noqa: BLE001 - every backend raises its own types
        raise StorageError(f"{url}: cannot read it ({type(e).__name__}: {e}); check the URL and the credentials "
                           "in the environment for this scheme") from e


def _uploader(remote_dir: str, local_dir: str) -> Any:
    from streaming.base.storage import CloudUploader  # noqa: PLC0415

    return CloudUploader.get((local_dir, remote_dir), exist_ok=True, keep_local=False)


# ---------------------------------------------------------------------------------------- the API


def open_read(url: str | Path) -> BinaryIO:
    """A binary file object reading `url` from its start (a local file, or a streamed remote object).

    S3 objects are streamed (boto3 `get_object`, read as it is consumed); other remote schemes are
    fetched with streaming's downloader into an anonymous temporary file first. Raises StorageError
    (missing bucket/object, wrong credentials, unreachable endpoint), naming the URL and what to do.
    """
    u = str(url)
    if not is_remote(u):
        try:
            return open(_local(u), "rb")
        except OSError as e:
            raise StorageError(f"{u}: cannot open it ({e.strerror}); check the path") from e
    if scheme(u) == "s3":
        bucket, key = _bucket_key(u)
        try:
            obj = _s3_client().get_object(Bucket=bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - translated
            raise s3_error(e, u, "read") from e
        raw = _BodyReader(obj["Body"], u, obj.get("ContentLength"))
        return io.BufferedReader(raw, buffer_size=1 << 20)  # type: ignore[return-value]
    fd, tmp = tempfile.mkstemp(prefix="storage-")
    os.close(fd)
    try:
        _download_other(u, tmp)
        f = open(tmp, "rb")
    finally:
        os.unlink(tmp)  # the open file keeps its data until closed
    return f


def read_bytes(url: str | Path) -> bytes:
    """The whole content of `url` (local or remote); StorageError when it cannot be read."""
    with open_read(url) as f:
        return f.read()


def read_json(url: str | Path) -> Any:
    """The JSON document at `url`; StorageError when missing/unreadable, ValueError naming the URL when not JSON."""
    data = read_bytes(url)
    try:
        return json.loads(data)
    except ValueError as e:
        raise ValueError(f"{url}: not valid JSON ({e}); rewrite it with the stage that writes it") from e


def exists(url: str | Path) -> bool:
    """Whether the file or object `url` exists. A missing bucket or wrong credentials raise StorageError
    (they are not 'absent': a resume check must not redo or skip work on a misconfigured store)."""
    u = str(url)
    if not is_remote(u):
        return _local(u).exists()
    if scheme(u) == "s3":
        client = _s3_client()  # StorageError naming the extra to install when boto3 is missing
        from botocore.exceptions import ClientError  # noqa: PLC0415

        bucket, key = _bucket_key(u)
        try:
            client.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                err = _s3_missing_bucket_or_key(u)
                if "does not exist" in str(err):
                    raise err from e
                return False
            raise s3_error(e, u, "read") from e
        except Exception as e:  # noqa: BLE001
            raise s3_error(e, u, "read") from e
    try:
        with open_read(u):
            return True
    except StorageError as e:
        if "no such object" in str(e):
            return False
        raise


def list_dir(url: str | Path) -> list[str]:
    """Names (not paths) of the files and subdirectories directly under `url`, sorted; [] when none."""
    u = str(url)
    if not is_remote(u):
        p = _local(u)
        return sorted(q.name for q in p.iterdir()) if p.is_dir() else []
    if scheme(u) == "s3":
        bucket, prefix = _bucket_key(u.rstrip("/") + "/")
        names: set[str] = set()
        try:
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                              Delimiter="/"):
                names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
                names.update(c["Prefix"][len(prefix):].rstrip("/") for c in page.get("CommonPrefixes", []))
        except Exception as e:  # noqa: BLE001
            raise s3_error(e, u, "list") from e
        return sorted(n for n in names if n)
    with tempfile.TemporaryDirectory() as tmp:
        keys = _uploader(u, tmp).list_objects() or []
    base = urllib.parse.urlparse(u).path.strip("/")
    rel = [k[len(base):].lstrip("/") if k.startswith(base) else k for k in keys]
    return sorted({r.split("/", 1)[0] for r in rel if r})


def list_tree(url: str | Path) -> list[str]:
    """Every file under `url` as a '/'-separated path relative to it, sorted; [] when there is none.

    Local: a recursive walk; s3: `list_objects_v2` without a delimiter; other schemes: streaming's
    CloudUploader.list_objects. Raises StorageError (missing bucket, credentials) naming the URL.
    """
    u = str(url)
    if not is_remote(u):
        p = _local(u)
        return sorted(q.relative_to(p).as_posix() for q in p.rglob("*") if q.is_file()) if p.is_dir() else []
    if scheme(u) == "s3":
        bucket, prefix = _bucket_key(u.rstrip("/") + "/")
        keys: list[str] = []
        try:
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
        except Exception as e:  # noqa: BLE001
            raise s3_error(e, u, "list") from e
        return sorted(k for k in keys if k)
    with tempfile.TemporaryDirectory() as tmp:
        keys = _uploader(u, tmp).list_objects() or []
    base = urllib.parse.urlparse(u).path.strip("/") + "/"
    return sorted(k[len(base):] for k in keys if k.startswith(base) and len(k) > len(base))


def copy_tree(src: str | Path, dst: str | Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy every file under `src` to the same relative path under `dst` (each a local directory or a remote
    prefix), except the relative paths in `skip`; returns the relative paths copied. Existing files are
    replaced, other files under `dst` are left. Raises StorageError naming the URL that failed."""
    rel = [r for r in list_tree(src) if r not in skip]
    for r in rel:
        if is_remote(dst) and not is_remote(src):
            upload_file(Path(_local(src), *r.split("/")), join(dst, *r.split("/")))
        else:
            write_bytes(join(dst, *r.split("/")), read_bytes(join(src, *r.split("/"))))
    return rel


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write `data` to `url` (replacing it). Local writes are atomic (a temporary file then rename);
    an object store's PUT is atomic by itself. Raises StorageError naming the URL and what to do."""
    u = str(url)
    if not is_remote(u):
        p = _local(u)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, data)
        return
    if scheme(u) == "s3":
        bucket, key = _bucket_key(u)
        try:
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as e:  # noqa: BLE001
            raise s3_error(e, u, "write") from e
        return
    with tempfile.TemporaryDirectory() as tmp:
        name = posixpath.basename(u)
        Path(tmp, name).write_bytes(data)
        upload_file(Path(tmp, name), u)


def write_json(url: str | Path, obj: Any) -> None:
    """`obj` as indented JSON (with a final newline) at `url`; see write_bytes."""
    write_bytes(url, (json.dumps(obj, indent=2) + "\n").encode())


def upload_file(local: str | Path, url: str) -> None:
    """Copy the local file `local` to `url` (a remote object or a local path)."""
    if not is_remote(url):
        write_bytes(url, Path(local).read_bytes())
        return
    if scheme(url) == "s3":
        bucket, key = _bucket_key(url)
        try:
            _s3_client().upload_file(str(local), bucket, key)
        except Exception as e:  # noqa: BLE001
            raise s3_error(e, url, "write") from e
        return
    name = posixpath.basename(url)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, name)
        shutil.copyfile(local, src)  # the uploader sends a file of the object's name from a directory
        try:
            _uploader(parent(url), tmp).upload_file(name)
        except Exception as e:  # noqa: BLE001 - every backend raises its own types
            raise StorageError(f"{url}: cannot write it ({type(e).__name__}: {e}); check the URL and the credentials "
                               "in the environment for this scheme") from e


def delete_tree(url: str | Path) -> int:
    """Remove every file under `url` (a local directory or an s3:// prefix); returns how many were removed."""
    u = str(url)
    if not is_remote(u):
        p = _local(u)
        n = len(list_tree(u))
        if p.is_dir():
            shutil.rmtree(p)
        return n
    rel = list_tree(u)
    for r in rel:
        delete(join(u, *r.split("/")))
    return len(rel)


def delete(url: str | Path) -> None:
    """Remove the file or object `url` if present (S3 and local; other schemes: StorageError)."""
    u = str(url)
    if not is_remote(u):
        _local(u).unlink(missing_ok=True)
        return
    if scheme(u) != "s3":
        raise StorageError(f"{u}: deleting is only supported on s3:// and local paths; "
                           "remove it with the store's tools")
    bucket, key = _bucket_key(u)
    try:
        _s3_client().delete_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001
        raise s3_error(e, u, "delete") from e
