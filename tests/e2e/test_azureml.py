"""A model version registered in Azure Machine Learning reaches production through a real
`modelcd serve`: Event Grid delivers ModelRegistered (secret in ``?code=``), the inbox worker
resolves the version's files through the Azure ML REST API (a contract-checking stand-in of
Azure Resource Manager and the Microsoft identity platform on 127.0.0.1), downloads the blobs
from Azurite with the key in AZURE_STORAGE_KEY, registers the version and releases it; the
endpoint answers with the model's predictions. Neither the service principal's secret nor its
token reaches the logs or the database."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Service, iris_model, make_service
from tests.pipelines.contract_server import Canned
from tests.sources.azureml_standin import (
    API,
    CLIENT_SECRET,
    DEV_KEY,
    SP_ENV,
    WORKSPACE_ID,
    StandIn,
    bearer,
    datastore_body,
    datastore_uri,
    expect_token,
    model_version_body,
    serve_standin,
)
from tests.sources.azurite_fixture import Azurite, azurite  # noqa: F401

SECRET = "azureml-hook-secret-0123456789"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.e2e-arm-token"
CONTAINER = "azureml-blobstore-e2e"
STORE = "workspaceblobstore"

pytestmark = pytest.mark.slow


@pytest.fixture
def arm() -> Iterator[StandIn]:
    yield from serve_standin()


@pytest.fixture
def login() -> Iterator[StandIn]:
    yield from serve_standin()


@pytest.fixture
def azure_service(tmp_path: Path, arm: StandIn, login: StandIn, azurite: Azurite) -> Iterator[Service]:  # noqa: F811
    svc = make_service(tmp_path, MODELCD_HOOKS_AZUREML_SECRET=SECRET, MODELCD_AZUREML_MANAGEMENT_URL=arm.url,
                       MODELCD_AZUREML_LOGIN_URL=login.url, MODELCD_AZUREML_BLOB_URL=azurite.url_template,
                       MODELCD_AZUREML_STORAGE_CREDENTIAL="account_key", AZURE_STORAGE_KEY=DEV_KEY,
                       NO_PROXY="127.0.0.1", **SP_ENV)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        svc.shutdown_data_plane()


def _event(name: str, version: int, event_id: str) -> bytes:
    """An Event Grid delivery of ModelRegistered (Event Grid schema: an array)."""
    return json.dumps([{
        "id": event_id, "topic": WORKSPACE_ID, "subject": f"models/{name}:{version}",
        "eventType": "Microsoft.MachineLearningServices.ModelRegistered",
        "eventTime": "2026-01-01T00:00:00.0000000Z", "dataVersion": "", "metadataVersion": "1",
        "data": {"ModelName": name, "ModelVersion": version, "ModelTags": {"deploy": "true"},
                 "ModelProperties": {"type": "sklearn"}}}]).encode()


def _deliver(svc: Service, body: bytes) -> requests.Response:
    return requests.post(f"{svc.url}/hooks/azureml", params={"code": SECRET}, data=body, timeout=10,
                         headers={"Content-Type": "application/json", "aeg-event-type": "Notification",
                                  "aeg-subscription-name": "MODELCD", "aeg-delivery-count": "0"})


def test_azureml_registration_reaches_production(azure_service: Service, arm: StandIn, login: StandIn,
                                                 azurite: Azurite, tmp_path: Path) -> None:  # noqa: F811
    svc = azure_service
    name = f"az-iris-{uuid.uuid4().hex[:6]}"
    meta: dict[str, Any] = iris_model(tmp_path / "model", c=1.0)
    prefix = f"LocalUpload/{uuid.uuid4().hex}/model"
    azurite.upload_folder(CONTAINER, tmp_path / "model", prefix)
    expect_token(login, arm.url, TOKEN, route=True)
    arm.route("GET", f"{WORKSPACE_ID}/models/{name}/versions/1",
              Canned(200, model_version_body(name, "1", datastore_uri(STORE, prefix + "/"),
                                             tags={"framework": "sklearn"}, description="LR on iris")),
              query=API, headers=bearer(TOKEN))
    arm.route("GET", f"{WORKSPACE_ID}/datastores/{STORE}", Canned(200, datastore_body(STORE, CONTAINER)),
              query=API, headers=bearer(TOKEN))

    event = _event(name, 1, str(uuid.uuid4()))
    assert _deliver(svc, event).status_code == 202
    assert _deliver(svc, event).status_code == 200  # Event Grid's retry of the same event: stored once

    rel = svc.wait_release_for(name, 1, timeout_s=300)
    assert rel["phase"] == "succeeded", svc.job_log(rel["id"])
    v = svc.api("GET", f"/models/{name}/versions/1").json()
    assert v["source"] == "azureml" and v["external_ref"] == f"models/{name}:1" and v["status"] == "ready"
    assert v["flavor"] == "sklearn" and v["model_file"] == "model.joblib"
    assert v["tags"]["framework"] == "sklearn" and v["tags"]["deploy"] == "true"
    assert v["description"] == "LR on iris"
    [delivery] = svc.api("GET", "/inbox", params={"source": "azureml"}).json()["deliveries"]
    assert delivery["state"] == "done"

    ep = svc.endpoint(name)
    r = requests.post(ep["scoring_uri"], headers=svc.auth(ep), json=meta["sample"], timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == meta["expected"]

    # the calls the worker made kept to the contract (checked by the stand-ins), without listSecrets
    assert [req.path.rsplit("/", 2)[-2:] for req in arm.requests] == [["versions", "1"], ["datastores", STORE]]
    for path in [*svc.home.rglob("*.log"), *svc.home.glob("modelcd.db*")]:
        data = path.read_bytes()
        assert CLIENT_SECRET.encode() not in data and TOKEN.encode() not in data, path
