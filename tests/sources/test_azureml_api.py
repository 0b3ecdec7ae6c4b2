"""AzureMLClient against loopback stand-ins of the Microsoft identity platform and Azure
Resource Manager that check every request against the documented contract (method, path,
api-version, bearer token, the client-credentials form) and answer the documented shapes:
model versions, datastores, listSecrets; token caching and renewal; 401/403/404/429/5xx; no
secret or token in any error. The pure parts (workspace ids, asset ids, modelUri forms) with
literal inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from modelcd.errors import ConfigError, InvalidInput, ModelcdError, NotFound
from modelcd.sources.azureml_api import (
    AzureMLClient,
    AzureMLError,
    Datastore,
    DatastorePath,
    DatastoreSecret,
    ModelVersionInfo,
    ModelVersionRef,
    ServicePrincipal,
    Workspace,
    parse_model_ref,
    parse_model_uri,
    parse_workspace,
)
from modelcd.sources.mlflow_server import SourceUnavailable
from modelcd.targets.process import free_port
from tests.pipelines.contract_server import Canned
from tests.sources.azureml_standin import (
    API,
    CLIENT_ID,
    CLIENT_SECRET,
    DEV_KEY,
    RG,
    SP_ENV,
    SUB,
    TENANT,
    WORKSPACE_ID,
    WS,
    StandIn,
    bearer,
    datastore_body,
    datastore_uri,
    expect_token,
    model_version_body,
    serve_standin,
    token_answer,
)

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.arm-token-1"
TOKEN2 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.arm-token-2"
WORKSPACE = Workspace(SUB, RG, WS)
REF = ModelVersionRef(WORKSPACE, "churn", "3")
MODEL_PATH = f"{WORKSPACE_ID}/models/churn/versions/3"
STORE_PATH = f"{WORKSPACE_ID}/datastores/workspaceblobstore"
URI = datastore_uri("workspaceblobstore", "LocalUpload/0a1b/model/")


@pytest.fixture
def arm() -> Iterator[StandIn]:
    yield from serve_standin()


@pytest.fixture
def login() -> Iterator[StandIn]:
    yield from serve_standin()


class Clock:
    def __init__(self) -> None:
        self.now = 1_767_225_600.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_client(arm: StandIn, login: StandIn, sleeps: list[float], clock: Clock, **kw: Any) -> AzureMLClient:
    session = requests.Session()
    session.trust_env = False  # loopback only: no proxy from the environment
    return AzureMLClient(ServicePrincipal.from_env(SP_ENV), management_url=arm.url, login_url=login.url,
                         timeout=2.0, sleep=sleeps.append, session=session, clock=clock, **kw)


@pytest.fixture
def client(arm: StandIn, login: StandIn, sleeps: list[float], clock: Clock) -> Iterator[AzureMLClient]:
    with make_client(arm, login, sleeps, clock) as c:
        yield c


def secret_free(e: BaseException, *more: str) -> None:
    shown = f"{e} {e!r} {getattr(e, 'message', '')} "
    if isinstance(e, ModelcdError):
        shown += json.dumps(e.to_dict())
    for secret in (CLIENT_SECRET, TOKEN, TOKEN2, DEV_KEY, *more):
        assert secret not in shown, f"{secret!r} leaked into {shown!r}"


# --------------------------------------------------------------------------- documented calls


def test_model_version_datastore_and_secrets(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    body = model_version_body("churn", "3", URI, tags={"stage": "candidate", "owner": "ml"}, description="LR")
    arm.expect("GET", MODEL_PATH, Canned(200, body), query=API, headers=bearer(TOKEN))
    arm.expect("GET", STORE_PATH, Canned(200, datastore_body("workspaceblobstore", "azureml-blobstore-0a1b",
                                                             account="mlstore01")), query=API, headers=bearer(TOKEN))
    arm.expect("POST", f"{STORE_PATH}/listSecrets", Canned(200, {"secretsType": "AccountKey", "key": DEV_KEY}),
               query=API, headers=bearer(TOKEN), raw_body=lambda raw: raw == b"" or f"body {raw!r}")

    info = client.model_version(REF)
    assert info == ModelVersionInfo("churn", "3", URI, "CustomModel", "LR", {"stage": "candidate", "owner": "ml"})
    where = parse_model_uri(info.model_uri, WORKSPACE)
    assert where == DatastorePath(WORKSPACE, "workspaceblobstore", "LocalUpload/0a1b/model/")
    store = client.datastore(where.workspace, where.datastore)
    assert store == Datastore("workspaceblobstore", "AzureBlob", "mlstore01", "azureml-blobstore-0a1b",
                              "core.windows.net", "https", "AccountKey")
    assert store.account_url() == "https://mlstore01.blob.core.windows.net"
    assert store.account_url("http://127.0.0.1:10000/{account}/") == "http://127.0.0.1:10000/mlstore01"
    secret = client.datastore_secret(where.workspace, where.datastore)
    assert secret == DatastoreSecret("AccountKey", DEV_KEY) and DEV_KEY not in repr(secret)
    assert len(login.requests) == 1  # one token, kept for the three calls


def test_mlflow_model_and_sas_secret(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", MODEL_PATH, Canned(200, model_version_body("churn", "3", URI, model_type="MLFlowModel")),
               query=API, headers=bearer(TOKEN))
    arm.expect("POST", f"{STORE_PATH}/listSecrets", Canned(200, {"secretsType": "Sas", "sasToken": "sv=2025&sig=x"}),
               query=API, headers=bearer(TOKEN))
    info = client.model_version(REF)
    assert info.model_type == "MLFlowModel" and info.flavors == ("python_function",)
    assert client.datastore_secret(WORKSPACE, "workspaceblobstore") == DatastoreSecret("Sas", "sv=2025&sig=x")


def test_api_version_is_configurable(arm: StandIn, login: StandIn, sleeps: list[float], clock: Clock) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", MODEL_PATH, Canned(200, model_version_body("churn", "3", URI)),
               query={"api-version": "2026-09-01"}, headers=bearer(TOKEN))
    with make_client(arm, login, sleeps, clock, api_version="2026-09-01") as c:
        assert c.model_version(REF).model_uri == URI
    with pytest.raises(InvalidInput, match="azureml_api_version"):
        make_client(arm, login, sleeps, clock, api_version="latest")


def test_names_are_percent_encoded(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    ref = ModelVersionRef(Workspace(SUB, "rg with space", WS), "churn.v2", "3")
    path = WORKSPACE_ID.replace(RG, "rg%20with%20space") + "/models/churn.v2/versions/3"
    arm.expect("GET", path, Canned(200, model_version_body("churn.v2", "3", URI)), query=API, headers=bearer(TOKEN))
    assert client.model_version(ref).name == "churn.v2"


# --------------------------------------------------------------------------- tokens


def test_token_is_renewed_before_it_expires(client: AzureMLClient, arm: StandIn, login: StandIn,
                                            clock: Clock) -> None:
    expect_token(login, arm.url, TOKEN, answer=token_answer(TOKEN, expires_in=900))
    expect_token(login, arm.url, TOKEN2)
    answer = Canned(200, model_version_body("churn", "3", URI))
    arm.expect("GET", MODEL_PATH, answer, query=API, headers=bearer(TOKEN))
    arm.expect("GET", MODEL_PATH, answer, query=API, headers=bearer(TOKEN))
    arm.expect("GET", MODEL_PATH, answer, query=API, headers=bearer(TOKEN2))
    client.model_version(REF)
    clock.now += 500  # 400 s left: still good
    client.model_version(REF)
    clock.now += 200  # 200 s left, under the 300 s margin: a new one
    client.model_version(REF)


def test_a_refused_token_is_replaced_once(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    expect_token(login, arm.url, TOKEN2)
    expired = Canned(401, {"error": {"code": "ExpiredAuthenticationToken", "message": "The access token expiry..."}})
    arm.expect("GET", MODEL_PATH, expired, query=API, headers=bearer(TOKEN))
    arm.expect("GET", MODEL_PATH, Canned(200, model_version_body("churn", "3", URI)), query=API, headers=bearer(TOKEN2))
    assert client.model_version(REF).model_uri == URI


def test_arm_refusing_every_token(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN, route=True)
    arm.route("GET", MODEL_PATH, Canned(401, {"error": {"code": "InvalidAuthenticationTokenTenant",
                                                        "message": "The access token is from the wrong issuer"}}),
              query=API, headers=bearer(TOKEN))
    with pytest.raises(AzureMLError) as info:
        client.model_version(REF)
    assert "401" in info.value.message and "InvalidAuthenticationTokenTenant" in info.value.message
    assert "AZURE_TENANT_ID" in info.value.message
    assert len(arm.requests) == 2
    secret_free(info.value)


def test_identity_platform_refuses_the_secret(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    # a stand-in that even echoes the secret: it must not reach our message
    expect_token(login, arm.url, TOKEN, answer=Canned(401, {
        "error": "invalid_client", "error_codes": [7000215],
        "error_description": f"AADSTS7000215: Invalid client secret provided ({CLIENT_SECRET}).\r\nTrace ID: 1"}))
    with pytest.raises(AzureMLError) as info:
        client.model_version(REF)
    message = info.value.message
    assert "invalid_client" in message and "AADSTS7000215" in message and "Trace ID" not in message
    assert "AZURE_CLIENT_SECRET" in message and arm.requests == []
    secret_free(info.value)


def test_service_principal_from_env() -> None:
    sp = ServicePrincipal.from_env(SP_ENV)
    assert (sp.tenant_id, sp.client_id) == (TENANT, CLIENT_ID) and CLIENT_SECRET not in repr(sp)
    with pytest.raises(ConfigError) as info:
        ServicePrincipal.from_env({"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_SECRET": " "})
    assert "AZURE_CLIENT_ID, AZURE_CLIENT_SECRET not set" in info.value.message
    with pytest.raises(ConfigError, match="AZURE_TENANT_ID: not a tenant"):
        ServicePrincipal.from_env({**SP_ENV, "AZURE_TENANT_ID": "../evil"})


# --------------------------------------------------------------------------- failures


def test_missing_version_is_not_found(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", MODEL_PATH, Canned(404, {"error": {"code": "UserError", "message": "Not found: churn:3"}}),
               query=API, headers=bearer(TOKEN))
    with pytest.raises(NotFound) as info:
        client.model_version(REF)
    assert "no model 'churn' version '3'" in info.value.message and "Not found: churn:3" in info.value.message
    secret_free(info.value)


def test_forbidden_names_the_role(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("POST", f"{STORE_PATH}/listSecrets", Canned(403, {"error": {
        "code": "AuthorizationFailed", "message": f"The client '{CLIENT_ID}' does not have authorization"}}),
        query=API, headers=bearer(TOKEN))
    with pytest.raises(AzureMLError) as info:
        client.datastore_secret(WORKSPACE, "workspaceblobstore")
    assert "403 Forbidden: AuthorizationFailed" in info.value.message and "AzureML Data Scientist" in info.value.message
    secret_free(info.value)


def test_rate_limit_is_waited_out(client: AzureMLClient, arm: StandIn, login: StandIn, sleeps: list[float]) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", MODEL_PATH, Canned(429, {"error": {"code": "TooManyRequests", "message": "slow down"}},
                                         headers={"Retry-After": "7"}),
               Canned(200, model_version_body("churn", "3", URI)), query=API, headers=bearer(TOKEN))
    assert client.model_version(REF).model_uri == URI
    assert sleeps == [7.0]


def test_server_errors_give_up_as_unavailable(client: AzureMLClient, arm: StandIn, login: StandIn,
                                              sleeps: list[float]) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.route("GET", MODEL_PATH, Canned(503, {"error": {"code": "ServiceUnavailable", "message": "try later"}}),
              query=API, headers=bearer(TOKEN))
    with pytest.raises(SourceUnavailable) as info:
        client.model_version(REF)
    assert info.value.code == "source_unavailable" and "503" in info.value.message
    assert len(arm.requests) == 4 and len(sleeps) == 3  # bounded: 1 + 3 retries
    secret_free(info.value)


def test_identity_platform_down_is_unavailable(arm: StandIn, sleeps: list[float], clock: Clock) -> None:
    session = requests.Session()
    session.trust_env = False
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    c = AzureMLClient(ServicePrincipal.from_env(SP_ENV), management_url=arm.url, login_url=nobody, timeout=1.0,
                      retries=1, sleep=sleeps.append, session=session, clock=clock)
    with c, pytest.raises(SourceUnavailable) as info:
        c.model_version(REF)
    assert "Microsoft Entra ID" in info.value.message and arm.requests == [] and len(sleeps) == 1
    secret_free(info.value)


def test_a_datastore_that_is_not_blob(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", STORE_PATH, Canned(200, datastore_body("workspaceblobstore", "c1", kind="AzureFile")),
               query=API, headers=bearer(TOKEN))
    with pytest.raises(AzureMLError, match="of type 'AzureFile': modelcd fetches model files from AzureBlob"):
        client.datastore(WORKSPACE, "workspaceblobstore")


def test_a_page_that_is_not_arm(client: AzureMLClient, arm: StandIn, login: StandIn) -> None:
    expect_token(login, arm.url, TOKEN)
    arm.expect("GET", MODEL_PATH, Canned(200, raw=b"<html>sign in</html>", content_type="text/html"),
               query=API, headers=bearer(TOKEN))
    with pytest.raises(AzureMLError, match="not JSON"):
        client.model_version(REF)


# --------------------------------------------------------------------------- pure parts


def test_workspace_from_an_event_topic() -> None:
    assert parse_workspace(WORKSPACE_ID) == WORKSPACE
    assert parse_workspace(WORKSPACE_ID.replace("resourceGroups", "resourcegroups") + "/") == WORKSPACE
    assert parse_workspace("/subscriptions/s/resourceGroups/rg/providers/Microsoft.MachineLearningServices/"
                           "registries/shared") is None
    assert parse_workspace("models/churn:3") is None


def test_asset_id_round_trip() -> None:
    assert REF.uri == f"azureml:{MODEL_PATH}"
    assert parse_model_ref(REF.uri) == REF
    odd = ModelVersionRef(Workspace(SUB, "rg x", WS), "a/b", "3")
    assert parse_model_ref(odd.uri) == odd
    for bad in ("azureml:churn:3", "azureml://registries/r/models/churn/versions/3", f"{MODEL_PATH}", "s3://x/y"):
        with pytest.raises(InvalidInput, match="not an Azure ML model version id"):
            parse_model_ref(bad)


@pytest.mark.parametrize(("uri", "expected"), [
    (datastore_uri("workspaceblobstore", "LocalUpload/0a1b/model.pkl"),
     DatastorePath(WORKSPACE, "workspaceblobstore", "LocalUpload/0a1b/model.pkl")),
    (f"azureml://subscriptions/{SUB}/resourceGroups/{RG}/workspaces/{WS}/datastores/ds/paths/a//b/",
     DatastorePath(WORKSPACE, "ds", "a/b/")),
    ("azureml://datastores/ds/paths/models/churn%203/", DatastorePath(WORKSPACE, "ds", "models/churn 3/")),
    ("azureml://subscriptions/other/resourcegroups/rg2/workspaces/ws2/datastores/ds/paths/m",
     DatastorePath(Workspace("other", "rg2", "ws2"), "ds", "m")),
])
def test_model_uri_forms(uri: str, expected: DatastorePath) -> None:
    assert parse_model_uri(uri, WORKSPACE) == expected


@pytest.mark.parametrize(("uri", "needle"), [
    ("azureml://jobs/run-1/outputs/artifacts/paths/model/", "a job output"),
    ("azureml://registries/shared/models/churn/versions/3", "in an Azure ML registry"),
    ("https://acct.blob.core.windows.net/c/model/", "in an Azure ML registry or a plain storage URL"),
    ("azureml://datastores/ds/paths/../etc/", "no usable path"),
    ("azureml://datastores/ds/paths/", "no usable path"),
    ("file:///tmp/model", "not an azureml://"),
])
def test_model_uri_forms_modelcd_cannot_read(uri: str, needle: str) -> None:
    with pytest.raises(AzureMLError, match="modelUri") as info:
        parse_model_uri(uri, WORKSPACE)
    assert needle in info.value.message
