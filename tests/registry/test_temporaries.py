"""What an interrupted registration leaves under the home, and the name form it reserves."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.errors import InvalidInput
from modelcd.fsutil import TEMP_PREFIX, clean_temporaries
from modelcd.registry.archive import pack_tree, safe_extract
from modelcd.registry.artifacts import LocalArtifactStore
from modelcd.registry.service import parse_metadata
from tests.conftest import free_port, iris_model

from .conftest import Member, make_targz

UPLOADER = """
import sys
from modelcd.config import load_settings
from modelcd.context import build_context
from modelcd.registry.service import parse_metadata
ctx = build_context(load_settings(environ={"MODELCD_HOME": sys.argv[1], "MODELCD_ROUTER_PORT": sys.argv[2]}))
ctx.registry.register("big", sys.stdin.buffer, parse_metadata({}))
"""


def snapshot(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))}


def wait_for_spooled_bytes(tmp_root: Path, timeout_s: float = 30.0) -> Path:
    """The upload's scratch folder, once some of the model's bytes are unpacked into it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for spool in tmp_root.glob(f"{TEMP_PREFIX}*"):
            if any(p.is_file() and p.stat().st_size for p in spool.rglob("weights.bin")):
                return spool
        time.sleep(0.05)
    raise AssertionError(f"no upload unpacked under {tmp_root} within {timeout_s}s")


def test_an_upload_killed_halfway_leaves_a_spool_that_clean_temporaries_removes(tmp_path: Path) -> None:
    home, port = tmp_path / "home", str(free_port())
    ctx = build_context(load_settings(environ={"MODELCD_HOME": str(home), "MODELCD_ROUTER_PORT": port}))
    registered = ctx.registry.register("iris", io.BytesIO(pack_tree(_iris(tmp_path))), parse_metadata({}))
    ctx.db.dispose()
    before = {name: snapshot(home / name) for name in ("artifacts", "files")}
    big = tmp_path / "big"
    big.mkdir()
    (big / "weights.bin").write_bytes(os.urandom(4 * 1024 * 1024))  # incompressible: a long upload
    archive = pack_tree(big)

    uploader = subprocess.Popen([sys.executable, "-c", UPLOADER, str(home), port], stdin=subprocess.PIPE)
    try:
        assert uploader.stdin is not None
        uploader.stdin.write(archive[: len(archive) // 2])
        uploader.stdin.flush()
        spool = wait_for_spooled_bytes(home / "tmp")
        assert clean_temporaries(home) == []  # the upload is in flight: left alone
    finally:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait(timeout=10)
        assert uploader.stdin is not None
        uploader.stdin.close()

    assert clean_temporaries(home) == [spool]
    assert list((home / "tmp").iterdir()) == []
    assert {name: snapshot(home / name) for name in ("artifacts", "files")} == before
    assert ctx.registry.materialize(registered).is_dir()


def test_model_files_may_not_use_the_temporary_name_form(tmp_path: Path) -> None:
    """A model file named like a temporary could be taken for a leftover: refused at the door."""
    reserved = f"{TEMP_PREFIX}0a0b0c0d0e0f-weights"
    with pytest.raises(InvalidInput, match="reserves for its temporary files"):
        safe_extract(io.BytesIO(make_targz([Member(f"sub/{reserved}", b"x")])), tmp_path / "out", 1 << 20)
    assert not (tmp_path / "out").exists()
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / reserved).write_bytes(b"x")
    with pytest.raises(InvalidInput, match="reserves for its temporary files"):
        LocalArtifactStore(tmp_path / "artifacts").put_tree("m/abc", folder)


def _iris(tmp_path: Path) -> Path:
    iris_model(tmp_path / "iris")
    return tmp_path / "iris"
