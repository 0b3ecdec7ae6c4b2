"""Where model files live once registered: one ``ArtifactStore`` interface, a real local-folder
implementation (the embedded default) and a factory that picks a store by name from the
settings (``local`` or ``s3``)."""

from __future__ import annotations

import os
import re
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelcd.config import Settings
from modelcd.errors import ArtifactStoreError, Conflict, InvalidInput, NotFound
from modelcd.fsutil import atomic_dir, discard
from modelcd.ports import Ports
from modelcd.registry.archive import iter_tree, prepare_dest, tree_digest

KEY_SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
KEY_MAX = 512


def validate_key(key: str) -> str:
    """Return ``key`` if it is 1-8 '/'-separated segments of ``[A-Za-z0-9][A-Za-z0-9._-]*``
    (so it is safe as a path and an object key, and never collides with the stores'
    hidden temporary names); InvalidInput otherwise."""
    segments = key.split("/") if isinstance(key, str) else []
    if not (0 < len(key) <= KEY_MAX and 0 < len(segments) <= 8 and all(map(KEY_SEGMENT_RE.fullmatch, segments))):
        raise InvalidInput(f"key: {key!r} is not a valid artifact key; use '/'-separated segments of letters, "
                           "digits, '.', '_' and '-' that start with a letter or digit, e.g. 'iris/3f2a...'",
                           field="key")
    return key


def check_source_folder(src_dir: Path) -> None:
    """InvalidInput unless ``src_dir`` is an existing folder (not a link)."""
    if src_dir.is_symlink() or not src_dir.is_dir():
        raise InvalidInput(f"path: {src_dir} is not a folder; pass the folder holding the model files", field="path")


class ArtifactStore(ABC):
    """Immutable file trees addressed by a key, stored somewhere durable.

    A tree is either complete or invisible: a crash halfway through ``put_tree`` never leaves
    something that ``exists`` or ``get_tree`` accept. All methods block until done. Failures
    of the storage itself (disk, network, credentials) raise ArtifactStoreError whose message
    names the setting to check and never contains a secret."""

    name: str = ""  # the name settings.artifact_store uses for this store

    @abstractmethod
    def put_tree(self, key: str, src_dir: Path) -> str:
        """Store the regular files under ``src_dir`` (a folder) under ``key`` and return the
        artifact URI. Idempotent: the same key with the same content (by tree digest) returns
        the same URI without copying again; the same key with different content raises
        Conflict (keys should contain the digest). Links or other special files raise
        InvalidInput; an invalid key raises InvalidInput."""

    @abstractmethod
    def get_tree(self, uri: str, dest: Path) -> None:
        """Materialise the files of ``uri`` into ``dest``, which must not exist or be an empty
        folder; the files appear all at once (written beside ``dest``, then renamed). Raises
        NotFound when no complete tree is stored at ``uri``, ArtifactStoreError when ``uri``
        belongs to another store or the stored files are damaged."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove the tree at ``uri``. Idempotent: deleting a missing tree does nothing. Once
        it starts, ``exists(uri)`` is False even if it is interrupted."""

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """True when a complete tree is stored at ``uri``."""


class LocalArtifactStore(ArtifactStore):
    """Trees as folders under ``root`` (``root/key``), URIs ``file:///abs/root/key``. Writes go
    to a hidden temporary folder beside the target and are renamed into place (``fsutil``)."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def uri_for(self, key: str) -> str:
        """The URI of ``key`` in this store."""
        return (self.root / validate_key(key)).as_uri()

    def path_of(self, uri: str) -> Path:
        """The folder of ``uri``; ArtifactStoreError if ``uri`` is not in this store."""
        parts = urlsplit(uri)
        path = Path(unquote(parts.path))
        try:
            key = path.relative_to(self.root).as_posix()
            if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
                raise ValueError(uri)
            validate_key(key)
        except (ValueError, InvalidInput):
            raise ArtifactStoreError(f"artifact URI {uri!r} is not in the local artifact store at {self.root}; "
                                     "check MODELCD_HOME and MODELCD_ARTIFACT_STORE match where it was "
                                     "registered") from None
        return path

    def put_tree(self, key: str, src_dir: Path) -> str:
        uri = self.uri_for(key)
        target = self.root / key
        check_source_folder(src_dir)
        digest = tree_digest(src_dir)
        if target.is_dir():
            return self._same_or_conflict(uri, target, digest)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._error("create", target, e) from e
        try:
            with atomic_dir(target) as tmp:
                copy_tree(src_dir, tmp)
        except FileExistsError:  # another writer finished first
            return self._same_or_conflict(uri, target, digest)
        except OSError as e:
            raise self._error("write", target, e) from e
        return uri

    def _same_or_conflict(self, uri: str, target: Path, digest: str) -> str:
        stored = tree_digest(target)
        if stored != digest:
            raise Conflict(f"artifact {uri} already holds other files (digest {stored[:12]}, new {digest[:12]}); "
                           "stored trees are immutable: use a key that contains the digest")
        return uri

    def get_tree(self, uri: str, dest: Path) -> None:
        path = self.path_of(uri)
        if not path.is_dir():
            raise NotFound(f"artifact {uri} not found: it was deleted or never stored; register the version again")
        prepare_dest(dest)
        try:
            with atomic_dir(dest) as tmp:
                copy_tree(path, tmp)
        except OSError as e:
            raise self._error("copy", dest, e) from e

    def delete(self, uri: str) -> None:
        path = self.path_of(uri)
        if not path.is_dir():
            return
        try:
            discard(path)  # invisible at once; the slow removal comes after
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._error("delete", path, e) from e
        self._prune(path.parent)

    def _prune(self, folder: Path) -> None:
        """Remove now-empty parent folders of a deleted tree, up to the root."""
        while folder != self.root and self.root in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    def exists(self, uri: str) -> bool:
        return self.path_of(uri).is_dir()

    def _error(self, action: str, path: Path, e: OSError) -> ArtifactStoreError:
        return ArtifactStoreError(f"local artifact store: cannot {action} {path}: {e.strerror}; check free space "
                                  f"and permissions under {self.root} (MODELCD_HOME)")


def copy_tree(src: Path, dest: Path) -> None:
    """Copy the folders and regular files under ``src`` into the existing folder ``dest``,
    keeping the executable bit; links and special files raise InvalidInput."""
    for entry in iter_tree(src):
        target = dest / entry.rel
        if entry.is_dir:
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(entry.path, target)
            os.chmod(target, 0o755 if entry.path.stat().st_mode & 0o111 else 0o644)


def _local(settings: Settings) -> ArtifactStore:
    return LocalArtifactStore(settings.home / "artifacts")


def _s3(settings: Settings) -> ArtifactStore:
    from modelcd.registry.s3 import S3ArtifactStore  # boto3 is only loaded when S3 is used

    return S3ArtifactStore(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)


# name -> factory of an ArtifactStore from the settings
ARTIFACT_STORES: Ports[[Settings], ArtifactStore] = Ports(
    {"local": _local, "s3": _s3},
    unknown="MODELCD_ARTIFACT_STORE: unknown artifact store {name!r}; known: {known}", field="artifact_store")


def get_artifact_store(settings: Settings) -> ArtifactStore:
    """The artifact store ``settings.artifact_store`` names; ConfigError listing the known
    names for an unknown one."""
    return ARTIFACT_STORES.create(str(settings.artifact_store), settings)
