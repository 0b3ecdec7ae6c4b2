"""What a deployment record keeps and how it becomes a DeploySpec again: secret references
are resolved when the deployment starts, and never stored as values."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcd.errors import DeployError
from modelcd.releases.deployments import resolve_env


def test_text_and_secret_references_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELCD_TEST_DB_PASSWORD", "from-the-service-env")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api-key").write_text("from-a-file\n")
    env = {"A": "text", "B": {"secret_env": "MODELCD_TEST_DB_PASSWORD"}, "C": {"secret_file": "api-key"}}
    assert resolve_env(env, tmp_path) == {"A": "text", "B": "from-the-service-env", "C": "from-a-file"}


def test_a_missing_secret_names_the_variable_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODELCD_TEST_MISSING", raising=False)
    with pytest.raises(DeployError, match="env.B: secret_env MODELCD_TEST_MISSING is not set") as e:
        resolve_env({"B": {"secret_env": "MODELCD_TEST_MISSING"}}, tmp_path)
    assert e.value.field == "env.B"
    with pytest.raises(DeployError, match="env.C: cannot read secret_file .*secrets/nope"):
        resolve_env({"C": {"secret_file": "nope"}}, tmp_path)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "empty").write_text("\n")
    with pytest.raises(DeployError, match="is empty"):
        resolve_env({"C": {"secret_file": "empty"}}, tmp_path)
