"""Stand-ins for the Azure ML side of the Azure ML tests: the Microsoft identity platform's
token endpoint and Azure Resource Manager's model version, datastore and listSecrets calls,
each a contract-checking server on 127.0.0.1 (``tests/pipelines/contract_server.py``) that
answers the documented shapes (``reference/integrations.md`` §9; azure-rest-api-specs
2025-09-01 examples ``ModelVersion/get.json``, ``Datastore/list.json``,
``Datastore/listSecrets.json``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

from modelcd import __version__
from tests.pipelines.contract_server import Canned, ContractServer, Expect, Recorded

TENANT = "72f988bf-0000-4000-8000-00000000cafe"
CLIENT_ID = "0f3d1a2b-0000-4000-8000-0000000c1e47"
CLIENT_SECRET = "sp-secret~Q8x.v3ryS3cret-0123456789"
SUB = "00000000-1111-2222-3333-444444444444"
RG = "ml-rg"
WS = "ml-ws"
API_VERSION = "2025-09-01"
WORKSPACE_ID = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.MachineLearningServices/workspaces/{WS}"
ARM_HEADERS = {"Accept": "application/json", "User-Agent": f"modelcd/{__version__}"}
SP_ENV = {"AZURE_TENANT_ID": TENANT, "AZURE_CLIENT_ID": CLIENT_ID, "AZURE_CLIENT_SECRET": CLIENT_SECRET}
# the well-known Azurite / storage emulator account (public: Azurite README)
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class StandIn(ContractServer):
    """A ContractServer that also takes the identity platform's form-encoded token requests."""

    def _check(self, exp: Expect, req: Recorded) -> list[str]:
        problems = super()._check(exp, req)
        if req.headers.get("content-type") == "application/x-www-form-urlencoded":
            problems = [p for p in problems if not p.endswith("a body without Content-Type: application/json")]
        return problems


def serve_standin() -> Iterator[StandIn]:
    """A StandIn for one test; after it, every request kept to the contract and every queued
    expectation was met (use as a fixture body)."""
    srv = StandIn()
    try:
        yield srv
    finally:
        srv.close()
    assert srv.failures == [], "requests broke the contract:\n" + "\n".join(srv.failures)
    assert srv.unmet == [], f"expected requests never came: {srv.unmet}"


def token_form(scope: str, secret: str = CLIENT_SECRET) -> Callable[[bytes], str | None]:
    """The body check of a client-credentials token request for ``scope``."""

    def check(raw: bytes) -> str | None:
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        want = {"grant_type": "client_credentials", "client_id": CLIENT_ID, "client_secret": secret, "scope": scope}
        return None if form == want else f"token form {sorted(form)} is not the client-credentials grant for {scope}"

    return check


def token_answer(token: str, expires_in: int = 3599) -> Canned:
    """The identity platform's answer to a client-credentials grant."""
    return Canned(200, {"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
                        "access_token": token})


def expect_token(login: ContractServer, arm_url: str, token: str, *, route: bool = False,
                 answer: Canned | None = None) -> Expect:
    """The token request the client must send for ARM's scope (queued, or a route)."""
    add = login.route if route else login.expect
    return add("POST", f"/{TENANT}/oauth2/v2.0/token", answer or token_answer(token),
               headers={"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
               raw_body=token_form(arm_url + "/.default"))


def model_version_body(name: str, version: str, model_uri: str, *, model_type: str = "CustomModel",
                       tags: dict[str, str] | None = None, description: str = "") -> dict[str, Any]:
    """A model version resource as ARM answers it."""
    return {"id": f"{WORKSPACE_ID}/models/{name}/versions/{version}", "name": version,
            "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
            "properties": {"description": description, "tags": tags or {}, "properties": {}, "isAnonymous": False,
                           "flavors": {"python_function": {"data": {"loader_module": "mlflow.sklearn"}}}
                           if model_type == "MLFlowModel" else {},
                           "modelType": model_type, "modelUri": model_uri},
            "systemData": {"createdAt": "2026-01-01T12:34:56.999Z", "createdBy": "ci", "createdByType": "User",
                           "lastModifiedAt": "2026-01-01T12:34:56.999Z", "lastModifiedBy": "ci",
                           "lastModifiedByType": "User"}}


def datastore_body(name: str, container: str, *, account: str = DEV_ACCOUNT, kind: str = "AzureBlob",
                   credentials: str = "AccountKey") -> dict[str, Any]:
    """A datastore resource as ARM answers it."""
    return {"id": f"{WORKSPACE_ID}/datastores/{name}", "name": name,
            "type": "Microsoft.MachineLearningServices/workspaces/datastores",
            "properties": {"description": "", "tags": {}, "isDefault": name == "workspaceblobstore",
                           "properties": None,
                           "credentials": {"credentialsType": credentials, "secrets": {"secretsType": credentials}},
                           "datastoreType": kind, "accountName": account, "containerName": container,
                           "endpoint": "core.windows.net", "protocol": "https"},
            "systemData": {"createdAt": "2026-01-01T12:34:56.999Z", "createdBy": "ci", "createdByType": "User"}}


def datastore_uri(datastore: str, path: str) -> str:
    """The long ``azureml://`` datastore URI Azure ML stores in ``modelUri``."""
    return f"azureml://subscriptions/{SUB}/resourcegroups/{RG}/workspaces/{WS}/datastores/{datastore}/paths/{path}"


def bearer(token: str) -> dict[str, str]:
    return {**ARM_HEADERS, "Authorization": f"Bearer {token}"}


API = {"api-version": API_VERSION}
