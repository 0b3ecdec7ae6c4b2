"""Artifact store on S3 or an S3-compatible server (MinIO, moto) through boto3.

Layout: each file of a tree is one object ``{prefix}/{key}/{relpath}``; a manifest object
``{prefix}/{key}/.modelcd-manifest.json`` (file list, sizes, sha256s and the tree digest) is
written LAST and deleted FIRST, so a tree whose upload was interrupted is never seen as
complete. Keys must not be prefixes of one another (the registry's ``name/digest`` keys are
not)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import S3TransferFailedError, S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from modelcd.errors import ArtifactStoreError, ConfigError, Conflict, InvalidInput, ModelcdError, NotFound
from modelcd.fsutil import atomic_dir
from modelcd.registry.archive import digest_of, file_sha256, iter_tree, prepare_dest, safe_relpath
from modelcd.registry.artifacts import ArtifactStore, check_source_folder, validate_key

MANIFEST = ".modelcd-manifest.json"
MANIFEST_FORMAT = 1
SINGLE_PUT_MAX = 8 * 1024 * 1024  # above this, files go up as multipart uploads
PAGE_SIZE = 1000  # objects per list/delete request (S3's maximum)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                 "ExpiredToken", "InvalidClientTokenId"}


def redact_url(url: str | None) -> str:
    """``url`` without any user:password part, for messages."""
    if not url:
        return "the default AWS endpoint"
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class S3ArtifactStore(ArtifactStore):
    """Trees as objects in ``bucket`` under ``prefix``; URIs ``s3://bucket/prefix/key``.

    Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
    profiles, instance roles); they never appear in errors. ``client`` replaces the boto3
    client built from ``endpoint_url`` and ``region``."""

    name = "s3"

    def __init__(self, bucket: str | None, prefix: str = "modelcd", endpoint_url: str | None = None,
                 region: str = "us-east-1", *, client: Any = None) -> None:
        if not bucket:
            raise ConfigError("MODELCD_S3_BUCKET is not set; set it to the bucket that holds the model files "
                              "(or set MODELCD_ARTIFACT_STORE=local)", field="s3_bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            try:
                validate_key(self.prefix)
            except InvalidInput:
                raise ConfigError(f"MODELCD_S3_PREFIX: {prefix!r} is not a valid prefix; use '/'-separated "
                                  "segments of letters, digits, '.', '_' and '-', e.g. 'modelcd'",
                                  field="s3_prefix") from None
        self.endpoint = redact_url(endpoint_url)
        self.client = client or self._make_client(endpoint_url, region)

    def _make_client(self, endpoint_url: str | None, region: str) -> Any:
        """A boto3 S3 client; path-style addressing for custom endpoints (MinIO, moto)."""
        config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                        s3={"addressing_style": "path"} if endpoint_url else None)
        try:
            return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except (BotoCoreError, ValueError) as e:
            raise ConfigError(f"cannot set up the S3 client for {self.endpoint} ({type(e).__name__}); check "
                              "MODELCD_S3_ENDPOINT_URL, MODELCD_S3_REGION and the AWS_* settings (e.g. AWS_PROFILE)",
                              field="s3_endpoint_url") from e

    # ---------------------------------------------------------------- addressing

    def _base(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        """The URI of ``key`` in this store."""
        return f"s3://{self.bucket}/{self._base(validate_key(key))}"

    def base_of(self, uri: str) -> str:
        """The object prefix (``prefix/key``) of ``uri``; ArtifactStoreError if not in this store."""
        parts = urlsplit(uri)
        path = parts.path.lstrip("/")
        head = f"{self.prefix}/" if self.prefix else ""
        try:
            if parts.scheme != "s3" or parts.netloc != self.bucket or not path.startswith(head):
                raise ValueError(uri)
            validate_key(path[len(head):])
        except (ValueError, InvalidInput):
            raise ArtifactStoreError(f"artifact URI {uri!r} is not in s3://{self.bucket}/{self.prefix}; check "
                                     "MODELCD_S3_BUCKET and MODELCD_S3_PREFIX match where it was registered") from None
        return path

    # ---------------------------------------------------------------- errors

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Translate boto3/botocore failures into ArtifactStoreError without leaking secrets."""
        try:
            yield
        except ModelcdError:
            raise
        except (S3UploadFailedError, S3TransferFailedError) as e:
            inner = e.__cause__ or e.__context__
            if isinstance(inner, ClientError):
                raise self._client_error(action, inner) from e
            raise ArtifactStoreError(f"S3 {action} failed ({type(e).__name__}) at {self.endpoint}; check "
                                     "MODELCD_S3_ENDPOINT_URL, MODELCD_S3_BUCKET and the credentials") from e
        except ClientError as e:
            raise self._client_error(action, e) from e
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise ArtifactStoreError(f"S3 {action}: no usable credentials; give the service AWS_ACCESS_KEY_ID "
                                     "and AWS_SECRET_ACCESS_KEY (or an AWS profile or role)") from e
        except (EndpointConnectionError, ConnectTimeoutError) as e:
            raise ArtifactStoreError(f"S3 {action}: cannot reach {self.endpoint}; check MODELCD_S3_ENDPOINT_URL "
                                     "and that the server is up") from e
        except BotoCoreError as e:
            raise ArtifactStoreError(f"S3 {action} failed ({type(e).__name__}) at {self.endpoint}; check "
                                     "MODELCD_S3_ENDPOINT_URL and the credentials") from e
        except OSError as e:
            raise ArtifactStoreError(f"S3 {action}: local file error ({e.strerror}) on {e.filename}; check free "
                                     "space and permissions there") from e

    def _client_error(self, action: str, e: ClientError) -> ArtifactStoreError:
        code = str(e.response.get("Error", {}).get("Code", "?"))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        operation = getattr(e, "operation_name", "")
        if code == "NoSuchBucket" or (operation == "HeadBucket" and code in _MISSING_CODES):
            return ArtifactStoreError(f"S3 {action}: bucket {self.bucket!r} does not exist at {self.endpoint}; "
                                      "create it, or set MODELCD_S3_BUCKET to an existing bucket")
        if code in _DENIED_CODES:
            return ArtifactStoreError(f"S3 {action}: refused by {self.endpoint} ({code}, HTTP {status}); check the "
                                      "access key and secret the service uses (AWS_ACCESS_KEY_ID / "
                                      f"AWS_SECRET_ACCESS_KEY) and that they may use bucket {self.bucket!r}")
        return ArtifactStoreError(f"S3 {action} failed at {self.endpoint} ({code}, HTTP {status}); check "
                                  "MODELCD_S3_ENDPOINT_URL and MODELCD_S3_BUCKET")

    # ---------------------------------------------------------------- manifest

    def _read_manifest(self, base: str) -> dict[str, Any] | None:
        """The manifest of ``base``, or None when the tree is not (completely) stored."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}")["Body"].read()
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                return None
            raise
        try:
            return _checked_manifest(json.loads(body))
        except (ValueError, TypeError, KeyError) as e:
            raise ArtifactStoreError(f"s3://{self.bucket}/{base}/{MANIFEST} is damaged ({e}); delete the "
                                     "artifact and register the version again") from None

    # ---------------------------------------------------------------- interface

    def put_tree(self, key: str, src_dir: Path) -> str:
        uri = self.uri_for(key)
        base = self._base(key)
        check_source_folder(src_dir)
        manifest = build_manifest(src_dir)
        with self._errors(f"upload of {uri}"):
            stored = self._read_manifest(base)
            if stored is not None:
                if stored["digest"] != manifest["digest"]:
                    raise Conflict(f"artifact {uri} already holds other files (digest {stored['digest'][:12]}, "
                                   f"new {manifest['digest'][:12]}); stored trees are immutable: use a key that "
                                   "contains the digest")
                return uri
            for item in manifest["files"]:
                self._upload(src_dir / item["path"], f"{base}/{item['path']}", item["size"])
            self.client.put_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}", ContentType="application/json",
                                   Body=json.dumps(manifest, sort_keys=True).encode())
        return uri

    def _upload(self, path: Path, key: str, size: int) -> None:
        """One request for small files; boto3's managed (multipart, parallel) transfer for big ones."""
        if size > SINGLE_PUT_MAX:
            self.client.upload_file(str(path), self.bucket, key)
            return
        with path.open("rb") as f:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=f)

    def get_tree(self, uri: str, dest: Path) -> None:
        base = self.base_of(uri)
        with self._errors(f"download of {uri}"):
            manifest = self._read_manifest(base)
            if manifest is None:
                raise NotFound(f"artifact {uri} not found: it was deleted or never completely uploaded; register "
                               "the version again")
            prepare_dest(dest)
            with atomic_dir(dest) as tmp:
                for item in manifest["files"]:
                    self._download(uri, f"{base}/{item['path']}", tmp / item["path"], item)

    def _download(self, uri: str, key: str, target: Path, item: dict[str, Any]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, key, str(target))
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in _MISSING_CODES:
                raise ArtifactStoreError(f"artifact {uri} is damaged: {item['path']} is missing from the bucket; "
                                         "delete the artifact and register the version again") from e
            raise
        if target.stat().st_size != item["size"] or file_sha256(target) != item["sha256"]:
            raise ArtifactStoreError(f"artifact {uri} is damaged: {item['path']} does not match its manifest; "
                                     "delete the artifact and register the version again")
        if item.get("executable"):
            target.chmod(0o755)

    def delete(self, uri: str) -> None:
        base = self.base_of(uri)
        with self._errors(f"delete of {uri}"):
            self.client.delete_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}")  # invisible from here on
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=self.bucket, Prefix=f"{base}/", PaginationConfig={"PageSize": PAGE_SIZE})
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if objects:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def exists(self, uri: str) -> bool:
        base = self.base_of(uri)
        with self._errors(f"lookup of {uri}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}")
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) not in _MISSING_CODES:
                    raise
                self.client.head_bucket(Bucket=self.bucket)  # a HEAD 404 may mean the bucket is missing
                return False
        return True


def build_manifest(src_dir: Path) -> dict[str, Any]:
    """The manifest of the regular files under ``src_dir``: paths, sizes, sha256s, executable
    bits and the tree digest (as ``archive.tree_digest`` computes it)."""
    files: list[dict[str, Any]] = []
    for entry in iter_tree(src_dir):
        if entry.is_dir:
            continue
        if entry.rel == MANIFEST:
            raise InvalidInput(f"path: the model files contain {MANIFEST}, a name modelcd's S3 store reserves; "
                               "rename or remove that file", field="path")
        st = entry.path.stat()
        files.append({"path": entry.rel, "size": st.st_size, "sha256": file_sha256(entry.path),
                      "executable": bool(st.st_mode & 0o111)})
    return {"format": MANIFEST_FORMAT, "files": files, "size_bytes": sum(f["size"] for f in files),
            "digest": digest_of((f["path"], f["sha256"]) for f in files)}


def _checked_manifest(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a manifest whose paths are safe to write; ValueError otherwise, since
    whoever can write to the bucket could plant ``../`` paths."""
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), list):
        raise ValueError("not a modelcd manifest")
    seen: set[str] = set()
    for item in doc["files"]:
        path = item["path"]
        if not isinstance(path, str) or safe_relpath(path) != path or path in seen:
            raise ValueError(f"unsafe or repeated path {path!r}")
        if not isinstance(item["size"], int) or not _SHA_RE.fullmatch(str(item["sha256"])):
            raise ValueError(f"bad size or sha256 for {path!r}")
        seen.add(path)
    if not _SHA_RE.fullmatch(str(doc.get("digest"))):
        raise ValueError("bad digest")
    return doc
