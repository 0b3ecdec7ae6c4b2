"""`modelcd sources connect mlflow` while the service runs: the service makes the webhook,
saves the secret, and verifies deliveries with it at once, without a restart."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from click.testing import CliRunner

from modelcd.cli import main
from modelcd.sources.mlflow import sign
from modelcd.sources.mlflow_server import disconnect_webhook, test_webhook
from tests.conftest import running_service
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401

pytestmark = pytest.mark.slow


def _delivery(url: str, secret: str) -> requests.Response:
    body = json.dumps({"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00+00:00",
                       "data": {"name": "example_model", "version": "1", "source": "models:/123", "run_id": None,
                                "tags": {}, "description": None}}).encode()
    delivery, ts = str(uuid.uuid4()), str(int(time.time()))
    return requests.post(f"{url}/hooks/mlflow", data=body, timeout=10, headers={
        "Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(secret, delivery, ts, body)})


def test_connect_takes_effect_in_the_running_service(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    with running_service(tmp_path) as svc:
        assert _delivery(svc.url, "not-yet").status_code == 401  # no secret yet: every delivery is refused
        try:
            result = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri",
                                               mlflow_server.tracking_uri], env=svc.env, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            assert f"the service at {svc.url} uses them now" in result.output
            saved = yaml.safe_load((svc.home / "settings.yaml").read_text())
            secret = saved["hooks_mlflow_secret"]
            assert len(secret) >= 32 and secret not in result.output
            assert saved["mlflow_tracking_uri"] == mlflow_server.tracking_uri
            # a delivery signed with the new secret is accepted, one signed otherwise refused
            assert _delivery(svc.url, secret).status_code == 202
            assert _delivery(svc.url, "not-the-secret").status_code == 401
            # and MLflow's own signed test delivery reaches the service through the webhook it made
            webhook_id = result.output.split("MLflow webhook ", 1)[1].split(" ", 1)[0]
            check = test_webhook(mlflow_server.tracking_uri, webhook_id)
            assert check.success and check.response_status == 202, check
            # connecting again keeps the secret (the webhook is updated, not duplicated)
            again = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri",
                                              mlflow_server.tracking_uri], env=svc.env, catch_exceptions=False)
            assert again.exit_code == 0, again.output
            assert yaml.safe_load((svc.home / "settings.yaml").read_text())["hooks_mlflow_secret"] == secret
            assert _delivery(svc.url, secret).status_code == 202
        finally:
            disconnect_webhook(mlflow_server.tracking_uri)
