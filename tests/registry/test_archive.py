"""Archives: deterministic packing, hostile tar.gz files refused without leftovers, and the
tree digest."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from modelcd.errors import ArtifactStoreError, InvalidInput, PayloadTooLarge
from modelcd.registry.archive import pack_tree, safe_extract, tree_digest, write_tree_archive

from .conftest import Member, make_targz

MB = 1024 * 1024

# --------------------------------------------------------------------------- packing


def test_pack_tree_is_deterministic(model_tree: Path) -> None:
    first = pack_tree(model_tree)
    for p in model_tree.rglob("*"):
        os.utime(p, (1_700_000_000, 1_700_000_000))
    assert pack_tree(model_tree) == first


def test_pack_tree_members_are_sorted_and_anonymous(model_tree: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(pack_tree(model_tree)), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["empty-dir", "model.pkl", "sub", "sub/deeper", "sub/deeper/weights.bin",
                                         "sub/run.sh"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    modes = {m.name: m.mode for m in members}
    assert modes["model.pkl"] == 0o644 and modes["sub/run.sh"] == 0o755 and modes["sub"] == 0o755
    assert all(m.isreg() or m.isdir() for m in members)


def test_gzip_header_has_no_timestamp_or_name(model_tree: Path) -> None:
    data = pack_tree(model_tree)
    assert data[:2] == b"\x1f\x8b"
    assert data[4:8] == b"\0\0\0\0"  # mtime
    assert not data[3] & 0x08  # FNAME flag unset


def test_single_file_becomes_one_member_at_the_root(tmp_path: Path) -> None:
    f = tmp_path / "deep" / "model.onnx"
    f.parent.mkdir()
    f.write_bytes(b"onnx-bytes")
    with tarfile.open(fileobj=io.BytesIO(pack_tree(f)), mode="r:gz") as tar:
        assert tar.getnames() == ["model.onnx"]


def test_write_tree_archive_to_a_path(model_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.tar.gz"
    write_tree_archive(model_tree, out)
    assert out.read_bytes() == pack_tree(model_tree)


def test_pack_tree_refuses_symlinks_and_missing_paths(model_tree: Path, tmp_path: Path) -> None:
    (model_tree / "link.pkl").symlink_to(model_tree / "model.pkl")
    with pytest.raises(InvalidInput, match="link.pkl .* is a symbolic link; .*replace it with a copy") as e:
        pack_tree(model_tree)
    assert e.value.field == "path"
    with pytest.raises(InvalidInput, match="does not exist; pass a model file or folder"):
        pack_tree(tmp_path / "nope")


def test_pack_then_extract_round_trip(model_tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    result = safe_extract(io.BytesIO(pack_tree(model_tree)), dest, 10 * MB)
    assert result.files == ["model.pkl", "sub/deeper/weights.bin", "sub/run.sh"]
    assert result.size_bytes == sum((model_tree / f).stat().st_size for f in result.files)
    assert (dest / "sub/deeper/weights.bin").read_bytes() == (model_tree / "sub/deeper/weights.bin").read_bytes()
    assert (dest / "empty-dir").is_dir()
    assert os.access(dest / "sub/run.sh", os.X_OK) and not os.access(dest / "model.pkl", os.X_OK)
    assert tree_digest(dest) == tree_digest(model_tree)


def test_extract_from_a_path_into_an_existing_empty_folder(model_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "m.tar.gz"
    write_tree_archive(model_tree, archive)
    dest = tmp_path / "out"
    dest.mkdir()
    assert safe_extract(archive, dest, 10 * MB).files[0] == "model.pkl"


def test_extract_accepts_dot_slash_members_like_tar_c_dot(tmp_path: Path) -> None:
    data = make_targz([Member("./", type=tarfile.DIRTYPE, mode=0o755), Member("./score.py", b"def init(): pass\n"),
                       Member("./pkg/", type=tarfile.DIRTYPE), Member("./pkg//util.py", b"x = 1\n")])
    result = safe_extract(io.BytesIO(data), tmp_path / "out", MB)
    assert result.files == ["pkg/util.py", "score.py"]
    assert result.size_bytes == len(b"def init(): pass\n") + len(b"x = 1\n")


# --------------------------------------------------------------------------- hostile archives

HOSTILE = {
    "parent traversal": ([Member("ok.txt", b"fine"), Member("../evil.txt", b"pwned")], "contains a '..' segment"),
    "nested traversal": ([Member("a/../../evil.txt", b"pwned")], "contains a '..' segment"),
    "absolute path": ([Member("/etc/evil.txt", b"pwned")], "is an absolute path"),
    "backslash": ([Member("..\\evil.txt", b"pwned")], "contains a backslash"),
    "symlink": ([Member("ok.txt", b"fine"), Member("passwd", type=tarfile.SYMTYPE, linkname="/etc/passwd")],
                "is a symbolic link"),
    "symlink then write through it": ([Member("d", type=tarfile.SYMTYPE, linkname="/tmp"), Member("d/x", b"x")],
                                      "is a symbolic link"),
    "hardlink": ([Member("ok.txt", b"fine"), Member("hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
                 "is a hard link"),
    "char device": ([Member("null", type=tarfile.CHRTYPE)], "is a device"),
    "block device": ([Member("sda", type=tarfile.BLKTYPE)], "is a device"),
    "fifo": ([Member("pipe", type=tarfile.FIFOTYPE)], "is a fifo"),
    "unknown type": ([Member("x", type=b"Z")], "is not a regular file or folder"),
    "duplicate names": ([Member("a.txt", b"one"), Member("./a.txt", b"two")], "appears twice"),
    "file over an implied folder": ([Member("a/b", b"nested"), Member("a", b"file")], "appears twice"),
    "file under a file": ([Member("a", b"file"), Member("a/b", b"nested")], "lies under a path that is a file"),
    "only folders": ([Member("dir/", type=tarfile.DIRTYPE)], "contains no regular files"),
    "no members at all": ([], "contains no regular files"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_and_leaves_nothing(case: str, tmp_path: Path,
                                                       listing: Callable[[Path], list[str]]) -> None:
    members, reason = HOSTILE[case]
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InvalidInput) as e:
        safe_extract(io.BytesIO(make_targz(members)), work / "dest", MB)
    assert e.value.field == "archive"
    assert reason in e.value.message
    assert "tar czf" in e.value.message or "regular files" in e.value.message  # the fix
    assert listing(work) == []  # no dest, no temporary folder
    assert not (tmp_path / "evil.txt").exists() and not Path("/etc/evil.txt").exists()


def test_huge_declared_size_is_refused_before_reading(tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    data = make_targz([Member("small.txt", b"x"), Member("huge.bin", b"", declared_size=10**12)])
    with pytest.raises(PayloadTooLarge) as e:
        safe_extract(io.BytesIO(data), tmp_path / "dest", 100 * MB)
    assert e.value.field == "archive"
    assert "MODELCD_MAX_ARTIFACT_BYTES" in e.value.message and "make the model smaller" in e.value.message
    assert listing(tmp_path) == []


def test_total_over_the_limit_is_refused(tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    data = make_targz([Member(f"part{i}.bin", b"z" * 600) for i in range(3)])
    with pytest.raises(PayloadTooLarge, match="more than 1000 bytes.*MODELCD_MAX_ARTIFACT_BYTES"):
        safe_extract(io.BytesIO(data), tmp_path / "dest", 1000)
    assert listing(tmp_path) == []
    assert safe_extract(io.BytesIO(data), tmp_path / "dest", 1800).size_bytes == 1800  # exactly at the limit


def test_gzip_bomb_is_refused_without_inflating_it(tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    data = make_targz([Member("zeros.bin", bytes(64 * MB))])
    assert len(data) < MB  # compresses ~1000:1
    with pytest.raises(PayloadTooLarge):
        safe_extract(io.BytesIO(data), tmp_path / "dest", 8 * MB)
    assert listing(tmp_path) == []


@pytest.mark.parametrize("header_type", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE])
def test_oversized_extended_headers_are_refused_before_reading(header_type: bytes, tmp_path: Path,
                                                               listing: Callable[[Path], list[str]]) -> None:
    # a header that declares 10 GB: tarfile would read it whole into memory
    data = make_targz([Member("ok.txt", b"x"), Member("././@LongLink", type=header_type, declared_size=10**10)])
    with pytest.raises(InvalidInput, match="an extended header declares 10000000000 bytes") as e:
        safe_extract(io.BytesIO(data), tmp_path / "dest", 100 * MB)
    assert e.value.field == "archive"
    assert listing(tmp_path) == []


def test_long_names_still_work(tmp_path: Path) -> None:
    name = "/".join(["d" * 60] * 4) + "/model.pkl"  # over the 100-byte ustar name field
    src = tmp_path / "src"
    (src / name).parent.mkdir(parents=True)
    (src / name).write_bytes(b"p")
    assert safe_extract(io.BytesIO(pack_tree(src)), tmp_path / "out", MB).files == [name]


@pytest.mark.parametrize("payload", [
    b"",
    b"hello, this is not an archive",
    b"PK\x03\x04 a zip file",
    make_targz([Member("a.txt", b"plain tar, not gzip")], compress=False),
    gzip.compress(b"gzip, but not a tar" * 100),
    make_targz([Member("a.txt", b"x" * 5000)])[:60],  # truncated
])
def test_not_a_gzip_tar_is_refused(payload: bytes, tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    with pytest.raises(InvalidInput) as e:
        safe_extract(io.BytesIO(payload), tmp_path / "dest", MB)
    assert e.value.field == "archive"
    assert "gzip-compressed tar" in e.value.message or "no regular files" in e.value.message
    assert "tar czf model.tar.gz" in e.value.message
    assert listing(tmp_path) == []


def test_refusal_keeps_an_existing_empty_dest_empty(tmp_path: Path, listing: Callable[[Path], list[str]]) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(InvalidInput):
        safe_extract(io.BytesIO(make_targz([Member("ok", b"1"), Member("../x", b"2")])), dest, MB)
    assert listing(tmp_path) == ["dest"]


def test_dest_must_be_new_or_empty(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(ArtifactStoreError, match="not an empty folder; pass a new folder"):
        safe_extract(io.BytesIO(make_targz([Member("a", b"1")])), dest, MB)
    assert [p.name for p in dest.iterdir()] == ["old.txt"]


def test_missing_archive_path(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read .*pass a tar.gz file") as e:
        safe_extract(tmp_path / "missing.tar.gz", tmp_path / "dest", MB)
    assert e.value.field == "archive"
    assert not (tmp_path / "dest").exists()


# --------------------------------------------------------------------------- digest


def _write(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_tree_digest_is_a_known_constant(tmp_path: Path) -> None:
    # a literal: the same tree must give this value on every machine and Python version
    root = _write(tmp_path / "m", {"a.txt": b"hello\n", "b/c.bin": b"\x00\x01"})
    assert tree_digest(root) == "f21257080a2cac5fb5030645f8e2423c35e069ab4e7f02e3a4a6e06d2aca13b4"


def test_tree_digest_ignores_mtimes_modes_and_empty_folders(tmp_path: Path) -> None:
    root = _write(tmp_path / "m", {"a.txt": b"hello\n", "b/c.bin": b"\x00\x01"})
    before = tree_digest(root)
    os.utime(root / "a.txt", (0, 0))
    (root / "b" / "c.bin").chmod(0o700)
    (root / "empty").mkdir()
    assert tree_digest(root) == before


def test_tree_digest_changes_with_content_and_names(tmp_path: Path) -> None:
    base = tree_digest(_write(tmp_path / "a", {"x.txt": b"1", "y.txt": b"2"}))
    assert tree_digest(_write(tmp_path / "b", {"x.txt": b"1", "y.txt": b"3"})) != base
    assert tree_digest(_write(tmp_path / "c", {"x.txt": b"1", "z.txt": b"2"})) != base
    assert tree_digest(_write(tmp_path / "d", {"x.txt": b"1", "sub/y.txt": b"2"})) != base
    assert tree_digest(_write(tmp_path / "e", {"y.txt": b"2", "x.txt": b"1"})) == base  # creation order


def test_single_file_digest_equals_its_extracted_tree(tmp_path: Path) -> None:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"graph")
    folder = _write(tmp_path / "folder", {"model.onnx": b"graph"})
    out = tmp_path / "out"
    safe_extract(io.BytesIO(pack_tree(f)), out, MB)
    assert tree_digest(f) == tree_digest(folder) == tree_digest(out)


def test_tree_digest_refuses_symlinks(tmp_path: Path) -> None:
    root = _write(tmp_path / "m", {"a.txt": b"1"})
    (root / "l").symlink_to("/etc/passwd")
    with pytest.raises(InvalidInput, match="symbolic link"):
        tree_digest(root)
