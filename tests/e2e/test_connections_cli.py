"""`modelcd connections add|list|remove` against a real service: the URL is read from the
service's environment by name and never echoed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import running_service

pytestmark = pytest.mark.slow


def test_connections_over_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'secret-name.sqlite'}"
    with running_service(tmp_path, FLOWERS_URL=url) as svc:
        def cli(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(main, list(args), env=svc.env, catch_exceptions=False)
            return result.exit_code, result.output

        code, out = cli("connections", "add", "flowers", "--url-env", "FLOWERS_URL")
        assert code == 0, out
        assert out.strip() == "connection flowers: URL from $FLOWERS_URL"
        code, out = cli("connections", "add", "other", "--url-env", "NOT_SET_ANYWHERE")
        assert "is not set in the service's environment yet" in out
        code, out = cli("connections", "list", "--json")
        docs = json.loads(out)["connections"]
        assert [(c["name"], c["url_set"]) for c in docs] == [("flowers", True), ("other", False)]
        code, out = cli("connections", "list")
        assert "FLOWERS_URL" in out and "secret-name" not in out
        assert cli("connections", "remove", "other") == (0, "removed connection other\n")
        code, out = cli("connections", "remove", "other")
        assert code != 0 and "no connection 'other'" in out
