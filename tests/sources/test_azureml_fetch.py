"""An Azure ML model version's files fetched for real: the version and its datastore from the
contract-checking Azure ML stand-in, the blobs from Azurite with azure-storage-blob. Folder and
single-blob modelUris, the datastore's key (listSecrets) or AZURE_STORAGE_KEY, storage that
refuses the key, is empty or is down; then an Event Grid delivery processed by the inbox on a
real home: a version with its files, tags and description, and which failures retry."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from modelcd.config import Settings, load_settings
from modelcd.context import Context, build_context
from modelcd.errors import ConfigError, InvalidInput
from modelcd.inbox.processor import process
from modelcd.inbox.store import DeliveryState
from modelcd.quickstart import make_model
from modelcd.sources.azureml_api import AzureMLClient, AzureMLError, ModelVersionRef, ServicePrincipal, Workspace
from modelcd.sources.azureml_fetch import _plan, fetch_model_version
from modelcd.sources.mlflow_server import SourceUnavailable
from modelcd.targets.process import free_port
from tests.pipelines.contract_server import Canned
from tests.sources.azureml_standin import (
    API,
    CLIENT_SECRET,
    DEV_KEY,
    RG,
    SP_ENV,
    SUB,
    WORKSPACE_ID,
    WS,
    StandIn,
    bearer,
    datastore_body,
    datastore_uri,
    expect_token,
    model_version_body,
    serve_standin,
)
from tests.sources.azurite_fixture import Azurite, azurite  # noqa: F401

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fetch-token"
WRONG_KEY = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc="
CONTAINER = "azureml-blobstore-0a1b2c3d"
STORE = "workspaceblobstore"
STORE_PATH = f"{WORKSPACE_ID}/datastores/{STORE}"


@pytest.fixture
def arm() -> Iterator[StandIn]:
    yield from serve_standin()


@pytest.fixture
def login() -> Iterator[StandIn]:
    yield from serve_standin()


@pytest.fixture
def upload(azurite: Azurite, tmp_path: Path) -> dict[str, Any]:  # noqa: F811
    """An iris model (plus a nested file) under a fresh LocalUpload/<id>/model/ prefix, and a
    sibling folder whose name starts the same."""
    folder = tmp_path / "model"
    meta = make_model(folder, 1.0)
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("trained on iris\n")
    prefix = f"LocalUpload/{uuid.uuid4().hex}/model"
    names = azurite.upload_folder(CONTAINER, folder, prefix)
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "other.txt").write_text("not part of the model\n")
    azurite.upload_folder(CONTAINER, sibling, prefix + "-old")
    return {"prefix": prefix, "names": names, "folder": folder, "meta": meta}


def settings_for(arm: StandIn, login: StandIn, azurite: Azurite, home: Path, **kw: Any) -> Settings:  # noqa: F811
    return Settings(home=home, azureml_management_url=arm.url, azureml_login_url=login.url,
                    azureml_blob_url=azurite.url_template, **kw)


def make_client(arm: StandIn, login: StandIn, **kw: Any) -> AzureMLClient:
    session = requests.Session()
    session.trust_env = False
    return AzureMLClient(ServicePrincipal.from_env(SP_ENV), management_url=arm.url, login_url=login.url,
                         session=session, timeout=5.0, sleep=lambda s: None, **kw)


def expect_model(arm: StandIn, login: StandIn, name: str, version: str, path: str, *, secret: str | None = DEV_KEY,
                 route: bool = False, **body: Any) -> None:
    """The calls a fetch makes: token, model version, datastore (and listSecrets unless None)."""
    add = arm.route if route else arm.expect
    expect_token(login, arm.url, TOKEN, route=True)
    add("GET", f"{WORKSPACE_ID}/models/{name}/versions/{version}",
        Canned(200, model_version_body(name, version, datastore_uri(STORE, path), **body)), query=API,
        headers=bearer(TOKEN))
    add("GET", STORE_PATH, Canned(200, datastore_body(STORE, CONTAINER)), query=API, headers=bearer(TOKEN))
    if secret is not None:
        add("POST", f"{STORE_PATH}/listSecrets", Canned(200, {"secretsType": "AccountKey", "key": secret}),
            query=API, headers=bearer(TOKEN))


def ref(name: str = "churn", version: str = "3") -> str:
    return ModelVersionRef(Workspace(SUB, RG, WS), name, version).uri


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_with_the_datastore_key(arm: StandIn, login: StandIn, azurite: Azurite, upload: dict[str, Any],  # noqa: F811
                                       tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "3", upload["prefix"] + "/", tags={"stage": "candidate"})
    settings = settings_for(arm, login, azurite, tmp_path / "home")
    with make_client(arm, login) as client:
        fetched = fetch_model_version(settings, ref(), tmp_path / "out", client=client)
    assert files_of(tmp_path / "out") == files_of(upload["folder"])  # the layout below the prefix, no sibling
    assert fetched.blobs == 3 and fetched.info.tags == {"stage": "candidate"}


def test_one_blob_with_the_key_from_the_environment(arm: StandIn, login: StandIn, azurite: Azurite,  # noqa: F811
                                                    upload: dict[str, Any], tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "4", upload["prefix"] + "/model.joblib", secret=None)  # no listSecrets
    settings = settings_for(arm, login, azurite, tmp_path / "home", azureml_storage_credential="account_key")
    with make_client(arm, login) as client:
        fetch_model_version(settings, ref(version="4"), tmp_path / "out", client=client,
                            environ={"AZURE_STORAGE_KEY": DEV_KEY})
    assert files_of(tmp_path / "out") == {"model.joblib": (upload["folder"] / "model.joblib").read_bytes()}


def test_account_key_setting_without_the_key(arm: StandIn, login: StandIn, azurite: Azurite,  # noqa: F811
                                             upload: dict[str, Any], tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "3", upload["prefix"] + "/", secret=None)
    settings = settings_for(arm, login, azurite, tmp_path / "home", azureml_storage_credential="account_key")
    with make_client(arm, login) as client, pytest.raises(ConfigError, match="AZURE_STORAGE_KEY is not set"):
        fetch_model_version(settings, ref(), tmp_path / "out", client=client, environ={})


def test_storage_refuses_the_key(arm: StandIn, login: StandIn, azurite: Azurite, upload: dict[str, Any],  # noqa: F811
                                 tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "3", upload["prefix"] + "/", secret=WRONG_KEY)
    settings = settings_for(arm, login, azurite, tmp_path / "home")
    with make_client(arm, login) as client, pytest.raises(AzureMLError) as info:
        fetch_model_version(settings, ref(), tmp_path / "out", client=client)
    assert "refused the credential" in info.value.message and "403" in info.value.message
    for secret in (WRONG_KEY, DEV_KEY, CLIENT_SECRET, TOKEN):
        assert secret not in f"{info.value} {info.value!r}"
    assert not (tmp_path / "out").exists()


def test_nothing_under_the_path(arm: StandIn, login: StandIn, azurite: Azurite, upload: dict[str, Any],  # noqa: F811
                                tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "3", "LocalUpload/none-here/model/")
    settings = settings_for(arm, login, azurite, tmp_path / "home")
    with make_client(arm, login) as client, pytest.raises(AzureMLError, match="no blobs there"):
        fetch_model_version(settings, ref(), tmp_path / "out", client=client)


def test_storage_down_is_unavailable(arm: StandIn, login: StandIn, tmp_path: Path) -> None:
    expect_model(arm, login, "churn", "3", "LocalUpload/x/model/")
    settings = Settings(home=tmp_path / "home", azureml_management_url=arm.url, azureml_login_url=login.url,
                        azureml_blob_url=f"http://127.0.0.1:{free_port()}/{{account}}")
    with make_client(arm, login) as client, pytest.raises(SourceUnavailable, match="cannot reach"):
        fetch_model_version(settings, ref(), tmp_path / "out", client=client)


def test_plan_of_blobs() -> None:
    listed = [("m/model.pkl", 10), ("m/sub/a.txt", 5), ("m/sub/", 0), ("m2/x", 1), ("m", 3)]
    assert _plan("m/", listed, "w", 100) == [("m/model.pkl", "model.pkl"), ("m/sub/a.txt", "sub/a.txt")]
    assert _plan("m", listed, "w", 100) == [("m", "m")]  # a blob named exactly: that one file
    assert _plan("m/model.pkl", listed, "w", 100) == [("m/model.pkl", "model.pkl")]
    with pytest.raises(InvalidInput, match="over MODELCD_MAX_ARTIFACT_BYTES"):
        _plan("m/", listed, "w", 14)
    with pytest.raises(InvalidInput, match="'..' segment"):
        _plan("m/", [("m/../etc/passwd", 1)], "w", 100)
    with pytest.raises(AzureMLError, match="no blobs there"):
        _plan("q/", listed, "w", 100)


# --------------------------------------------------------------------------- through the inbox


@pytest.fixture
def ctx(arm: StandIn, login: StandIn, azurite: Azurite, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Context]:
    for k, v in SP_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    env = {"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_HOOKS_AZUREML_SECRET": "s-0123456789",
           "MODELCD_AZUREML_MANAGEMENT_URL": arm.url, "MODELCD_AZUREML_LOGIN_URL": login.url,
           "MODELCD_AZUREML_BLOB_URL": azurite.url_template}
    c = build_context(load_settings(environ=env))
    yield c
    c.db.dispose()


def _deliver(ctx: Context, name: str, version: str, delivery: str) -> int:
    body = json.dumps([{"id": delivery, "topic": WORKSPACE_ID, "subject": f"models/{name}:{version}",
                        "eventType": "Microsoft.MachineLearningServices.ModelRegistered",
                        "eventTime": "2026-01-01T00:00:00.0000000Z", "dataVersion": "", "metadataVersion": "1",
                        "data": {"ModelName": name, "ModelVersion": int(version), "ModelTags": {"deploy": "true"},
                                 "ModelProperties": {}}}]).encode()
    assert ctx.inbox.accept("azureml", delivery, {"content-type": "application/json"}, body)
    [row] = [d for d in ctx.inbox.list(source="azureml") if d.delivery_id == delivery]
    return row.id


def test_inbox_imports_the_version_with_its_files(ctx: Context, arm: StandIn, login: StandIn,
                                                  upload: dict[str, Any]) -> None:
    expect_model(arm, login, "churn", "3", upload["prefix"] + "/", tags={"team": "risk"}, description="LR on iris")
    row = _deliver(ctx, "churn", "3", "evt-1")
    assert process(ctx, ctx.inbox, ctx.inbox.get(row)) == DeliveryState.DONE
    v = ctx.registry.find_external("churn", _meta("models/churn:3"))
    assert v is not None and v.status == "ready" and v.flavor == "sklearn" and v.model_file == "model.joblib"
    assert v.tags == {"team": "risk", "deploy": "true"} and v.description == "LR on iris"
    assert ctx.inbox.get(row).result == [{"model": "churn", "version": v.version, "status": "ready",
                                          "external_ref": "models/churn:3", "release": True}]


def test_inbox_retries_what_may_heal_and_gives_up_on_what_will_not(ctx: Context, arm: StandIn,
                                                                   login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN, route=True)
    arm.route("GET", f"{WORKSPACE_ID}/models/busy/versions/1",
              Canned(503, {"error": {"code": "ServiceUnavailable", "message": "later"}}), query=API,
              headers=bearer(TOKEN))
    arm.route("GET", f"{WORKSPACE_ID}/models/gone/versions/1",
              Canned(404, {"error": {"code": "UserError", "message": "not found"}}), query=API, headers=bearer(TOKEN))
    busy, gone = _deliver(ctx, "busy", "1", "evt-busy"), _deliver(ctx, "gone", "1", "evt-gone")
    assert process(ctx, ctx.inbox, ctx.inbox.get(busy)) == DeliveryState.PENDING
    assert "503" in (ctx.inbox.get(busy).last_error or "")
    assert process(ctx, ctx.inbox, ctx.inbox.get(gone)) == DeliveryState.DEAD
    assert "no model 'gone' version '1'" in (ctx.inbox.get(gone).last_error or "")


def _meta(external_ref: str) -> Any:
    from modelcd.domain import Source
    from modelcd.registry.service import RegisterMetadata

    return RegisterMetadata(source=Source.AZUREML, external_ref=external_ref)
