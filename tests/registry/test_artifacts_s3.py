"""The S3 artifact store against a real S3 API: moto's server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.errors import ArtifactStoreError, ConfigError, Conflict, InvalidInput, NotFound
from modelcd.registry import s3
from modelcd.registry.archive import tree_digest
from modelcd.registry.s3 import MANIFEST, S3ArtifactStore, build_manifest, redact_url

from .conftest import SECRET_KEY


def keys(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_put_get_round_trip(s3_store: S3ArtifactStore, s3_client: Any, bucket: str, model_tree: Path,
                            tmp_path: Path) -> None:
    uri = s3_store.put_tree("iris/abc", model_tree)
    assert uri == f"s3://{bucket}/modelcd/iris/abc"
    assert keys(s3_client, bucket) == [f"modelcd/iris/abc/{MANIFEST}", "modelcd/iris/abc/model.pkl",
                                       "modelcd/iris/abc/sub/deeper/weights.bin", "modelcd/iris/abc/sub/run.sh"]
    assert s3_store.exists(uri)
    dest = tmp_path / "out"
    s3_store.get_tree(uri, dest)
    assert tree_digest(dest) == tree_digest(model_tree)
    assert os.access(dest / "sub" / "run.sh", os.X_OK)
    assert (dest / "model.pkl").read_bytes() == (model_tree / "model.pkl").read_bytes()


def test_manifest_records_files_and_digest(s3_store: S3ArtifactStore, s3_client: Any, bucket: str,
                                           model_tree: Path) -> None:
    s3_store.put_tree("iris/abc", model_tree)
    body = s3_client.get_object(Bucket=bucket, Key=f"modelcd/iris/abc/{MANIFEST}")["Body"].read()
    manifest = json.loads(body)
    assert manifest["digest"] == tree_digest(model_tree)
    assert [f["path"] for f in manifest["files"]] == ["model.pkl", "sub/deeper/weights.bin", "sub/run.sh"]
    assert manifest["size_bytes"] == sum(f["size"] for f in manifest["files"])


def test_put_is_idempotent_and_conflicts_on_other_content(s3_store: S3ArtifactStore, model_tree: Path,
                                                          tmp_path: Path) -> None:
    uri = s3_store.put_tree("iris/abc", model_tree)
    assert s3_store.put_tree("iris/abc", model_tree) == uri
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pkl").write_bytes(b"different")
    with pytest.raises(Conflict, match="already holds other files.*use a key that contains the digest"):
        s3_store.put_tree("iris/abc", other)


def test_without_prefix(moto_endpoint: str, bucket: str, s3_client: Any, model_tree: Path, tmp_path: Path) -> None:
    store = S3ArtifactStore(bucket, "", moto_endpoint)
    uri = store.put_tree("iris/abc", model_tree)
    assert uri == f"s3://{bucket}/iris/abc"
    store.get_tree(uri, tmp_path / "out")
    assert f"iris/abc/{MANIFEST}" in keys(s3_client, bucket)


def test_interrupted_upload_is_never_seen_as_complete(s3_store: S3ArtifactStore, s3_client: Any, bucket: str,
                                                      model_tree: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    uploads: list[str] = []
    real_put = s3_store.client.put_object

    def dying_put(**kwargs: Any) -> Any:
        uploads.append(kwargs["Key"])
        if len(uploads) == 2:
            raise ConnectionResetError(104, "Connection reset by peer")  # the process dies mid-upload
        return real_put(**kwargs)

    monkeypatch.setattr(s3_store.client, "put_object", dying_put)
    with pytest.raises(ArtifactStoreError):
        s3_store.put_tree("iris/abc", model_tree)
    uri = s3_store.uri_for("iris/abc")
    assert keys(s3_client, bucket) == ["modelcd/iris/abc/model.pkl"]  # some files are there...
    assert not s3_store.exists(uri)  # ...but no manifest, so no tree
    with pytest.raises(NotFound, match="never completely uploaded; register the version again"):
        s3_store.get_tree(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert s3_store.put_tree("iris/abc", model_tree) == uri  # a retry completes it
    assert s3_store.exists(uri)


def test_files_without_manifest_are_invisible(s3_store: S3ArtifactStore, s3_client: Any, bucket: str,
                                              tmp_path: Path) -> None:
    s3_client.put_object(Bucket=bucket, Key="modelcd/iris/half/model.pkl", Body=b"p")
    uri = s3_store.uri_for("iris/half")
    assert not s3_store.exists(uri)
    with pytest.raises(NotFound):
        s3_store.get_tree(uri, tmp_path / "out")


def test_missing_tree_is_not_found(s3_store: S3ArtifactStore, tmp_path: Path) -> None:
    uri = s3_store.uri_for("iris/never")
    assert not s3_store.exists(uri)
    with pytest.raises(NotFound, match=f"artifact {uri} not found"):
        s3_store.get_tree(uri, tmp_path / "out")


def test_delete_removes_everything_and_is_idempotent(s3_store: S3ArtifactStore, s3_client: Any, bucket: str,
                                                     model_tree: Path, tmp_path: Path) -> None:
    keep = s3_store.put_tree("iris/keep", model_tree)
    uri = s3_store.put_tree("iris/abc", model_tree)
    s3_store.delete(uri)
    assert not s3_store.exists(uri)
    assert all(k.startswith("modelcd/iris/keep/") for k in keys(s3_client, bucket))
    s3_store.delete(uri)
    s3_store.delete(s3_store.uri_for("iris/never-existed"))
    assert s3_store.exists(keep)
    with pytest.raises(NotFound):
        s3_store.get_tree(uri, tmp_path / "out")


def test_delete_of_several_pages(s3_store: S3ArtifactStore, s3_client: Any, bucket: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PAGE_SIZE", 2)
    src = tmp_path / "many"
    src.mkdir()
    for i in range(7):
        (src / f"f{i}.txt").write_text(str(i))
    uri = s3_store.put_tree("big/1", src)
    s3_store.delete(uri)
    assert keys(s3_client, bucket) == []


def test_big_files_go_up_as_multipart(s3_store: S3ArtifactStore, bucket: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "SINGLE_PUT_MAX", 1000)
    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(9 * 1024 * 1024))  # over boto3's 8 MiB multipart threshold
    (src / "small.txt").write_text("x")
    uri = s3_store.put_tree("big/2", src)
    s3_store.get_tree(uri, tmp_path / "out")
    assert tree_digest(tmp_path / "out") == tree_digest(src)


def test_damaged_file_is_detected(s3_store: S3ArtifactStore, s3_client: Any, bucket: str, model_tree: Path,
                                  tmp_path: Path) -> None:
    uri = s3_store.put_tree("iris/abc", model_tree)
    s3_client.put_object(Bucket=bucket, Key="modelcd/iris/abc/model.pkl", Body=b"tampered")
    with pytest.raises(ArtifactStoreError, match="damaged: model.pkl does not match its manifest"):
        s3_store.get_tree(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    s3_client.put_object(Bucket=bucket, Key="modelcd/iris/abc/model.pkl", Body=(model_tree / "model.pkl").read_bytes())
    s3_client.delete_object(Bucket=bucket, Key="modelcd/iris/abc/sub/run.sh")
    with pytest.raises(ArtifactStoreError, match="sub/run.sh is missing from the bucket"):
        s3_store.get_tree(uri, tmp_path / "out")


@pytest.mark.parametrize("path", ["../../escape.txt", "/etc/passwd", "a/./b", "a\\..\\b"])
def test_planted_manifest_paths_are_refused(s3_store: S3ArtifactStore, s3_client: Any, bucket: str,
                                            tmp_path: Path, path: str) -> None:
    manifest = {"format": 1, "digest": "0" * 64, "size_bytes": 1,
                "files": [{"path": path, "size": 1, "sha256": "0" * 64, "executable": False}]}
    s3_client.put_object(Bucket=bucket, Key=f"modelcd/evil/1/{MANIFEST}", Body=json.dumps(manifest).encode())
    with pytest.raises(ArtifactStoreError, match=r"is damaged \(.*\); delete the artifact"):
        s3_store.get_tree(s3_store.uri_for("evil/1"), tmp_path / "work" / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "work" / "out").exists()


def test_tree_holding_the_manifest_name_is_refused(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(InvalidInput, match="a name modelcd's S3 store reserves; rename or remove"):
        build_manifest(tmp_path)


def test_foreign_uris_are_refused(s3_store: S3ArtifactStore, bucket: str) -> None:
    for uri in ["s3://other-bucket/modelcd/iris/abc", f"s3://{bucket}/elsewhere/iris/abc",
                f"s3://{bucket}/modelcd/../iris", "file:///tmp/iris/abc", f"s3://{bucket}/modelcd/"]:
        with pytest.raises(ArtifactStoreError, match="MODELCD_S3_BUCKET and MODELCD_S3_PREFIX"):
            s3_store.exists(uri)


def test_missing_bucket_setting_names_the_variable() -> None:
    for bucket in (None, ""):
        with pytest.raises(ConfigError, match="MODELCD_S3_BUCKET is not set") as e:
            S3ArtifactStore(bucket, "modelcd", "http://127.0.0.1:9")
        assert e.value.field == "s3_bucket"


def test_bad_prefix_names_the_variable(aws_env: None) -> None:
    with pytest.raises(ConfigError, match="MODELCD_S3_PREFIX: 'a b' is not a valid prefix"):
        S3ArtifactStore("models", "a b", "http://127.0.0.1:9")


def test_bucket_that_does_not_exist(moto_endpoint: str, aws_env: None, model_tree: Path, tmp_path: Path) -> None:
    store = S3ArtifactStore("no-such-bucket-here", "modelcd", moto_endpoint)
    uri = store.uri_for("iris/abc")
    for action in (lambda: store.get_tree(uri, tmp_path / "out"), lambda: store.exists(uri),
                   lambda: store.delete(uri)):
        with pytest.raises(ArtifactStoreError, match="create it, or set MODELCD_S3_BUCKET to an existing bucket"):
            action()


def test_put_to_a_bucket_that_does_not_exist(moto_endpoint: str, aws_env: None, model_tree: Path) -> None:
    store = S3ArtifactStore("no-such-bucket-here", "modelcd", moto_endpoint)
    with pytest.raises(ArtifactStoreError, match="bucket 'no-such-bucket-here' does not exist at http://127.0.0.1:"
                                                 r"\d+; create it, or set MODELCD_S3_BUCKET"):
        store.put_tree("iris/abc", model_tree)


def test_unreachable_endpoint(aws_env: None, model_tree: Path) -> None:
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = S3ArtifactStore("models", "modelcd", f"http://user:pw-in-url@127.0.0.1:{port}")
    with pytest.raises(ArtifactStoreError) as e:
        store.put_tree("iris/abc", model_tree)
    assert f"cannot reach http://127.0.0.1:{port}; check MODELCD_S3_ENDPOINT_URL" in e.value.message
    assert "pw-in-url" not in e.value.message


def test_no_credentials(moto_endpoint: str, aws_env: None, monkeypatch: pytest.MonkeyPatch,
                        model_tree: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3ArtifactStore("models", "modelcd", moto_endpoint)
    with pytest.raises(ArtifactStoreError, match="no usable credentials; give the service AWS_ACCESS_KEY_ID"):
        store.put_tree("iris/abc", model_tree)


def test_refused_credentials_never_show_the_secret(moto_endpoint: str, bucket: str, model_tree: Path,
                                                   tmp_path: Path) -> None:
    store = S3ArtifactStore(bucket, "modelcd", moto_endpoint)
    # switch on moto's request authentication: our dummy access key is unknown to it
    reply = requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
    reply.raise_for_status()
    previous = reply.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"].encode()
    try:
        errors = []
        for action in (lambda: store.put_tree("iris/abc", model_tree),
                       lambda: store.exists(store.uri_for("iris/abc")),
                       lambda: store.get_tree(store.uri_for("iris/abc"), tmp_path / "out"),
                       lambda: store.delete(store.uri_for("iris/abc"))):
            with pytest.raises(ArtifactStoreError) as e:
                action()
            errors.append(e.value)
    finally:
        requests.post(f"{moto_endpoint}/moto-api/reset-auth", data=previous, timeout=10).raise_for_status()
    for error in errors:
        assert "refused by http://127.0.0.1:" in error.message
        assert "InvalidAccessKeyId" in error.message or "(403, HTTP 403)" in error.message  # HEAD has no body
        assert "AWS_SECRET_ACCESS_KEY" in error.message
        text = "".join(traceback.format_exception(error))  # the whole chain, as a log would show it
        assert SECRET_KEY not in text


def test_unknown_aws_profile_is_a_config_error(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(ConfigError, match="check MODELCD_S3_ENDPOINT_URL, MODELCD_S3_REGION and the AWS_"):
        S3ArtifactStore("models", "modelcd", "http://127.0.0.1:9")


def test_redact_url() -> None:
    assert redact_url("https://user:secret@minio.local:9000/x?token=abc") == "https://minio.local:9000/x"
    assert redact_url(None) == "the default AWS endpoint"
