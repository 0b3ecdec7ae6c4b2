"""A version registered in a real MLflow tracking server reaches production through modelcd:
`modelcd sources connect mlflow` creates the webhook with MLflow's own client, MLflow sends a
signed delivery, modelcd fetches the artifacts and releases them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from modelcd.cli import main
from tests.conftest import Service, make_service
from tests.sources.mlflow_fixture import MlflowServer, mlflow_server_fixture  # noqa: F401


@pytest.fixture
def mlflow_service(tmp_path: Path, mlflow_server: MlflowServer) -> Iterator[Service]:
    svc = make_service(tmp_path)
    result = CliRunner().invoke(main, ["sources", "connect", "mlflow", "--tracking-uri", mlflow_server.tracking_uri],
                                env=svc.env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "saved in" in result.output
    import yaml

    saved = yaml.safe_load((svc.home / "settings.yaml").read_text())
    assert len(saved["hooks_mlflow_secret"]) >= 32 and saved["hooks_mlflow_secret"] not in result.output
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        svc.shutdown_data_plane()
        from modelcd.sources.mlflow_server import disconnect_webhook

        disconnect_webhook(mlflow_server.tracking_uri)


def test_mlflow_registration_reaches_production(mlflow_service: Service, mlflow_server: MlflowServer) -> None:
    svc = mlflow_service
    name = mlflow_server.unique_name("churn")
    # MLflow 3's default format for scikit-learn (skops), with a type the model's MLmodel trusts
    version = mlflow_server.register_sklearn(name, C=1.0, tags={"deploy": "true"}, serialization_format="skops",
                                             skops_trusted_types=["datetime.date"])
    rel = svc.wait_release_for(name, 1, timeout_s=300)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    v = svc.api("GET", f"/models/{name}/versions/1").json()
    assert v["source"] == "mlflow" and v["external_ref"] == f"models:/{name}/{version}"
    assert v["flavor"] == "sklearn" and v["model_file"] == "model.skops"
    assert not any(r.startswith("mlflow") for r in v["requirements"])
    delivery = svc.api("GET", "/inbox", params={"source": "mlflow"}).json()["deliveries"][0]
    assert delivery["state"] == "done"
    assert "x-mlflow-signature" not in {k.lower() for k in delivery["headers"]}  # secrets are not kept
    ep = svc.endpoint(name)
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=v["sample"], timeout=10)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 3


def test_mlflow_poller_without_webhook(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """An MLflow server that cannot call us: the poller finds the version, the same path releases it."""
    svc = make_service(tmp_path, MODELCD_MLFLOW_TRACKING_URI=mlflow_server.tracking_uri,
                       MODELCD_MLFLOW_POLL_INTERVAL_S="0.5")
    svc.start()
    try:
        name = mlflow_server.unique_name("polled")
        version = mlflow_server.register_sklearn(name, C=0.5)
        rel = svc.wait_release_for(name, 1, timeout_s=300)
        assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
        deliveries = svc.api("GET", "/inbox", params={"source": "mlflow"}).json()["deliveries"]
        assert f"poll:{name}/{version}" in {d["delivery_id"] for d in deliveries}
        # polling again finds nothing new: one version, one release
        import time

        time.sleep(2)
        assert len(svc.api("GET", f"/models/{name}/versions").json()["versions"]) == 1
        assert len(svc.api("GET", "/releases", params={"model": name}).json()["releases"]) == 1
    finally:
        svc.stop()
        svc.shutdown_data_plane()
