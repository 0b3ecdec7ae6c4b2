"""The local-folder artifact store and the factory that picks a store by name."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcd.config import Settings
from modelcd.errors import ArtifactStoreError, ConfigError, Conflict, InvalidInput, NotFound
from modelcd.registry import archive
from modelcd.registry.archive import tree_digest
from modelcd.registry.artifacts import LocalArtifactStore, get_artifact_store, validate_key
from modelcd.registry.s3 import S3ArtifactStore


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def test_put_get_round_trip(store: LocalArtifactStore, model_tree: Path, tmp_path: Path) -> None:
    uri = store.put_tree("iris/abc123", model_tree)
    assert uri == (tmp_path / "artifacts" / "iris" / "abc123").resolve().as_uri()
    assert uri.startswith("file:///")
    assert store.exists(uri)
    dest = tmp_path / "out"
    store.get_tree(uri, dest)
    assert tree_digest(dest) == tree_digest(model_tree)
    assert (dest / "empty-dir").is_dir()
    assert os.access(dest / "sub" / "run.sh", os.X_OK)


def test_get_into_an_existing_empty_folder(store: LocalArtifactStore, model_tree: Path, tmp_path: Path) -> None:
    uri = store.put_tree("m/1", model_tree)
    dest = tmp_path / "out"
    dest.mkdir()
    store.get_tree(uri, dest)
    assert (dest / "model.pkl").is_file()


def test_put_is_idempotent_for_the_same_content(store: LocalArtifactStore, model_tree: Path, tmp_path: Path,
                                                listing: Callable[[Path], list[str]]) -> None:
    uri = store.put_tree("iris/abc", model_tree)
    before = listing(tmp_path / "artifacts")
    copy = tmp_path / "copy"
    archive.safe_extract(io.BytesIO(archive.pack_tree(model_tree)), copy, 10**7)  # same files, new mtimes
    assert store.put_tree("iris/abc", copy) == uri
    assert listing(tmp_path / "artifacts") == before  # no temporary leftovers


def test_put_with_other_content_under_the_same_key_conflicts(store: LocalArtifactStore, model_tree: Path,
                                                             tmp_path: Path) -> None:
    uri = store.put_tree("iris/abc", model_tree)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.pkl").write_bytes(b"different")
    with pytest.raises(Conflict, match="already holds other files.*use a key that contains the digest"):
        store.put_tree("iris/abc", other)
    assert store.exists(uri)


def test_put_refuses_links_and_leaves_nothing(store: LocalArtifactStore, model_tree: Path, tmp_path: Path,
                                              listing: Callable[[Path], list[str]]) -> None:
    (model_tree / "sub" / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="symbolic link"):
        store.put_tree("iris/abc", model_tree)
    assert [p for p in listing(tmp_path / "artifacts") if "abc" in p] == []
    assert not store.exists(store.uri_for("iris/abc"))


def test_put_refuses_a_file_or_missing_folder(store: LocalArtifactStore, model_tree: Path) -> None:
    with pytest.raises(InvalidInput, match="is not a folder; pass the folder") as e:
        store.put_tree("iris/abc", model_tree / "model.pkl")
    assert e.value.field == "path"
    with pytest.raises(InvalidInput, match="is not a folder"):
        store.put_tree("iris/abc", model_tree / "missing")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", ".hidden/x", "a/.tmp", "a b", "a/" * 9 + "z",
                                 "x" * 129, "iris/abc\n"])
def test_invalid_keys(store: LocalArtifactStore, model_tree: Path, key: str) -> None:
    with pytest.raises(InvalidInput) as e:
        store.put_tree(key, model_tree)
    assert e.value.field == "key"
    assert "e.g. 'iris/" in e.value.message


def test_valid_keys() -> None:
    for key in ["iris/" + "f" * 64, "a", "team.a/model_1/v-2"]:
        assert validate_key(key) == key


def test_missing_tree_is_not_found(store: LocalArtifactStore, tmp_path: Path) -> None:
    uri = store.uri_for("iris/nothing")
    assert not store.exists(uri)
    with pytest.raises(NotFound, match="not found: it was deleted or never stored; register the version again"):
        store.get_tree(uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_delete_is_idempotent_and_prunes_empty_folders(store: LocalArtifactStore, model_tree: Path,
                                                       tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    keep = store.put_tree("other/1", model_tree)
    uri = store.put_tree("iris/abc", model_tree)
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)
    assert not (tmp_path / "artifacts" / "iris").exists()
    assert store.exists(keep)
    assert all(p.startswith("other") for p in listing(tmp_path / "artifacts"))
    with pytest.raises(NotFound):
        store.get_tree(uri, tmp_path / "out")


def test_foreign_uris_are_refused(store: LocalArtifactStore, tmp_path: Path) -> None:
    for uri in ["s3://bucket/modelcd/iris/abc", (tmp_path / "elsewhere" / "iris").as_uri(),
                store.uri_for("iris/abc") + "/../../../etc", "file://remote-host" + str(store.root / "iris/abc")]:
        with pytest.raises(ArtifactStoreError, match="is not in the local artifact store.*MODELCD_HOME"):
            store.exists(uri)
        with pytest.raises(ArtifactStoreError):
            store.delete(uri)


def test_get_into_a_non_empty_folder_is_refused(store: LocalArtifactStore, model_tree: Path,
                                                tmp_path: Path) -> None:
    uri = store.put_tree("iris/abc", model_tree)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("x")
    with pytest.raises(ArtifactStoreError, match="not an empty folder"):
        store.get_tree(uri, dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_interrupted_put_is_invisible(store: LocalArtifactStore, model_tree: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from modelcd.registry import artifacts

    calls = []
    real_copyfile = artifacts.shutil.copyfile

    def failing_copyfile(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_copyfile(src, dst)

    monkeypatch.setattr(artifacts.shutil, "copyfile", failing_copyfile)
    with pytest.raises(ArtifactStoreError, match="No space left on device; check free space and permissions"):
        store.put_tree("iris/abc", model_tree)
    assert not store.exists(store.uri_for("iris/abc"))
    assert [p.name for p in (tmp_path / "artifacts" / "iris").iterdir()] == []  # temp folder removed
    monkeypatch.undo()
    assert store.exists(store.put_tree("iris/abc", model_tree))


# --------------------------------------------------------------------------- factory


def test_factory_local_is_under_home(tmp_path: Path) -> None:
    store = get_artifact_store(Settings(home=tmp_path / "home"))
    assert isinstance(store, LocalArtifactStore)
    assert store.root == (tmp_path / "home" / "artifacts").resolve()


def test_factory_s3(tmp_path: Path, aws_env: None) -> None:
    store = get_artifact_store(Settings(home=tmp_path, artifact_store="s3", s3_bucket="models", s3_prefix="cd/",
                                        s3_endpoint_url="http://127.0.0.1:9"))
    assert isinstance(store, S3ArtifactStore)
    assert store.uri_for("iris/abc") == "s3://models/cd/iris/abc"


def test_factory_s3_without_bucket_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MODELCD_S3_BUCKET is not set; set it") as e:
        get_artifact_store(Settings(home=tmp_path, artifact_store="s3"))
    assert e.value.field == "s3_bucket"


def test_factory_unknown_name_lists_known_ones(tmp_path: Path) -> None:
    settings = Settings.model_construct(home=tmp_path, artifact_store="gcs")
    with pytest.raises(ConfigError, match="unknown artifact store 'gcs'; known: local, s3") as e:
        get_artifact_store(settings)
    assert e.value.field == "artifact_store"
