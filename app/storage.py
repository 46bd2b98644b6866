"""Where uploads and artifacts live, behind one small interface: a local folder or S3-compatible storage."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from .settings import Settings

CHUNK = 1 << 20
log = logging.getLogger("kdistill.storage")


class InputCorrupted(Exception):
    """A stored teacher or dataset whose bytes are not the ones uploaded (their sha256 differs)."""

    code = "input_corrupted"


class ArtifactStore(Protocol):
    """Keys are relative paths such as `jobs/<id>/student.onnx`; objects never change once written."""

    def put_file(self, key: str, source: Path) -> None: ...
    def fetch(self, key: str, dest: Path) -> None: ...
    def local_path(self, key: str, refresh: bool = False) -> Path: ...
    def open_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> None: ...


class LocalStore:
    """Files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"storage key {key!r} escapes the store")
        return path

    def put_file(self, key: str, source: Path) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)  # same disk: no copy
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, dest)

    def fetch(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), dest)

    def local_path(self, key: str, refresh: bool = False) -> Path:
        return self._path(key)  # the store's own file: there is no other copy to fetch again

    def open_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes `start` to `end` (exclusive; None: to the end) of `key`, in chunks."""
        with self._path(key).open("rb") as f:
            f.seek(start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                chunk = f.read(CHUNK if left is None else min(CHUNK, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)


class S3Store:
    """An S3 bucket (AWS, MinIO, ...) shared by the API and every worker; `local_path` downloads into a
    per-machine cache, which is safe because objects are never rewritten under the same key."""

    def __init__(self, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        self.client: Any = boto3.client(
            "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id, aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, signature_version="s3v4"))
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self.cache = settings.cache_dir.resolve()

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist yet (a fresh MinIO, say)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    def _key(self, key: str) -> str:
        if ".." in Path(key).parts or key.startswith("/"):
            raise ValueError(f"storage key {key!r} escapes the store")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._key(key))

    def fetch(self, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        self.client.download_file(self.bucket, self._key(key), str(tmp))
        os.replace(tmp, dest)

    def local_path(self, key: str, refresh: bool = False) -> Path:
        """The object in this machine's cache, downloaded when absent or when `refresh` (the new copy
        replaces the old in one rename: a reader of the old file keeps reading it)."""
        dest = (self.cache / self._key(key)).resolve()
        if not dest.is_relative_to(self.cache):
            raise ValueError(f"storage key {key!r} escapes the cache")
        if refresh or not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
            os.close(fd)
            try:
                self.client.download_file(self.bucket, self._key(key), tmp)
                os.replace(tmp, dest)
            finally:
                Path(tmp).unlink(missing_ok=True)
        return dest

    def open_chunks(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """As LocalStore.open_chunks: a part of the object is asked for with an HTTP Range."""
        extra: dict[str, str] = {}
        if end is not None and end <= start:
            return
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete_prefix(self, prefix: str) -> None:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix).rstrip("/") + "/"):
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects})


_stores: dict[str, ArtifactStore] = {}


def get_store(settings: Settings) -> ArtifactStore:
    """The store `settings` names (one client per process and configuration)."""
    ident = settings.model_dump_json(include={"artifact_store", "data_dir", "s3_bucket", "s3_prefix",
                                              "s3_endpoint_url", "s3_region", "s3_access_key_id"})
    if ident not in _stores:
        _stores[ident] = S3Store(settings) if settings.artifact_store == "s3" else LocalStore(settings.store_dir)
    return _stores[ident]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verified_local_path(store: ArtifactStore, key: str, sha256: str, what: str) -> Path:
    """A local copy of `key` whose sha256 is `sha256` (recorded when it was uploaded): a cached copy that
    differs (a cut-short download, a bad disk, someone's edit) is fetched again, once; raises InputCorrupted
    when even that differs. `what` names the object in the message, e.g. "teacher tch_…"."""
    path = store.local_path(key)
    found = sha256_of(path)
    if found == sha256:
        return path
    log.warning("%s: the copy at %s has sha256 %s, not %s as uploaded; fetching it again", what, path, found, sha256)
    path = store.local_path(key, refresh=True)
    found = sha256_of(path)
    if found == sha256:
        return path
    if isinstance(store, S3Store):
        path.unlink(missing_ok=True)  # never leave a bad copy in the cache
    raise InputCorrupted(f"the stored file of {what} is not the file that was uploaded (sha256 {found[:12]}… "
                         f"instead of {sha256[:12]}…, also after fetching it again); upload it again")
