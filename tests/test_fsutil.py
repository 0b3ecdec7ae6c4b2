"""Folders and files written whole, and the temporaries of dead processes removed at start."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelcd import fsutil
from modelcd.fsutil import (
    TEMP_PREFIX,
    atomic_dir,
    clean_temporaries,
    discard,
    remove_abandoned,
    scratch_dir,
    temp_file,
    temp_name,
    write_atomic,
)

DAY_S = 24 * 3600


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) with a file's bytes, None for a folder."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


# -- atomic_dir ----------------------------------------------------------------------------


def test_atomic_dir_renames_the_finished_folder_into_place(tmp_path: Path) -> None:
    final = tmp_path / "bundles" / "iris" / "1-abc"
    with atomic_dir(final) as tmp:
        assert tmp.is_dir() and list(tmp.iterdir()) == [] and not final.exists()
        assert tmp.name == final.name and tmp.parent.name.startswith(TEMP_PREFIX)
        assert tmp.parent.parent == final.parent  # beside final: the rename stays on one file system
        (tmp / "model").mkdir()
        (tmp / "model" / "m.bin").write_bytes(b"weights")
    assert tree(final) == {"model": None, "model/m.bin": b"weights"}
    assert names(final.parent) == ["1-abc"]


def test_atomic_dir_leaves_nothing_when_the_body_fails(tmp_path: Path) -> None:
    final = tmp_path / "envs" / "key"
    with pytest.raises(RuntimeError, match="install failed"), atomic_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("install failed")
    assert names(tmp_path / "envs") == []


def test_atomic_dir_replaces_an_empty_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("new")
    assert tree(final) == {"f": b"new"}


def test_atomic_dir_refuses_to_replace_a_finished_twin(tmp_path: Path) -> None:
    final = tmp_path / "files" / "digest"
    final.mkdir(parents=True)
    (final / "theirs").write_text("first writer")
    with pytest.raises(FileExistsError), atomic_dir(final) as tmp:
        (tmp / "ours").write_text("second writer")
    assert tree(final) == {"theirs": b"first writer"}
    assert names(final.parent) == ["digest"]


def test_atomic_dir_body_may_replace_the_folder_it_was_given(tmp_path: Path) -> None:
    """As a store's get_tree does: it builds beside the folder and renames onto it."""
    final = tmp_path / "files" / "digest"
    with atomic_dir(final) as tmp, atomic_dir(tmp) as inner:
        (inner / "f").write_text("x")
    assert tree(final) == {"f": b"x"} and names(final.parent) == ["digest"]


# -- the other writers ----------------------------------------------------------------------


def test_scratch_dir_and_temp_file_are_removed_afterwards(tmp_path: Path) -> None:
    with scratch_dir(tmp_path / "tmp", "register") as work, temp_file(tmp_path, "requirements.txt") as reqs:
        assert work.name.startswith(TEMP_PREFIX) and work.name.endswith("-register")
        assert reqs.name.startswith(TEMP_PREFIX) and reqs.read_bytes() == b""
        (work / "files").mkdir()
        reqs.write_text("numpy\n")
    assert names(tmp_path / "tmp") == [] and names(tmp_path) == ["tmp"]


def test_write_atomic_replaces_the_content_whole(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text("old")
    write_atomic(path, '{"new": true}\n')
    write_atomic(tmp_path / "raw.bin", b"\x00\x01")
    assert path.read_text() == '{"new": true}\n' and (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"
    assert names(tmp_path) == ["bundle.json", "raw.bin"]


def test_discard_removes_a_folder_and_says_when_it_is_gone(tmp_path: Path) -> None:
    folder = tmp_path / "iris" / "abc"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "f").write_text("x")
    discard(folder)
    assert names(tmp_path / "iris") == []
    with pytest.raises(FileNotFoundError):
        discard(folder)


def test_a_temporary_taken_by_a_cleaner_before_it_is_locked_is_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cleaner may remove a temporary between its creation and its lock: its maker must not
    then write into a folder that is gone."""
    real_flock = fcntl.flock
    stolen: list[Path] = []

    def flock_after_a_cleaner(fd: int, op: int) -> None:
        if not stolen:
            victim = next(p for p in (tmp_path / "envs").iterdir() if p.name.startswith(TEMP_PREFIX))
            victim.rmdir()
            stolen.append(victim)
        real_flock(fd, op)

    monkeypatch.setattr(fsutil.fcntl, "flock", flock_after_a_cleaner)
    with atomic_dir(tmp_path / "envs" / "key") as tmp:
        assert tmp.parent != stolen[0] and tmp.is_dir()
        (tmp / "ok").write_text("x")
    assert tree(tmp_path / "envs") == {"key": None, "key/ok": b"x"}


# -- clean_temporaries ----------------------------------------------------------------------


def make_home(home: Path) -> dict[str, dict[str, bytes | None]]:
    """What a working home holds (every one of these must survive a clean); returns its trees."""
    bundle = home / "bundles" / "iris" / "1-abc123def456"
    (bundle / "model").mkdir(parents=True)
    (bundle / "model" / "model.joblib").write_bytes(b"model")
    (bundle / "bundle.json").write_text("{}")
    (home / "envs" / "f00d" / "bin").mkdir(parents=True)
    (home / "envs" / "f00d" / "modelcd-env.json").write_text("{}")
    (home / "artifacts" / "iris" / "abc123" / "sub").mkdir(parents=True)
    (home / "artifacts" / "iris" / "abc123" / "sub" / "w.bin").write_bytes(b"w")
    (home / "artifacts" / "register-model" / "d1").mkdir(parents=True)  # a model named like an old scratch
    (home / "files" / "abc123").mkdir(parents=True)
    (home / "files" / "abc123" / "model.pkl").write_bytes(b"p")
    (home / "images" / "iris" / "1-abc123def456").mkdir(parents=True)
    (home / "images" / ".python-0123456789abcdef01234567.json").write_text("{}")
    (home / "modelcd.db").write_bytes(b"db")
    return {name: tree(home / name) for name in ("bundles", "envs", "artifacts", "files", "images")}


def leftover(parent: Path, label: str, files: dict[str, bytes]) -> Path:
    """A temporary as a killed process leaves it: in the temporary form, nobody holding its lock."""
    path = parent / temp_name(label)
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)
    return path


def test_clean_temporaries_removes_leftovers_and_keeps_real_work(tmp_path: Path) -> None:
    home = tmp_path / "home"
    kept = make_home(home)
    spool = home / "tmp" / temp_name("register")
    (spool / ".modelcd-tmp-0a0b0c0d0e0f-files" / "files").mkdir(parents=True)
    (spool / ".modelcd-tmp-0a0b0c0d0e0f-files" / "files" / "big.bin").write_bytes(b"\0" * 1_000_000)
    leftovers = [
        spool,  # an upload, unpacked halfway
        leftover(home / "bundles" / "iris", "2-abc", {"2-abc/model/model.joblib": b"half"}),  # a bundle
        leftover(home / "envs", "f00d", {"f00d/lib/site.py": b"", "f00d/bin/python": b""}),  # an env
        leftover(home / "wheelhouse", "cafe", {"cafe/wheels/x.whl": b"w"}),
        leftover(home / "images" / "iris", "1-abc123def456", {"1-abc123def456/scoring.json": b"{}"}),
        leftover(home / "artifacts" / "iris", "def456", {"def456/m.bin": b"m"}),  # a store write
        leftover(home / "files", "def456", {"def456/m.bin": b"m"}),
    ]
    note = home / "bundles" / "iris" / "1-abc123def456" / temp_name("bundle.json")
    note.write_text("{")  # a file rewrite, cut short
    leftovers.append(note)
    removed = clean_temporaries(home)
    assert sorted(removed) == sorted(leftovers)
    assert not any(p.exists() for p in leftovers)
    assert {name: tree(home / name) for name in kept} == kept
    assert (home / "modelcd.db").read_bytes() == b"db" and names(home / "tmp") == []
    assert clean_temporaries(home) == []  # nothing left: idempotent


def test_clean_temporaries_leaves_work_in_flight_alone(tmp_path: Path) -> None:
    """Another process's build is locked; so is one in this process (flock locks per open)."""
    home = tmp_path / "home"
    final = home / "bundles" / "iris" / "3-abc"
    with atomic_dir(final) as tmp, scratch_dir(home / "tmp", "register") as upload:
        (tmp / "model").mkdir()
        (upload / "files").mkdir()
        (home / "envs").mkdir()
        with temp_file(home / "envs", "requirements.txt"):
            assert clean_temporaries(home) == []
            assert remove_abandoned(home / "envs") == []
        assert tmp.is_dir() and (upload / "files").is_dir()
    assert final.is_dir() and names(final.parent) == ["3-abc"]


LIVE_WRITER = """
import sys, time
from pathlib import Path
from modelcd.fsutil import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part.bin").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_clean_temporaries_after_a_writer_is_killed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    final = home / "bundles" / "iris" / "4-abc"
    writer = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None
        tmp = Path(writer.stdout.readline().strip())
        assert (tmp / "part.bin").is_file()
        assert clean_temporaries(home) == []  # alive: in flight
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
        assert writer.stdout is not None
        writer.stdout.close()
    assert clean_temporaries(home) == [tmp.parent]
    assert names(final.parent) == []


def test_clean_temporaries_never_follows_links_out_of_the_home(tmp_path: Path) -> None:
    home, outside = tmp_path / "home", tmp_path / "outside"
    precious = leftover(outside, "x", {"x/data": b"keep me"})
    (home / "bundles").mkdir(parents=True)
    (home / "bundles" / "iris").symlink_to(outside, target_is_directory=True)  # a model folder that is a link
    (home / "envs").symlink_to(outside, target_is_directory=True)  # a place that is a link
    (home / "tmp").mkdir()
    (home / "tmp" / temp_name("register")).symlink_to(precious, target_is_directory=True)  # a temp-named link
    assert clean_temporaries(home) == []
    assert tree(precious) == {"x": None, "x/data": b"keep me"}


def test_clean_temporaries_removes_old_forms_only_once_a_day_old(tmp_path: Path) -> None:
    """Temporaries named before the one form carry no lock: a day untouched proves them dead."""
    home = tmp_path / "home"
    make_home(home)
    old = [
        home / "tmp" / "register-k2j3h4",
        home / "envs" / ".tmp-0123456789ab-1a2b3c4d",
        home / "artifacts" / "iris" / ".abc.tmp-0123456789ab",
        home / "artifacts" / "iris" / ".abc.del-0123456789ab",
        home / "files" / ".tmp-x1y2z3w4",
        home / "bundles" / "iris" / "1-abc123def456" / ".bundle.json.1a2b3c4d",
    ]
    fresh = [home / "tmp" / "import-q9w8e7", home / "bundles" / "iris" / ".tmp-2-abc-0a0b0c0d"]
    for path in [*old, *fresh]:
        if path.name.startswith(".bundle.json"):
            path.write_text("{")
        else:
            (path / "f").mkdir(parents=True)
    for path in old:
        age(path, DAY_S + 60)
    assert sorted(clean_temporaries(home)) == sorted(old)
    assert all(p.exists() for p in fresh)
    assert (home / "artifacts" / "register-model" / "d1").is_dir()  # only home/tmp has register-* scratch
