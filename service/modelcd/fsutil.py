"""Writing folders and files so that readers see all of them or nothing, and removing what an
interrupted writer left behind.

Every temporary modelcd makes under its home has one form: a hidden name starting with
``TEMP_PREFIX``, beside what it becomes (a rename stays on one file system). Its maker holds a
shared ``flock`` on it for as long as it exists. So ``clean_temporaries`` tells a leftover of a
dead process (nobody holds its lock) from work in flight in a live one (its lock is held),
without pid files or clocks, across every process and container that shares the home; the
kernel drops the lock when its holder dies, even by ``kill -9``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".modelcd-tmp-"  # model names, artifact keys and digests never start with "."

# Where temporaries appear under the home, as (folder, depths below it whose entries are
# looked at): they sit beside what they become, so this follows the home's layout.
TEMP_PLACES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("tmp", (0,)),  # scratch folders of uploads (registry) and imports (inbox)
    ("envs", (0,)),  # builders/bundle.py: virtualenvs, and their requirements file while installing
    ("wheelhouse", (0,)),  # builders/wheelhouse.py
    ("bundles", (1, 2)),  # bundles/{model}/{version}-{digest12}/, and files rewritten inside one
    ("images", (0, 1, 2)),  # base images' interpreter cache; images/{model}/{version}-{digest12}/, likewise
    ("files", (0,)),  # registry: local copies of versions' files, by digest
    ("artifacts", (0, 1)),  # local artifact store: trees at {model}/{digest}, deletions in progress
)

# Names temporaries had before they took one form. They carry no lock, so they are removed only
# once untouched for LEGACY_AGE_S: no build, upload or import of an older modelcd runs that long.
_LEGACY = re.compile(r"\.tmp-.+|\..+\.(?:tmp|del)-[0-9a-f]{12}|\..+\.[0-9a-f]{8}")
_LEGACY_IN_TMP = re.compile(r"(?:register|import)-.+")
LEGACY_AGE_S = 24 * 3600.0
_LABEL_MAX = 40  # enough for a person to recognise; paths inside stay short


def temp_name(label: str) -> str:
    """A fresh name in the temporary form; ``label`` (what it becomes) helps a person reading."""
    return f"{TEMP_PREFIX}{secrets.token_hex(6)}-{label[:_LABEL_MAX]}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` has the form of a modelcd temporary (reserved: never a model's file)."""
    return name.startswith(TEMP_PREFIX)


# -- writing ------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_dir(parent: Path, label: str) -> Iterator[Path]:
    """Yield a new, empty, locked temporary folder in ``parent`` (created if missing) for work
    whose results go elsewhere; it is removed on leaving, whatever happened."""
    parent.mkdir(parents=True, exist_ok=True)
    path, fd = _create_locked(parent, label, directory=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # still locked: no cleaner races the removal
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty folder to fill; on success it is renamed to ``final``.

    ``final`` appears whole or not at all. The folder yielded is ``final``'s name inside a locked
    temporary beside ``final``, so the body may even replace it (say, by renaming a tree onto
    it). ``final`` may be missing or an empty folder, which is replaced. When it holds something
    by then (another writer finished first), FileExistsError is raised: the caller decides
    whether that twin will do. Whatever happens, nothing temporary is left behind.
    """
    with scratch_dir(final.parent, final.name) as scratch:
        tree = scratch / final.name
        tree.mkdir()
        yield tree
        _rename_into_place(tree, final)


@contextlib.contextmanager
def temp_file(parent: Path, label: str) -> Iterator[Path]:
    """Yield a new, empty, locked temporary file in ``parent``; it is removed on leaving."""
    path, fd = _create_locked(parent, label, directory=False)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Replace the file ``path`` with ``data``: readers see the old content or the new, never a part."""
    with temp_file(path.parent, path.name) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)


def discard(folder: Path) -> None:
    """Make ``folder`` vanish at once (renamed into the temporary form), then remove it.

    FileNotFoundError when it is already gone; an interrupted removal is a temporary that
    ``clean_temporaries`` finishes."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # the lock follows the folder through the rename
        trash = folder.parent / temp_name(folder.name)
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        os.close(fd)


def _create_locked(parent: Path, label: str, *, directory: bool) -> tuple[Path, int]:
    """Create a temporary in ``parent`` and take a shared lock on it; return it and the lock's fd.

    A cleaner may remove it between its creation and the lock: then make another."""
    while True:
        path = parent / temp_name(label)
        if directory:
            path.mkdir(mode=0o755)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if _is_same(path, fd):
            return path, fd
        os.close(fd)


def _is_same(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) still names the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _rename_into_place(tree: Path, final: Path) -> None:
    try:
        os.rename(tree, final)  # replaces an empty folder, refuses a non-empty one
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, "another writer finished it first", str(final)) from e
        raise


# -- cleaning -----------------------------------------------------------------------------


def clean_temporaries(home: Path) -> list[Path]:
    """Remove the temporaries that dead processes left under ``home``; return what was removed.

    Looks only where modelcd makes temporaries (TEMP_PLACES), never follows a link, and leaves
    alone every temporary whose maker still runs (its lock is held), so it is safe beside live
    builds, uploads and imports in other processes. Call it at start, before any work begins,
    since work this process started is in flight too."""
    removed: list[Path] = []
    now = time.time()
    for place, depths in TEMP_PLACES:
        for depth in depths:
            for folder in _folders_at(home / place, depth):
                removed += [p for p in _entries(folder) if _remove_if_abandoned(p, place, now)]
    return removed


def remove_abandoned(folder: Path) -> list[Path]:
    """Remove the temporaries directly in ``folder`` whose makers are gone; return them. Safe at
    any time: a temporary in flight is locked by its maker."""
    return [p for p in _entries(folder) if is_temporary(p.name) and _remove_if_abandoned(p, "", 0.0)]


def _folders_at(root: Path, depth: int) -> Iterator[Path]:
    """The real folders ``depth`` levels below ``root`` (itself at 0), through real folders only:
    no links (they may lead out of the home) and no hidden names (temporaries, stores' own)."""
    if not _is_real_dir(root):
        return
    if depth == 0:
        yield root
        return
    for entry in _entries(root):
        if not entry.name.startswith("."):
            yield from _folders_at(entry, depth - 1)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(Path(e.path) for e in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _remove_if_abandoned(path: Path, place: str, now: float) -> bool:
    """Remove ``path`` if it is a temporary nobody works on; True when it was removed."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return False  # links and the like: modelcd never makes them here, and never follows them
    if is_temporary(path.name):
        return _remove_unlocked(path, stat.S_ISDIR(st.st_mode))
    legacy = _LEGACY_IN_TMP if place == "tmp" else _LEGACY
    if legacy.fullmatch(path.name) and st.st_mtime < now - LEGACY_AGE_S:
        return _remove(path, stat.S_ISDIR(st.st_mode))
    return False


def _remove_unlocked(path: Path, is_dir: bool) -> bool:
    """Remove ``path`` unless a live process holds its lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if is_dir else 0))
    except OSError:
        return False  # gone meanwhile, or not ours to open
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in flight in a live process
        # Under the exclusive lock: a maker that created it but did not lock it yet waits,
        # then finds it gone and makes another.
        return _is_same(path, fd) and _remove(path, is_dir)
    finally:
        os.close(fd)


def _remove(path: Path, is_dir: bool) -> bool:
    """Remove the folder or file ``path``; True when it is gone. rmtree never follows links."""
    if is_dir:
        shutil.rmtree(path, ignore_errors=True)  # what it cannot remove waits for the next start
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    return not os.path.lexists(path)
