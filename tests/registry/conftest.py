"""Fixtures for the registry's building blocks: model file trees, hand-made tar.gz archives
(hostile ones included) and a real S3 API (moto's server mode on 127.0.0.1)."""

from __future__ import annotations

import gzip
import io
import tarfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from modelcd.registry.s3 import S3ArtifactStore

SECRET_KEY = "s3cr3t-KEY-that-must-never-be-shown"


@dataclass
class Member:
    """One entry of a hand-made archive: name, tar type, data, and a size to declare
    (defaults to len(data); a larger one makes a header that lies)."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    declared_size: int | None = None
    mode: int = 0o644


def make_targz(members: list[Member], *, compress: bool = True) -> bytes:
    """Raw tar(.gz) bytes with exactly these headers and data, nothing checked."""
    raw = io.BytesIO()
    for m in members:
        info = tarfile.TarInfo(m.name)
        info.type, info.linkname, info.mode = m.type, m.linkname, m.mode
        info.size = len(m.data) if m.declared_size is None else m.declared_size
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            info.size = 0 if m.declared_size is None else m.declared_size
        raw.write(info.tobuf(format=tarfile.GNU_FORMAT))
        if m.data:
            raw.write(m.data)
            raw.write(b"\0" * (-len(m.data) % tarfile.BLOCKSIZE))
    raw.write(b"\0" * tarfile.BLOCKSIZE * 2)
    return gzip.compress(raw.getvalue(), mtime=0) if compress else raw.getvalue()


@pytest.fixture
def model_tree(tmp_path: Path) -> Path:
    """A small model folder: a pickle, a nested file and an executable script."""
    root = tmp_path / "model"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "model.pkl").write_bytes(b"\x80\x04not-really-a-pickle")
    (root / "sub" / "deeper" / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (root / "sub" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "empty-dir").mkdir()
    return root


@pytest.fixture
def listing() -> Callable[[Path], list[str]]:
    """Every path under a folder (relative, sorted), hidden ones included."""

    def _listing(root: Path) -> list[str]:
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []

    return _listing


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A real S3 API: moto's server in a thread on a free loopback port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials, no AWS config files, no instance-metadata lookups, no proxies."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTING")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def s3_client(moto_endpoint: str, aws_env: None):  # type: ignore[no-untyped-def]
    """A plain boto3 client on the moto server, to look behind the store's back."""
    return boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")


@pytest.fixture
def bucket(s3_client) -> str:  # type: ignore[no-untyped-def]
    """A fresh, empty bucket per test."""
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_store(moto_endpoint: str, bucket: str) -> S3ArtifactStore:
    return S3ArtifactStore(bucket, "modelcd", moto_endpoint, "us-east-1")
