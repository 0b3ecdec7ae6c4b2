"""Fixtures for the API tests: a context on a fresh home, the Flask app over it, its client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from modelcd.app import create_app
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from tests.conftest import free_port

TOKEN = "api-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app_env() -> dict[str, str]:
    """Extra MODELCD_* settings of the app under test (a module overrides this fixture)."""
    return {}


@pytest.fixture
def ctx(tmp_path: Path, app_env: dict[str, str]) -> Iterator[Context]:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": TOKEN,
                                      "MODELCD_ROUTER_PORT": str(free_port()), **app_env})
    c = build_context(settings)
    yield c
    c.db.dispose()


@pytest.fixture
def app(ctx: Context) -> Flask:
    return create_app(ctx, TOKEN)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
