"""Model files travel as a gzip-compressed tar. This module makes such archives
deterministically, unpacks untrusted ones without letting them escape their folder or fill
the disk, and computes the digest that names a file tree.

Hostile archives are expected: a registry upload or a webhook may carry ``../`` paths,
absolute paths, links, devices, duplicate names or a gzip bomb. ``safe_extract`` refuses
all of them and leaves nothing behind."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import secrets
import stat
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from modelcd.errors import ArtifactStoreError, InvalidInput, PayloadTooLarge
from modelcd.fsutil import TEMP_PREFIX, atomic_dir, is_temporary

CHUNK = 1024 * 1024
MAX_MEMBERS = 100_000  # more entries than any model needs; bounds work on a flood of empty members
MAX_HEADER_BYTES = 1024 * 1024  # pax / GNU long-name headers are read whole into memory: bound them
SIZE_SETTING = "MODELCD_MAX_ARTIFACT_BYTES"
_FIX_ARCHIVE = "make it with `tar czf model.tar.gz -C <folder> .` from regular files and folders only"
_RESERVED = f"uses the name form modelcd reserves for its temporary files ({TEMP_PREFIX}...)"


@dataclass(frozen=True)
class ExtractResult:
    """What ``safe_extract`` wrote: the regular files (sorted relative posix paths) and
    their total size in bytes."""

    files: list[str]
    size_bytes: int


@dataclass(frozen=True)
class TreeEntry:
    """One entry of a file tree: its relative posix path, its absolute path, and whether it
    is a folder (otherwise a regular file)."""

    rel: str
    path: Path
    is_dir: bool


def safe_relpath(name: str) -> str | None:
    """Normalise an archive or manifest member name to a relative posix path.

    Returns None for the root itself (``.``, ``./``); raises ValueError (with the reason)
    for absolute paths, ``..`` segments, backslashes, NUL characters and names in the form
    modelcd reserves for its temporaries."""
    if "\x00" in name:
        raise ValueError("contains a NUL character")
    if "\\" in name:
        raise ValueError("contains a backslash")
    if name.startswith("/"):
        raise ValueError("is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError("contains a '..' segment")
    if any(is_temporary(p) for p in parts):
        raise ValueError(_RESERVED)
    return "/".join(parts) or None


def iter_tree(src: Path) -> Iterator[TreeEntry]:
    """Yield the entries under folder ``src`` in sorted relative-path order, never following
    links. Raises InvalidInput for anything but regular files and folders."""
    stack = [(src, "")]
    entries: list[TreeEntry] = []
    while stack:
        folder, prefix = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = f"{prefix}{entry.name}"
                if is_temporary(entry.name):
                    raise InvalidInput(f"path: {rel} in {src} {_RESERVED}; rename it", field="path")
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    entries.append(TreeEntry(rel, Path(entry.path), True))
                    stack.append((Path(entry.path), rel + "/"))
                elif stat.S_ISREG(mode):
                    entries.append(TreeEntry(rel, Path(entry.path), False))
                else:
                    kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file or folder"
                    raise InvalidInput(f"path: {rel} in {src} is {kind}; model files must be regular files "
                                       "and folders: replace it with a copy of what it points to, or remove it",
                                       field="path")
    yield from sorted(entries, key=lambda e: e.rel)


def _tree_of(src: Path) -> list[TreeEntry]:
    """The entries of a file (one entry at the root) or a folder; InvalidInput if missing."""
    try:
        mode = src.lstat().st_mode
    except FileNotFoundError:
        raise InvalidInput(f"path: {src} does not exist; pass a model file or folder", field="path") from None
    if stat.S_ISREG(mode):
        return [TreeEntry(src.name, src, False)]
    if stat.S_ISDIR(mode):
        return list(iter_tree(src))
    raise InvalidInput(f"path: {src} is not a regular file or folder; pass a model file or folder",
                       field="path")


def file_sha256(path: Path) -> str:
    """sha256 hex of one file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tarinfo(entry: TreeEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        st = entry.path.stat()
        info.type, info.size = tarfile.REGTYPE, st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    return info


def write_tree_archive(src: Path, out: Path | IO[bytes]) -> None:
    """Write a deterministic tar.gz of file or folder ``src`` to ``out`` (a path or a binary
    file object). A single file becomes one member at the root; a folder's contents become
    the members (without the folder's own name). Members are sorted, with mtime 0, uid/gid 0
    and modes 0644/0755, so the same tree always gives the same bytes."""
    entries = _tree_of(src)
    if isinstance(out, Path):
        with out.open("wb") as f:
            write_tree_archive(src, f)
        return
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = _tarinfo(entry)
            if entry.is_dir:
                tar.addfile(info)
            else:
                with entry.path.open("rb") as f:
                    tar.addfile(info, f)


def pack_tree(src: Path) -> bytes:
    """Return a deterministic tar.gz of file or folder ``src`` (see ``write_tree_archive``)."""
    buf = io.BytesIO()
    write_tree_archive(src, buf)
    return buf.getvalue()


def tree_digest(root: Path) -> str:
    """sha256 hex over the sorted (relative posix path, file sha256) pairs of the regular
    files under ``root`` (or of the single file ``root``, named by its file name). Folders,
    modes and mtimes do not count, so the digest is the same on every machine and equals the
    digest of the tree that ``safe_extract(pack_tree(root))`` produces."""
    return digest_of(sorted((e.rel, file_sha256(e.path)) for e in _tree_of(root) if not e.is_dir))


def digest_of(pairs: Iterable[tuple[str, str]]) -> str:
    """The tree digest of (relative posix path, file sha256) pairs given in sorted order."""
    h = hashlib.sha256()
    for rel, sha in pairs:
        h.update(f"{rel}\x00{sha}\n".encode())
    return h.hexdigest()


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo that refuses oversized pax and GNU long-name headers before tarfile reads them
    into memory (a few bytes of gzip can declare gigabytes of header)."""

    def _check_header_size(self) -> None:
        if self.size > MAX_HEADER_BYTES:
            raise InvalidInput(f"archive: an extended header declares {self.size} bytes (at most {MAX_HEADER_BYTES}); "
                               f"{_FIX_ARCHIVE}", field="archive")

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header_size()
        info: tarfile.TarInfo = super()._proc_gnulong(tar)  # type: ignore[misc]
        return info

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        self._check_header_size()
        info: tarfile.TarInfo = super()._proc_pax(tar)  # type: ignore[misc]
        return info


def _reject(name: str, why: str) -> InvalidInput:
    return InvalidInput(f"archive: member {name!r} {why}; {_FIX_ARCHIVE}", field="archive")


def _too_large(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"archive: the files unpack to more than {max_bytes} bytes; make the model smaller "
                           f"or raise {SIZE_SETTING}", field="archive")


def _check_member(member: tarfile.TarInfo, seen: set[str], files: set[str], dirs: set[str]) -> str | None:
    """The member's normalised path, or None for the root folder; raises InvalidInput."""
    try:
        rel = safe_relpath(member.name)
    except ValueError as e:
        raise _reject(member.name, str(e)) from None
    if not (member.isreg() or member.isdir()):
        kind = ("is a symbolic link" if member.issym() else "is a hard link" if member.islnk()
                else "is a device" if member.ischr() or member.isblk() else "is a fifo" if member.isfifo()
                else "is not a regular file or folder")
        raise _reject(member.name, kind)
    if rel is None:
        if member.isreg():
            raise _reject(member.name, "is a file without a name")
        return None
    if rel in seen or (member.isreg() and rel in dirs):
        raise _reject(member.name, "appears twice")
    parents = rel.split("/")[:-1]
    for i in range(1, len(parents) + 1):
        parent = "/".join(parents[:i])
        if parent in files:
            raise _reject(member.name, "lies under a path that is a file")
        dirs.add(parent)
    seen.add(rel)
    return rel


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, used: int, max_bytes: int) -> int:
    """Copy a regular member's data to ``target``, stopping once ``used`` plus what it wrote
    passes ``max_bytes``; return its size."""
    src = tar.extractfile(member)
    assert src is not None  # regular members always have data
    mode = 0o755 if member.mode & 0o111 else 0o644
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if used + written > max_bytes:
                raise _too_large(max_bytes)
            out.write(chunk)
    return written


def _extract_into(fileobj: IO[bytes], tmp: Path, max_bytes: int) -> ExtractResult:
    seen: set[str] = set()
    files: set[str] = set()
    dirs: set[str] = set()  # folders, including those only implied by deeper paths
    total = 0
    with tarfile.open(fileobj=fileobj, mode="r|gz", tarinfo=_BoundedTarInfo) as tar:
        for count, member in enumerate(tar, start=1):
            if count > MAX_MEMBERS:
                raise InvalidInput(f"archive: more than {MAX_MEMBERS} entries; pack fewer files "
                                   "(e.g. combine them into one model file)", field="archive")
            rel = _check_member(member, seen, files, dirs)
            if rel is None:
                continue
            if member.isdir():
                (tmp / rel).mkdir(parents=True, exist_ok=True)
                continue
            if total + member.size > max_bytes:  # refuse on the declared size, before inflating
                raise _too_large(max_bytes)
            total += _write_member(tar, member, tmp / rel, total, max_bytes)
            files.add(rel)
    if not files:
        raise InvalidInput(f"archive: contains no regular files; {_FIX_ARCHIVE}", field="archive")
    return ExtractResult(files=sorted(files), size_bytes=total)


def prepare_dest(dest: Path) -> None:
    """Check ``dest`` is absent or an empty folder, and create its parent."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise ArtifactStoreError(f"cannot extract into {dest}: it exists and is not an empty folder; "
                                 "pass a new folder")
    dest.parent.mkdir(parents=True, exist_ok=True)


def temp_sibling(dest: Path) -> Path:
    """A fresh, empty hidden folder next to ``dest``, on the same file system, so that a
    finished tree can be renamed into place atomically.

    Unlocked, hence in the old name form that ``fsutil.clean_temporaries`` only removes once a
    day old: kept for sources/mlflow_server.py until it uses ``fsutil.atomic_dir``."""
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    return tmp


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished folder ``tmp`` to ``dest`` (which may be an empty folder); the
    other half of ``temp_sibling``."""
    if dest.is_dir():
        dest.rmdir()  # only succeeds when empty; rename cannot replace a non-empty folder
    os.rename(tmp, dest)


def safe_extract(archive: Path | IO[bytes], dest: Path, max_bytes: int) -> ExtractResult:
    """Unpack the tar.gz ``archive`` (a path or a binary file object) into ``dest``.

    ``dest`` must not exist or be an empty folder. Members with absolute paths, ``..``
    segments, links, devices or fifos, duplicate names, more than ``max_bytes`` in total
    (counted while streaming; PayloadTooLarge naming MODELCD_MAX_ARTIFACT_BYTES), a stream
    that is not a gzip tar, or no regular file at all are refused with InvalidInput. The
    files are written to a temporary folder next to ``dest`` and renamed at the end, so on
    any failure nothing is left in ``dest``."""
    prepare_dest(dest)
    try:
        with atomic_dir(dest) as tmp:
            return _extract_from(archive, tmp, max_bytes)
    except OSError as e:  # the body turns its own into ModelcdErrors: this is the temporary or the rename
        raise ArtifactStoreError(f"cannot write the model files beside {dest}: {e.strerror}; check permissions "
                                 "and free space there") from e


def _extract_from(archive: Path | IO[bytes], tmp: Path, max_bytes: int) -> ExtractResult:
    if not isinstance(archive, Path):
        return _extract_stream(archive, tmp, max_bytes)
    try:
        f: IO[bytes] = archive.open("rb")
    except OSError as e:
        raise InvalidInput(f"archive: cannot read {archive}: {e.strerror}; pass a tar.gz file",
                           field="archive") from e
    with f:
        return _extract_stream(f, tmp, max_bytes)


def _extract_stream(fileobj: IO[bytes], tmp: Path, max_bytes: int) -> ExtractResult:
    """Extract, turning decoding failures into InvalidInput and disk failures into ArtifactStoreError."""
    try:
        return _extract_into(fileobj, tmp, max_bytes)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InvalidInput(f"archive: not a valid gzip-compressed tar ({e}); {_FIX_ARCHIVE}",
                           field="archive") from e
    except OSError as e:
        raise ArtifactStoreError(f"cannot write the model files under {tmp.parent}: {e.strerror}; "
                                 "check free space and permissions there") from e
