"""The MLflow registry shows what modelcd did, against a real MLflow tracking server: a version
registered in MLflow reaches production through the webhook and then carries the
``production`` alias and the modelcd tags; the next version takes the alias; a rollback moves
it back to the version serving again."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, make_service
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture
def writeback_service(tmp_path: Path, mlflow_server: MlflowServer) -> Iterator[Service]:
    svc = make_service(tmp_path)
    result = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri", mlflow_server.tracking_uri],
                                env=svc.env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        svc.shutdown_data_plane()
        from modelcd.sources.mlflow_server import disconnect_webhook

        disconnect_webhook(mlflow_server.tracking_uri)


def _eventually(svc: Service, check: Callable[[], Any], timeout_s: float = 60) -> Any:
    """``check()`` once it passes (MLflow answers an alias not set yet with an error); on
    timeout the notes observers left on the outbox events say why."""
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check()
        except (AssertionError, MlflowException) as e:
            if time.monotonic() > deadline:
                raise AssertionError(f"{e}; observer notes: {_outbox_notes(svc)}") from e
            time.sleep(0.3)


def _outbox_notes(svc: Service) -> list[str]:
    with sqlite3.connect(svc.home / "modelcd.db") as db:
        rows = db.execute("SELECT kind, error FROM outbox WHERE error IS NOT NULL").fetchall()
    return [f"{kind}: {error}" for kind, error in rows]


def test_releases_and_a_rollback_show_in_the_mlflow_registry(writeback_service: Service,
                                                             mlflow_server: MlflowServer) -> None:
    svc = writeback_service
    client = mlflow_server.client()
    name = mlflow_server.unique_name("written")

    first = mlflow_server.register_sklearn(name, C=1.0)
    rel1 = svc.wait_release_for(name, 1, timeout_s=300)
    assert rel1["phase"] == "succeeded", svc.job_log(rel1["id"])
    digest1 = svc.api("GET", f"/models/{name}/versions/1").json()["digest"]

    def first_is_production() -> None:
        mv = client.get_model_version_by_alias(name, "production")
        assert mv.version == first
        assert mv.tags.get("modelcd.release") == rel1["id"]
        assert mv.tags.get("modelcd.state") == "succeeded"
        assert mv.tags.get("modelcd.environment") == "production"
        assert mv.tags.get("modelcd.bundle") == f"sha256:{digest1}"

    _eventually(svc, first_is_production)

    second = mlflow_server.register_sklearn(name, C=0.5)
    rel2 = svc.wait_release_for(name, 2, timeout_s=300)
    assert rel2["phase"] == "succeeded", svc.job_log(rel2["id"])

    def second_is_production() -> None:
        mv = client.get_model_version_by_alias(name, "production")
        assert mv.version == second and mv.tags.get("modelcd.release") == rel2["id"]
        assert "production" not in client.get_model_version(name, first).aliases

    _eventually(svc, second_is_production)

    # the instant rollback (the first deployment is still warm): no release, the alias moves back
    rolled = svc.api("POST", f"/endpoints/{name}/production/rollback").json()
    assert rolled["release_id"] is None and rolled["traffic"] == {"1": 100}
    _eventually(svc, lambda: _alias_is(client, name, first))
    # and rolling back again returns
    svc.api("POST", f"/endpoints/{name}/production/rollback")
    _eventually(svc, lambda: _alias_is(client, name, second))


def _alias_is(client: Any, name: str, version: str) -> None:
    assert client.get_model_version_by_alias(name, "production").version == version
