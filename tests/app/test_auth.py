"""The API token: refused when empty, blank or unreadable; written atomically; compared
exactly (a header that only strips to the token does not match)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from modelcd.auth import ensure_token, find_token, token_matches
from modelcd.config import load_settings
from modelcd.errors import ConfigError


def _settings(home: Path, **env: str):  # type: ignore[no-untyped-def]
    return load_settings(environ={"MODELCD_HOME": str(home), **env})


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n", b"\t\r\n", b"\xc2\xa0\n", b"two words\n"])
def test_a_token_file_without_a_token_stops_the_start(tmp_path: Path, content: bytes) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "token").write_bytes(content)
    for call in (ensure_token, find_token):
        with pytest.raises(ConfigError) as e:
            call(_settings(home))
        assert str(home / "token") in e.value.message and "delete the file" in e.value.message
        assert "MODELCD_TOKEN" in e.value.message


def test_an_unreadable_token_file_stops_the_start(tmp_path: Path) -> None:
    home = tmp_path / "h"
    (home / "token").mkdir(parents=True)  # unreadable as a file, even for root
    with pytest.raises(ConfigError) as e:
        ensure_token(_settings(home))
    assert "cannot be read" in e.value.message and str(home / "token") in e.value.message


@pytest.mark.parametrize("value", ["", "  ", "\xa0", "a b"])
def test_an_empty_modelcd_token_stops_the_start(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        ensure_token(_settings(tmp_path / "h", MODELCD_TOKEN=value))
    assert e.value.field == "MODELCD_TOKEN" and "MODELCD_TOKEN" in e.value.message
    assert not (tmp_path / "h" / "token").exists()


def test_the_token_file_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "h"

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ConfigError) as e:
        ensure_token(_settings(home))
    assert "No space left" in e.value.message
    assert list(home.iterdir()) == []  # neither an empty token file nor a temporary one
    monkeypatch.undo()
    token, created = ensure_token(_settings(home))
    assert created and (home / "token").read_text() == token + "\n"
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600
    assert [p.name for p in home.iterdir()] == ["token"]


def test_an_old_token_file_is_made_private(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    (home / "token").write_text("old-token-0123456789\n")
    os.chmod(home / "token", 0o644)
    assert ensure_token(_settings(home)) == ("old-token-0123456789", False)
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600


@pytest.mark.parametrize(("header", "ok"), [
    ("Bearer tok-123", True),
    ("Bearer \xa0", False),
    ("Bearer tok-123\xa0", False),
    ("Bearer tok-123 ", False),
    ("Bearer  tok-123", False),
    ("bearer tok-123", False),
    ("tok-123", False),
    ("Bearer ", False),
    ("Bearer tok-12", False),
    ("Bearer tok-123\ud800", False),
    (None, False),
])
def test_the_header_must_carry_exactly_the_token(header: str | None, ok: bool) -> None:
    assert token_matches("tok-123", header) is ok


def test_an_empty_expected_token_matches_nothing() -> None:
    assert not token_matches("", "Bearer ")
    assert not token_matches("", "Bearer \xa0")
