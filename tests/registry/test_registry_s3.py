"""The registry transaction on the S3 artifact store (moto's real server on 127.0.0.1):
files go to the bucket, a node without the local copy fetches them back and checks the digest."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.registry.archive import pack_tree, tree_digest
from modelcd.registry.s3 import S3ArtifactStore
from modelcd.registry.service import parse_metadata
from tests.conftest import free_port, iris_model


def test_register_on_s3_and_materialize_elsewhere(tmp_path: Path, moto_endpoint: str, bucket: str,
                                                  s3_client, aws_env: None) -> None:  # type: ignore[no-untyped-def]
    settings = load_settings(environ={
        "MODELCD_HOME": str(tmp_path / "home"), "MODELCD_ARTIFACT_STORE": "s3", "MODELCD_S3_BUCKET": bucket,
        "MODELCD_S3_ENDPOINT_URL": moto_endpoint, "MODELCD_ROUTER_PORT": str(free_port())})
    ctx = build_context(settings)
    assert isinstance(ctx.registry.store, S3ArtifactStore)
    meta = iris_model(tmp_path / "m")

    version = ctx.registry.register("iris", io.BytesIO(pack_tree(tmp_path / "m")), parse_metadata(meta))
    assert version.artifact_uri.startswith(f"s3://{bucket}/")
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("model.joblib") for k in keys) and any(k.endswith("requirements.txt") for k in keys)

    # another node: no local copy of the files, so they come back from S3, digest checked
    shutil.rmtree(ctx.registry.files_dir(version.digest))
    files = ctx.registry.materialize(version)
    assert tree_digest(files) == version.digest
    assert (files / "model.joblib").read_bytes() == (tmp_path / "m" / "model.joblib").read_bytes()

    # a tampered object is refused, not deployed
    shutil.rmtree(files)
    key = next(k for k in keys if k.endswith("requirements.txt"))
    s3_client.put_object(Bucket=bucket, Key=key, Body=b"evil==1.0\n")
    with pytest.raises(Exception, match="(?i)digest|sha256|size|match"):
        ctx.registry.materialize(version)
    assert not ctx.registry.files_dir(version.digest).exists()
    ctx.db.dispose()
